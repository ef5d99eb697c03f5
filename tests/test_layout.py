"""The package layout that docs/ARCHITECTURE.md draws holds in the code: imports point down the
layers, and every module the map names exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "jaxrec"

# Bottom to top. A module may import its own unit (package or module) and any unit of a lower
# layer; units of one layer are independent of each other, except the applications on top.
LAYERS: list[tuple[str, ...]] = [
    ("jaxrec.errors", "jaxrec.treepath", "jaxrec.ops"),
    ("jaxrec.parallel",),
    ("jaxrec.data",),
    ("jaxrec.models",),
    ("jaxrec.losses",),
    ("jaxrec.config",),
    ("jaxrec.inputs",),
    ("jaxrec.evaluation", "jaxrec.paddle"),
    ("jaxrec.training",),
    (
        "jaxrec.evaluate",
        "jaxrec.extract",
        "jaxrec.export",
        "jaxrec.search",
        "jaxrec.prepare",
        "jaxrec.convert",
        "jaxrec.holdout",
    ),
]
APPS = len(LAYERS) - 1


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _unit(name: str) -> tuple[str, int] | None:
    for level, units in enumerate(LAYERS):
        for unit in units:
            if name == unit or name.startswith(unit + "."):
                return unit, level
    return None


def _imports(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every jaxrec import in the file, function-level ones too."""
    mod = _module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("jaxrec")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("jaxrec"):
                continue
            if target == "jaxrec":  # from jaxrec import x: x is the module imported
                out += [(node.lineno, f"jaxrec.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, target))
    return out


def _modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_belongs_to_a_layer():
    loose = [_module_name(p) for p in _modules() if _unit(_module_name(p)) is None]
    assert loose == ["jaxrec"], f"modules outside LAYERS (add them to the map and here): {loose}"


def _violations(root: Path) -> list[str]:
    wrong = []
    for path in sorted((root / "jaxrec").rglob("*.py")):
        mod = _module_name(path, root)
        if mod == "jaxrec":
            continue
        unit, level = _unit(mod)
        for line, target in _imports(path, root):
            if target == "jaxrec":
                continue
            found = _unit(target)
            if found is None:
                wrong.append(f"{path.relative_to(root)}:{line}: unknown module {target}")
                continue
            t_unit, t_level = found
            if t_unit == unit or t_level < level or (level == APPS and t_level == APPS):
                continue
            wrong.append(
                f"{path.relative_to(root)}:{line}: {unit} (layer {level}) imports {target} "
                f"(layer {t_level})"
            )
    return wrong


def test_imports_point_down():
    wrong = _violations(ROOT)
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_layer_check_catches_upward_sideways_and_lazy_imports(tmp_path):
    pkg = tmp_path / "jaxrec"
    (pkg / "data").mkdir(parents=True)
    (pkg / "paddle").mkdir()
    (pkg / "data" / "fine.py").write_text("from jaxrec.errors import JaxrecError\n")
    (pkg / "data" / "up.py").write_text("def f():\n    from jaxrec.training import loop\n")
    (pkg / "paddle" / "side.py").write_text("from ..evaluation import metrics\n")
    assert _violations(tmp_path) == [
        "jaxrec/data/up.py:2: jaxrec.data (layer 2) imports jaxrec.training (layer 8)",
        "jaxrec/paddle/side.py:1: jaxrec.paddle (layer 7) imports jaxrec.evaluation (layer 7)",
    ]


def _map_modules() -> set[str]:
    """Module paths named in docs/ARCHITECTURE.md's module map and interfaces."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    names = set(re.findall(r"`(jaxrec/[\w/]+(?:\.py)?)`", text))
    for folder, files in re.findall(r"\| `(jaxrec/\w+/)` \| ([^|]+)\|", text):
        names |= {folder + f for f in re.findall(r"`(\w+\.py)`", files)}
    return names


def test_every_module_the_map_names_exists():
    named = _map_modules()
    assert len(named) > 30, "the module map should name the modules"
    missing = [n for n in sorted(named) if not (ROOT / n).exists()]
    assert not missing, f"docs/ARCHITECTURE.md names modules that do not exist: {missing}"


def test_every_module_is_on_the_map():
    named = _map_modules()
    files = {
        str(p.relative_to(ROOT)) for p in _modules() if p.name not in ("__init__.py", "__main__.py")
    }
    unnamed = sorted(f for f in files if f not in named)
    assert not unnamed, f"modules missing from docs/ARCHITECTURE.md's map: {unnamed}"
