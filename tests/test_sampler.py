"""PKSampler: reference goldens (exact stream and distribution), preconditions, determinism."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from jaxrec.data.sampler import PKSampler, SamplerConfigError

GOLDEN = Path(__file__).parent / "fixtures" / "data_sampler_golden.npz"


@pytest.fixture(scope="module")
def golden():
    return dict(np.load(GOLDEN))


def _make(g, method, **kw):
    return PKSampler(
        g["labels"],
        int(g["cfg/batch_size"]),
        int(g["cfg/sample_per_id"]),
        sample_method=method,
        id_list=g["cfg/id_list"].tolist(),
        ratio=g["cfg/ratio"].tolist(),
        **kw,
    )


@pytest.mark.parametrize("method", ["id_avg_prob", "sample_avg_prob"])
def test_reference_probabilities_and_order(golden, method):
    s = _make(golden, method)
    np.testing.assert_array_equal(s.ids, golden[f"{method}/label_list"])
    np.testing.assert_array_equal(s.probs, golden[f"{method}/prob_list"])
    assert len(s) == int(golden[f"{method}/len"])


@pytest.mark.parametrize("method", ["id_avg_prob", "sample_avg_prob"])
def test_reference_exact_stream(golden, method):
    """Same global RandomState seed -> the very same index batches as PaddleClas, two epochs."""
    s = _make(golden, method)
    ours = list(s.reference_epochs(2, np.random.RandomState(1234), rank=0, total_epochs=7))
    np.testing.assert_array_equal(np.stack([np.stack(e) for e in ours]), golden[f"{method}/stream"])


@pytest.mark.parametrize("method", ["id_avg_prob", "sample_avg_prob"])
def test_distribution_matches_reference(golden, method):
    """Our per-step generator gives the reference's id and image frequencies."""
    s = _make(golden, method)
    labels = golden["labels"]
    pos = {int(v): i for i, v in enumerate(s.ids)}
    n = 4000
    id_freq = np.zeros(s.num_ids)
    img_freq = np.zeros(labels.size)
    for step in range(n):
        b = s.batch(0, step)
        for lab in labels[b[:: s.sample_per_id]]:
            id_freq[pos[int(lab)]] += 1
        np.add.at(img_freq, b, 1)
    id_freq /= n
    img_freq /= n
    ref_id = golden[f"{method}/id_freq"]
    ref_img = golden[f"{method}/img_freq"]
    nref = int(golden[f"{method}/freq_batches"])
    # Binomial standard errors of both estimates; 5 sigma plus a small floor.
    se = np.sqrt(ref_id * (1 - np.minimum(ref_id, 1)) * (1 / n + 1 / nref))
    assert np.all(np.abs(id_freq - ref_id) <= 5 * se + 1e-3), np.abs(id_freq - ref_id).max()
    se_img = np.sqrt(ref_img * (1 / n + 1 / nref))
    assert np.all(np.abs(img_freq - ref_img) <= 5 * se_img + 2e-3)
    # The boosted range (ratio 3) is drawn clearly more often than the damped one (ratio 0.5).
    if method == "id_avg_prob":
        assert id_freq[5:13].mean() > 3 * id_freq[30:34].mean()


