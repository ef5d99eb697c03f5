"""PKSampler: P distinct ids x K images per device batch (ref §6.5), deterministic per step.

Reference semantics (PaddleClas ``PKSampler``):

* ids are the distinct labels in order of first appearance; ``id_avg_prob`` gives every id the
  same probability, ``sample_avg_prob`` weights ids by their image count;
* ``id_list``/``ratio`` pairs multiply the probability of id *positions* ``id_list[2j]`` ..
  ``id_list[2j+1]`` (inclusive, first-appearance order) by ``ratio[j]``, then renormalize;
* a batch draws P = batch_size / K distinct ids without replacement according to those
  probabilities, then K images per id, with replacement only for ids holding fewer than K images;
* every device samples independently; an epoch has ``ceil(ceil(N / n_shards) / batch_size)``
  steps (it depends on the image count only).

Differences by design: the random stream of batch ``(epoch, step, shard)`` comes from its own
``numpy.random.Generator`` seeded by ``(seed, epoch, step, shard)``, so a resumed run sees exactly
the same batches; the per-epoch reshuffle of the id order is therefore unnecessary (it does not
change the distribution). :meth:`PKSampler.reference_epochs` reproduces the reference's exact
stream (global-``RandomState`` style) for golden tests.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

from jaxrec.errors import SamplerConfigError

log = logging.getLogger(__name__)

SAMPLE_METHODS = ("id_avg_prob", "sample_avg_prob")


def _reference_probs(
    counts: Sequence[int],
    sample_method: str,
    id_list: Sequence[int] | None,
    ratio: Sequence[float] | None,
) -> np.ndarray:
    """Id probabilities computed with the reference's exact float operations."""
    n = len(counts)
    if sample_method == "id_avg_prob":
        prob = np.array([1 / n] * n)
    else:
        prob = np.array(counts) / sum(counts)
    if id_list and ratio:
        for i in range(n):
            for j in range(len(ratio)):
                if id_list[2 * j] <= i <= id_list[2 * j + 1]:
                    prob[i] = prob[i] * ratio[j]
                    break
        prob = prob / sum(prob)
    if abs(sum(prob) - 1) > 1e-8:
        prob[-1] = 1 - sum(prob[:-1])
    return prob


