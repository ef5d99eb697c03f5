"""Try every recognition YAML of a PaddleClas checkout through jaxrec's config resolver.

    python tools/check_paddleclas_yamls.py /work/PaddleClas [--dirs GeneralRecognition ...]

Prints, per YAML, "resolves" or the first unsupported part (the ConfigError, which names the
key). Runs in the jaxrec venv; needs only the PaddleClas source tree, not Paddle.
"""

from __future__ import annotations

import argparse
import glob
import os

from jaxrec.config import resolve
from jaxrec.errors import JaxrecError
from jaxrec.paddle.yaml_in import load_yaml

DIRS = ("GeneralRecognitionV2", "GeneralRecognition", "ResNet50_vd_SOP")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("paddleclas", help="PaddleClas source checkout")
    ap.add_argument("--dirs", nargs="*", default=list(DIRS), help="folders under ppcls/configs")
    args = ap.parse_args()
    for d in args.dirs:
        for path in sorted(
            glob.glob(os.path.join(args.paddleclas, "ppcls", "configs", d, "*.yaml"))
        ):
            name = os.path.relpath(path, os.path.join(args.paddleclas, "ppcls", "configs"))
            try:
                resolve(load_yaml(path))
                print(f"| `{name}` | resolves |")
            except JaxrecError as e:
                print(f"| `{name}` | {str(e).splitlines()[0][:160]} |")


if __name__ == "__main__":
    main()