def test_batch_structure():
    labels = np.repeat(np.arange(10), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    s = PKSampler(labels, 12, 4, sample_method="id_avg_prob", seed=5)
    for step in range(200):
        b = s.batch(3, step)
        assert b.shape == (12,) and b.dtype == np.int64
        groups = b.reshape(3, 4)
        lab = labels[groups]
        assert np.all(lab == lab[:, :1]), "each group of K is one id"
        assert len(set(lab[:, 0].tolist())) == 3, "P distinct ids"
        for g in groups:
            if np.sum(labels == labels[g[0]]) >= 4:
                assert len(set(g.tolist())) == 4, "no replacement when the id has >= K images"


def test_determinism_and_resume():
    labels = np.repeat(np.arange(20), 5)
    a = PKSampler(labels, 8, 2, seed=11, num_shards=4)
    b = PKSampler(labels, 8, 2, seed=11, num_shards=4)
    np.testing.assert_array_equal(a.batch(2, 7, 3), b.batch(2, 7, 3))
    # Resume: the batches of a restarted sampler at (epoch, step) equal the uninterrupted run.
    full = [a.global_batch(1, s) for s in range(a.steps_per_epoch)]
    resumed = [b.global_batch(1, s) for s in range(2, b.steps_per_epoch)]
    for x, y in zip(full[2:], resumed, strict=True):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a.batch(0, 0, 0), a.batch(0, 0, 1)), "shards are independent"
    assert not np.array_equal(a.batch(0, 0), a.batch(1, 0)), "epochs differ"
    c = PKSampler(labels, 8, 2, seed=12, num_shards=4)
    assert not np.array_equal(a.batch(0, 0), c.batch(0, 0)), "seed matters"


def test_epoch_length_counts_images_per_shard():
    labels = np.repeat(np.arange(50), 7)  # 350 images
    for shards in (1, 3, 8):
        s = PKSampler(labels, 16, 4, num_shards=shards)
        assert s.steps_per_epoch == math.ceil(math.ceil(350 / shards) / 16)
        assert len(list(s.epoch(0, shard=shards - 1))) == s.steps_per_epoch


def test_first_appearance_positions():
    labels = np.array([7, 7, 3, 3, 9, 9, 3, 1, 1])
    s = PKSampler(labels, 2, 2, id_list=[1, 1], ratio=[0.0])
    np.testing.assert_array_equal(s.ids, [7, 3, 9, 1])
    assert s.probs[1] == 0.0  # position 1 is label 3, not label 1
    np.testing.assert_array_equal(s.groups[1], [2, 3, 6])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(batch_size=10, sample_per_id=4), "must divide batch_size"),
        (dict(batch_size=64, sample_per_id=4), "only 5 ids"),
        (dict(batch_size=8, sample_per_id=4, sample_method="uniform"), "sample_method"),
        (dict(batch_size=8, sample_per_id=4, id_list=[0, 1, 2], ratio=[2.0]), "pairs"),
        (dict(batch_size=8, sample_per_id=4, id_list=[3, 1], ratio=[2.0]), "start <= end"),
        (dict(batch_size=8, sample_per_id=4, id_list=[9, 12], ratio=[2.0]), "beyond the 5 ids"),
        (dict(batch_size=12, sample_per_id=4, id_list=[0, 2], ratio=[0.0]), "non-zero"),
        (dict(batch_size=8, sample_per_id=4, id_list=[0, 2]), "go together"),
        (dict(batch_size=8, sample_per_id=4, ratio=[2.0]), "go together"),
    ],
)
def test_preconditions(kwargs, match):
    labels = np.repeat(np.arange(5), 4)
    with pytest.raises(SamplerConfigError, match=match):
        PKSampler(labels, **kwargs)


def test_zero_probability_ids_never_drawn_and_skewed_fallback():
    labels = np.repeat(np.arange(10), 3)
    s = PKSampler(labels, 8, 2, id_list=[0, 2, 3, 3], ratio=[0.0, 1e9], sample_method="id_avg_prob")
    for step in range(300):
        ids = labels[s.batch(0, step)][::2]
        assert len(set(ids.tolist())) == 4
        assert not set(ids.tolist()) & {0, 1, 2}
        assert 3 in ids  # the heavy id is practically always drawn
    # 7 of the 7 eligible ids per batch: the rejection loop cannot finish, numpy's loop does.
    t = PKSampler(labels, 14, 2, id_list=[0, 2, 3, 3], ratio=[0.0, 1e12])
    ids = labels[t.batch(1, 1)][::2]
    assert sorted(ids.tolist()) == [3, 4, 5, 6, 7, 8, 9]