class PKSampler:
    """Index sampler for metric learning: each shard batch is P ids x K images.

    Args:
      labels: int label per dataset record, ``[N]``.
      batch_size: per-shard (per-device) batch size; must be a multiple of ``sample_per_id``.
      sample_per_id: K, images per id.
      sample_method: ``"id_avg_prob"`` or ``"sample_avg_prob"`` (the reference default).
      id_list, ratio: optional probability multipliers over id positions, see module doc.
      seed: base seed; batch ``(epoch, step, shard)`` is a pure function of it.
      num_shards: number of independent per-device samplers (global devices); sets epoch length.
      shuffle: accepted for config compatibility; sampling is random either way.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray,
        batch_size: int,
        sample_per_id: int,
        *,
        sample_method: str = "sample_avg_prob",
        id_list: Sequence[int] | None = None,
        ratio: Sequence[float] | None = None,
        seed: int = 0,
        num_shards: int = 1,
        shuffle: bool = True,
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 1 or labels.size == 0:
            raise SamplerConfigError("PKSampler needs a non-empty 1-D label array")
        if sample_per_id < 1 or batch_size < 1:
            raise SamplerConfigError(
                f"batch_size ({batch_size}) and sample_per_id ({sample_per_id}) must be >= 1"
            )
        if batch_size % sample_per_id != 0:
            raise SamplerConfigError(
                f"PKSampler: sample_per_id ({sample_per_id}) must divide batch_size "
                f"({batch_size}); pick a per-device batch_size that is a multiple of "
                f"{sample_per_id}, e.g. {max(1, batch_size // sample_per_id) * sample_per_id}."
            )
        if sample_method not in SAMPLE_METHODS:
            raise SamplerConfigError(
                f"PKSampler: sample_method {sample_method!r} is not one of {SAMPLE_METHODS}"
            )
        if num_shards < 1:
            raise SamplerConfigError(f"num_shards must be >= 1, got {num_shards}")
        _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
        order = np.argsort(first, kind="stable")  # unique-sorted slot -> appearance position
        position_of_slot = np.empty_like(order)
        position_of_slot[order] = np.arange(order.size)
        pos = position_of_slot[inverse.reshape(-1)]
        self.ids = labels[first[order]]  # distinct labels, first-appearance order
        self.num_ids = int(self.ids.size)
        self.groups: list[np.ndarray] = [
            np.asarray(g, dtype=np.int64)
            for g in np.split(np.argsort(pos, kind="stable"), np.cumsum(np.bincount(pos))[:-1])
        ]
        self.counts = np.array([g.size for g in self.groups], dtype=np.int64)
        self.batch_size = int(batch_size)
        self.sample_per_id = int(sample_per_id)
        self.ids_per_batch = self.batch_size // self.sample_per_id
        self.sample_method = sample_method
        self.seed = int(seed)
        self.num_shards = int(num_shards)
        self.shuffle = shuffle
        self.num_samples = labels.size
        self._check_id_list(id_list, ratio)
        self.id_list = None if not (id_list and ratio) else [int(v) for v in id_list]
        self.ratio = None if not (id_list and ratio) else [float(v) for v in ratio]
        self.probs = _reference_probs(self.counts.tolist(), sample_method, self.id_list, self.ratio)
        if self.num_ids < self.ids_per_batch:
            raise SamplerConfigError(
                f"PKSampler: batch_size {batch_size} / sample_per_id {sample_per_id} = "
                f"{self.ids_per_batch} distinct ids per batch, but the dataset has only "
                f"{self.num_ids} ids. Lower batch_size to at most "
                f"{self.num_ids * sample_per_id} or raise sample_per_id."
            )
        self._cdf = np.cumsum(self.probs)
        self._cdf /= self._cdf[-1]
        nonzero = int(np.count_nonzero(self.probs > 0))
        if nonzero < self.ids_per_batch:
            raise SamplerConfigError(
                f"PKSampler: only {nonzero} ids have a non-zero probability (ratio 0 in "
                f"id_list ranges?) but {self.ids_per_batch} distinct ids are needed per batch."
            )

    def _check_id_list(self, id_list: Sequence[int] | None, ratio: Sequence[float] | None) -> None:
        if not (id_list and ratio):
            if id_list or ratio:
                # PaddleClas silently ignores one without the other; jaxrec never ignores a key.
                raise SamplerConfigError(
                    "PKSampler: id_list and ratio go together (one ratio per (start, end) "
                    "range); set both or neither"
                )
            return
        if len(id_list) % 2 != 0 or len(id_list) != 2 * len(ratio):
            raise SamplerConfigError(
                f"PKSampler: id_list must hold (start, end) pairs, one pair per ratio entry; got "
                f"{len(id_list)} id_list values and {len(ratio)} ratios."
            )
        for j in range(len(ratio)):
            a, b = int(id_list[2 * j]), int(id_list[2 * j + 1])
            if a < 0 or a > b:
                raise SamplerConfigError(
                    f"PKSampler: id_list range {j} = [{a}, {b}] is invalid; ranges are inclusive "
                    "positions (0-based, first-appearance order of ids) with start <= end."
                )
            if a >= self.num_ids:
                raise SamplerConfigError(
                    f"PKSampler: id_list range {j} = [{a}, {b}] starts beyond the {self.num_ids} "
                    f"ids of this dataset (positions 0..{self.num_ids - 1}); it would have no "
                    "effect. Fix the range or drop id_list/ratio for this dataset."
                )
            if b >= self.num_ids:
                log.warning(
                    "PKSampler: id_list range [%d, %d] extends past the last id position %d",
                    a,
                    b,
                    self.num_ids - 1,
                )
            if ratio[j] < 0:
                raise SamplerConfigError(f"PKSampler: ratio[{j}] = {ratio[j]} must be >= 0")

    # ----------------------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        """ceil(ceil(N / num_shards) / batch_size), the DistributedBatchSampler length."""
        per_shard = math.ceil(self.num_samples / self.num_shards)
        return math.ceil(per_shard / self.batch_size)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def rng(self, epoch: int, step: int, shard: int) -> np.random.Generator:
        """The generator of one shard batch."""
        ss = np.random.SeedSequence((self.seed, int(epoch), int(step), int(shard), 0x9C))
        return np.random.Generator(np.random.PCG64(ss))

    def _draw(
        self,
        rng: np.random.Generator | np.random.RandomState,
        positions: np.ndarray,
        probs: np.ndarray,
    ) -> np.ndarray:
        """One batch: P distinct id positions by ``probs``, then K indices per id."""
        k = self.sample_per_id
        chosen = rng.choice(positions, size=self.ids_per_batch, replace=False, p=probs)
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, p in enumerate(chosen):
            group = self.groups[int(p)]
            out[j * k : (j + 1) * k] = rng.choice(group, size=k, replace=group.size < k)
        return out

    def _choose_ids(self, rng: np.random.Generator) -> np.ndarray:
        """P distinct id positions, successive sampling by ``probs`` (as ``choice`` does).

        Drawing with replacement from the fixed CDF and discarding repeats gives the same
        distribution as numpy's zero-and-renormalize loop without its O(#ids) passes per call.
        """
        need = self.ids_per_batch
        chosen: list[int] = []
        seen: set[int] = set()
        for _ in range(64):
            draws = np.searchsorted(
                self._cdf, rng.random(max(2 * (need - len(chosen)), 16)), side="right"
            )
            for d in draws.tolist():
                if d not in seen:
                    seen.add(d)
                    chosen.append(d)
                    if len(chosen) == need:
                        return np.asarray(chosen, dtype=np.int64)
        # Extremely skewed probabilities: finish with numpy's exact loop on the remaining ids.
        p = self.probs.copy()
        p[chosen] = 0.0
        rest = rng.choice(self.num_ids, size=need - len(chosen), replace=False, p=p / p.sum())
        return np.concatenate([np.asarray(chosen, dtype=np.int64), rest])

    def batch(self, epoch: int, step: int, shard: int = 0) -> np.ndarray:
        """Dataset indices of shard ``shard``'s batch at (epoch, step): int64 ``[batch_size]``."""
        if not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard} out of range for {self.num_shards} shards")
        rng = self.rng(epoch, step, shard)
        k = self.sample_per_id
        out = np.empty(self.batch_size, dtype=np.int64)
        for j, p in enumerate(self._choose_ids(rng)):
            group = self.groups[int(p)]
            out[j * k : (j + 1) * k] = rng.choice(group, size=k, replace=group.size < k)
        return out

    def global_batch(
        self, epoch: int, step: int, shards: Sequence[int] | None = None
    ) -> np.ndarray:
        """Concatenated batches of ``shards`` (default: all), each a whole P x K group."""
        shards = range(self.num_shards) if shards is None else shards
        return np.concatenate([self.batch(epoch, step, s) for s in shards])

    def epoch(self, epoch: int, shard: int = 0) -> Iterator[np.ndarray]:
        """All batches of one shard in one epoch."""
        for step in range(self.steps_per_epoch):
            yield self.batch(epoch, step, shard)

    def reference_epochs(
        self,
        num_epochs: int,
        rng: np.random.RandomState,
        *,
        rank: int = 0,
        total_epochs: int = 0,
    ) -> Iterator[list[np.ndarray]]:
        """The reference's exact stream: per epoch, the list of batches.

        ``rng`` plays the reference's global numpy RNG; the id order and probabilities are
        reshuffled in place each epoch by ``RandomState(rank * total_epochs + epoch)`` (the
        shuffles accumulate across epochs, as in the reference). For golden tests.
        """
        positions = np.arange(self.num_ids)
        probs = self.probs.copy()
        for e in range(num_epochs):
            if self.shuffle:
                perm = np.random.RandomState(rank * total_epochs + e).permutation(self.num_ids)
                positions = positions[perm]
                probs = probs[perm]
            yield [self._draw(rng, positions, probs) for _ in range(self.steps_per_epoch)]
