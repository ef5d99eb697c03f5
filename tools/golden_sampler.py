"""Golden fixtures for jaxrec.data.sampler from PaddleClas's own PKSampler.

Run with the reference environment (paddle + a PaddleClas checkout)::

    PYTHONPATH=/work/PaddleClas:/work/main /work/paddle_venv/bin/python tools/golden_sampler.py \
        --out tests/fixtures/data_sampler_golden.npz

Writes, for a small synthetic label list with uneven id sizes (some below K) and id_list/ratio:
(1) the exact index stream of two epochs with the global numpy RNG seeded, to be reproduced by
``PKSampler.reference_epochs``; (2) id and image frequencies over many batches, to compare the
distribution of jaxrec's own per-step generator against the reference.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def make_labels(seed: int = 3) -> np.ndarray:
    """Labels with ids in a scrambled first-appearance order and 1..9 images per id."""
    rng = np.random.RandomState(seed)
    ids = rng.permutation(np.arange(100, 140))  # 40 ids, label values not positions
    counts = rng.randint(1, 10, size=ids.size)
    labels = np.concatenate([np.full(c, i) for i, c in zip(ids, counts, strict=True)])
    # Interleave a little so first appearance differs from sorted order and groups are mixed.
    order = np.argsort(np.arange(labels.size) + rng.randint(0, 6, size=labels.size), kind="stable")
    return labels[order].astype(np.int64)


class _DS:
    def __init__(self, labels):
        self.labels = list(labels)

    def __len__(self):
        return len(self.labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="tests/fixtures/data_sampler_golden.npz")
    ap.add_argument("--freq-batches", type=int, default=20000)
    args = ap.parse_args()

    from ppcls.data.dataloader.pk_sampler import PKSampler

    labels = make_labels()
    cfg = dict(batch_size=16, sample_per_id=4, id_list=[5, 12, 30, 33], ratio=[3, 0.5])
    out: dict[str, np.ndarray] = {"labels": labels}
    for method in ("id_avg_prob", "sample_avg_prob"):
        ref = PKSampler(
            _DS(labels),
            batch_size=cfg["batch_size"],
            sample_per_id=cfg["sample_per_id"],
            shuffle=True,
            drop_last=False,
            id_list=cfg["id_list"],
            ratio=cfg["ratio"],
            sample_method=method,
            total_epochs=7,
        )
        out[f"{method}/prob_list"] = np.asarray(ref.prob_list, dtype=np.float64).copy()
        out[f"{method}/label_list"] = np.asarray(ref.label_list, dtype=np.int64).copy()
        np.random.seed(1234)
        stream = []
        for _ in range(2):
            stream.append(np.asarray([list(b) for b in ref], dtype=np.int64))
        out[f"{method}/stream"] = np.stack(stream)  # [epochs, steps, batch]
        out[f"{method}/len"] = np.asarray(len(ref))

        # Distribution: id and image frequencies over many batches (no reshuffle needed).
        ref2 = PKSampler(
            _DS(labels),
            batch_size=cfg["batch_size"],
            sample_per_id=cfg["sample_per_id"],
            shuffle=False,
            drop_last=False,
            id_list=cfg["id_list"],
            ratio=cfg["ratio"],
            sample_method=method,
        )
        np.random.seed(99)
        id_freq = np.zeros(len(ref2.label_list))
        img_freq = np.zeros(labels.size)
        pos_of_label = {lab: i for i, lab in enumerate(ref2.label_list)}
        k = cfg["sample_per_id"]
        nb = 0
        while nb < args.freq_batches:
            for b in ref2:
                b = np.asarray(b)
                for lab in labels[b[::k]]:
                    id_freq[pos_of_label[int(lab)]] += 1
                np.add.at(img_freq, b, 1)
                nb += 1
                if nb >= args.freq_batches:
                    break
        out[f"{method}/id_freq"] = id_freq / nb
        out[f"{method}/img_freq"] = img_freq / nb
        out[f"{method}/freq_batches"] = np.asarray(nb)
    for key, val in cfg.items():
        out[f"cfg/{key}"] = np.asarray(val)
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    np.savez_compressed(args.out, **out)
    print(f"wrote {args.out}: {sorted(out)}")


if __name__ == "__main__":
    main()
