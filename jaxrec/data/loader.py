"""Host input pipeline: parallel decode/augment, prefetch, per-host slices, sharded device batches.

Train batches come from :class:`~jaxrec.data.sampler.PKSampler`: the global batch has one P x K
group per device of the mesh (independent per device, as in PaddleClas); each process loads only
the groups of its own devices and the batch is assembled with
``jax.make_array_from_process_local_data`` on ``NamedSharding(mesh, P("data"))``. Images stay
uint8 ``[B, H, W, 3]`` on the wire; normalization (and, with ``augment_on_host=False``, the
random augmentation: ``jaxrec.data.device_aug``) runs on device.

Everything random is a function of (seed, epoch, step, position), so ``state()``/``restore()``
(a small dict) resume exactly, independent of the worker count and of prefetching.

Overlap: a thread pool decodes ``prefetch`` batches ahead, each worker writing its image straight
into the batch buffer (no stacking copy on the main thread); finished batches are handed to
``jax.make_array_from_process_local_data`` early, so up to ``device_prefetch`` batches are already
being copied to the devices (asynchronously) while the current step computes. OpenCV and Pillow
release the GIL, and OpenCV's own threads are switched off so the pool does not oversubscribe.
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import logging
import os
import threading
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxrec.data.datasets import Source
from jaxrec.data.image import configure_decoding, decode_image
from jaxrec.data.preprocess import Preprocess
from jaxrec.data.sampler import PKSampler
from jaxrec.data.transforms import TrainTransform, rng_for
from jaxrec.errors import DatasetError

log = logging.getLogger(__name__)

_INT32_MAX = 2**31 - 1


class BadImageError(DatasetError):
    """An image of the dataset could not be read or decoded; names the file and list line."""


def to_rgb_array(value: bytes | np.ndarray, name: str) -> np.ndarray:
    """Decode bytes (cv2 semantics) or accept a uint8 pixel array, giving uint8 ``[H, W, 3]``."""
    if isinstance(value, bytes | bytearray | memoryview):
        return decode_image(bytes(value), name=name)
    arr = np.asarray(value)
    if arr.dtype != np.uint8:
        raise ValueError(f"{name}: pixel array must be uint8, got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or 0 in arr.shape:
        raise ValueError(f"{name}: unusable pixel array shape {arr.shape}")
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    return np.ascontiguousarray(arr[:, :, :3])


def _check_int32(values: np.ndarray, what: str, source: Source) -> np.ndarray:
    if values.size and (values.min() < -_INT32_MAX - 1 or values.max() > _INT32_MAX):
        raise ValueError(f"{source.name}: {what} do not fit in int32 (device arrays are int32)")
    return values.astype(np.int32)


def _local_shards(
    mesh: Any, num_shards: int, process_index: int | None, process_count: int | None
) -> list[int]:
    """Shard ids (mesh positions) whose rows this process loads, in mesh order.

    With a mesh: the positions of this process's devices (they must be contiguous). Without one:
    an even contiguous split of ``num_shards`` over ``process_count`` (default one process).
    """
    if mesh is None:
        pc = 1 if process_count is None else int(process_count)
        pi = 0 if process_index is None else int(process_index)
        if num_shards % pc:
            raise ValueError(f"{num_shards} shards do not split evenly over {pc} processes")
        per = num_shards // pc
        return list(range(pi * per, (pi + 1) * per))
    pi = jax.process_index() if process_index is None else process_index
    devices = list(np.asarray(mesh.devices).reshape(-1))
    if len(devices) != num_shards:
        raise ValueError(
            f"the mesh has {len(devices)} devices but the sampler was built with num_shards="
            f"{num_shards}; build PKSampler(..., num_shards={len(devices)})"
        )
    mine = [i for i, d in enumerate(devices) if d.process_index == pi]
    if not mine or mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError("this process's devices must be contiguous in the 1-D data mesh")
    return mine


def _put(batch: dict[str, np.ndarray], mesh: Any, global_rows: int) -> dict[str, Any]:
    """Host-local rows -> global arrays sharded over the mesh's data axis (or numpy)."""
    if mesh is None:
        return batch
    axis = mesh.axis_names[0]
    sharding = NamedSharding(mesh, P(axis))
    return {
        k: jax.make_array_from_process_local_data(sharding, v, (global_rows,) + v.shape[1:])
        for k, v in batch.items()
    }


def decode_pool(num_workers: int | None, name: str) -> cf.ThreadPoolExecutor:
    """Threads for decoding (default: one per core, at most 32), set up by ``configure_decoding``.

    One process feeds all local devices, so this is the host's whole decode budget (PaddleClas's
    ``num_workers`` is per GPU process).
    """
    workers = num_workers or min(32, os.cpu_count() or 1)
    return cf.ThreadPoolExecutor(workers, thread_name_prefix=name, initializer=configure_decoding)


class _InFlight:
    """Batches in order: decode jobs on the pool, then device transfers dispatched ahead of use.

    A job is ``(futures, finish)``; ``finish()`` waits for the futures and returns the host batch.
    ``pop`` hands out the oldest batch and then starts the transfer of every following job whose
    futures have all succeeded, up to ``depth`` device batches (it never blocks for them, and a
    failed job raises only when its own turn comes).
    """

    def __init__(self, put: Callable[[dict], dict], depth: int) -> None:
        self.put = put
        self.depth = max(0, int(depth))
        self.jobs: collections.deque = collections.deque()
        self.ready: collections.deque = collections.deque()

    def add(self, futures: list[cf.Future], finish: Callable[[], dict]) -> None:
        self.jobs.append((futures, finish))

    def _ok(self, futures: list[cf.Future]) -> bool:
        return all(f.done() and not f.cancelled() and f.exception() is None for f in futures)

    def pop(self) -> dict:
        if not self.ready:
            self.ready.append(self.put(self.jobs.popleft()[1]()))
        out = self.ready.popleft()
        while self.jobs and len(self.ready) < self.depth and self._ok(self.jobs[0][0]):
            self.ready.append(self.put(self.jobs.popleft()[1]()))
        return out

    def clear(self) -> None:
        for futures, _ in self.jobs:
            for f in futures:
                f.cancel()
        self.jobs.clear()
        self.ready.clear()

    def __len__(self) -> int:
        return len(self.jobs) + len(self.ready)


class Decoder:
    """Reads, decodes and prepares (first resize) records, optionally caching the result.

    With ``skip_bad`` failures are remembered and ``None`` returned instead of raising.
    ``cache_bytes`` bounds an in-memory cache of prepared images (first come, first kept).
    """

    def __init__(self, source: Source, skip_bad: bool, prepare: Any, cache_bytes: int = 0) -> None:
        self.source = source
        self.skip_bad = skip_bad
        self.prepare = prepare
        self.bad: dict[int, str] = {}
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}
        self._cache_left = int(cache_bytes)

    def load(self, i: int) -> np.ndarray | None:
        hit = self._cache.get(i)
        if hit is not None:
            return hit
        try:
            img = self.prepare(to_rgb_array(self.source.read(i), self.source.paths[i]))
        except Exception as e:  # any failure becomes a named error (or is skipped)
            msg = f"cannot load image {self.source.describe(i)}: {e}"
            if not self.skip_bad:
                raise BadImageError(
                    msg + " (fix or remove the file, or enable skip_bad to substitute it)"
                ) from e
            with self._lock:
                if i not in self.bad:
                    self.bad[i] = str(e)
                    log.warning("skipping bad image (%d so far): %s", len(self.bad), msg)
            return None
        if self._cache_left >= img.nbytes:
            with self._lock:
                if self._cache_left >= img.nbytes and i not in self._cache:
                    img.setflags(write=False)
                    self._cache[i] = img
                    self._cache_left -= img.nbytes
        return img

    @property
    def cached_images(self) -> int:
        """Prepared images held in the cache (it keeps what fits in ``cache_bytes``)."""
        return len(self._cache)

    def report(self) -> list[str]:
        return [f"{self.source.describe(i)}: {why}" for i, why in sorted(self.bad.items())]


class TrainLoader:
    """Infinite iterator of PK-sampled, augmented, device-sharded train batches.

    Batches are ``{"image": uint8 [B, S, S, 3], "label": int32 [B]}`` with B = shards x
    ``sampler.batch_size``; with ``mesh`` they are global ``jax.Array`` sharded on the data axis,
    without it numpy arrays of this process's rows. ``sampler.num_shards`` must equal the number
    of devices in ``mesh``.

    ``augment_on_host=False`` returns the images after decoding and the deterministic first
    resize only (``transform.prepare``); the random part then runs in the jitted step
    (``jaxrec.data.device_aug.DeviceAugment``). ``skip_bad`` replaces an unreadable image by
    another image of the same id (deterministically) and logs it; ``bad_images()`` lists them.
    ``cache_bytes`` keeps up to that many bytes of decoded, first-resized images in memory
    (size x size x 3 bytes each; 150 KB at 224), which removes decoding and the first resize
    from later epochs of small datasets. ``prefetch`` batches are decoded ahead and up to
    ``device_prefetch`` of them are already on their way to the devices.
    """

    def __init__(
        self,
        source: Source,
        sampler: PKSampler,
        transform: TrainTransform | None = None,
        *,
        mesh: Any = None,
        seed: int = 0,
        num_workers: int | None = None,
        prefetch: int = 2,
        device_prefetch: int = 2,
        augment_on_host: bool = True,
        skip_bad: bool = False,
        cache_bytes: int = 0,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        if len(sampler.counts) and int(sampler.counts.sum()) != len(source):
            raise ValueError(
                f"sampler was built on {int(sampler.counts.sum())} labels but the source has "
                f"{len(source)} records"
            )
        self.source = source
        self.sampler = sampler
        self.transform = transform or TrainTransform()
        self.mesh = mesh
        self.seed = int(seed)
        self.prefetch = max(1, int(prefetch))
        self.augment_on_host = bool(augment_on_host)
        self.shards = _local_shards(mesh, sampler.num_shards, process_index, process_count)
        self.global_rows = sampler.num_shards * sampler.batch_size
        self._labels = _check_int32(source.labels, "labels", source)
        self._decoder = Decoder(source, skip_bad, self.transform.prepare, cache_bytes)
        self._pool = decode_pool(num_workers, "jaxrec-data")
        self._epoch = 0  # next batch handed out
        self._step = 0
        self._inflight = _InFlight(lambda b: _put(b, mesh, self.global_rows), device_prefetch)
        self._cursor = (0, 0)  # next batch to submit

    # -- state ----------------------------------------------------------------------------

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    @property
    def cached_images(self) -> int:
        """Prepared images held in the decode cache (``cache_bytes``)."""
        return self._decoder.cached_images

    @property
    def batches_on_device(self) -> int:
        """Batches already sent to the devices ahead of use (at most ``device_prefetch``)."""
        return len(self._inflight.ready)

    def state(self) -> dict[str, int]:
        """Position of the next batch, plus what must match on restore."""
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.seed,
            "sampler_seed": self.sampler.seed,
            "num_shards": self.sampler.num_shards,
        }

    def restore(self, state: dict[str, int]) -> None:
        """Continue exactly where ``state()`` was taken (same seeds and shard count required)."""
        for key, mine in (
            ("seed", self.seed),
            ("sampler_seed", self.sampler.seed),
            ("num_shards", self.sampler.num_shards),
        ):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"loader state has {key}={state[key]} but this loader has {mine}")
        self._inflight.clear()
        self._epoch, self._step = int(state["epoch"]), int(state["step"])
        self._cursor = (self._epoch, self._step)

    # -- work -----------------------------------------------------------------------------

    def _item(self, out: np.ndarray, row: int, epoch: int, aug_index: int, idx: int) -> int:
        img = self._decoder.load(idx)
        if img is None:
            idx, img = self._substitute(idx)
        if self.augment_on_host:
            params = self.transform.sample(rng_for(self.seed, epoch, aug_index))
            img = self.transform.apply_prepared(img, params)
        out[row] = img
        return idx

    def _substitute(self, idx: int) -> tuple[int, np.ndarray]:
        group = np.flatnonzero(self.source.labels == self.source.labels[idx])
        start = int(np.searchsorted(group, idx))
        for j in np.roll(group, -start - 1):
            img = self._decoder.load(int(j))
            if img is not None:
                return int(j), img
        raise BadImageError(
            f"every image of label {int(self.source.labels[idx])} failed to load, e.g. "
            f"{self.source.describe(idx)}; skip_bad cannot substitute it"
        )

    def _submit(self, epoch: int, step: int) -> None:
        bs = self.sampler.batch_size
        s = self.transform.size
        images = np.empty((bs * len(self.shards), s, s, 3), np.uint8)
        futures = []
        for k, shard in enumerate(self.shards):
            idx = self.sampler.batch(epoch, step, shard)
            base = (step * self.sampler.num_shards + shard) * bs
            futures.extend(
                self._pool.submit(self._item, images, k * bs + j, epoch, base + j, int(i))
                for j, i in enumerate(idx)
            )

        def finish() -> dict[str, np.ndarray]:
            rows = np.asarray([f.result() for f in futures], dtype=np.int64)
            return {"image": images, "label": self._labels[rows]}

        self._inflight.add(futures, finish)

    def _fill(self) -> None:
        while len(self._inflight.jobs) < self.prefetch:
            e, s = self._cursor
            self._submit(e, s)
            s += 1
            if s >= self.steps_per_epoch:
                e, s = e + 1, 0
            self._cursor = (e, s)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self

    def __next__(self) -> dict[str, Any]:
        self._fill()
        batch = self._inflight.pop()
        self._fill()
        self._step += 1
        if self._step >= self.steps_per_epoch:
            self._epoch, self._step = self._epoch + 1, 0
        return batch

    def iter_epoch(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch."""
        epoch = self._epoch
        while self._epoch == epoch:
            yield next(self)

    def bad_images(self) -> list[str]:
        """Images substituted because of ``skip_bad`` (file, list line and reason)."""
        return self._decoder.report()

    def close(self) -> None:
        self._inflight.clear()
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> TrainLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class EvalLoader:
    """Ordered batches over a query/gallery source, last batch padded, with a validity mask.

    Batches: ``{"image": uint8 [B, h, w, 3], "label": int32 [B], "index": int32 [B],
    "mask": bool [B]}`` plus ``"uid": int32 [B]`` when the list has a third column; (h, w) is
    ``preprocess.input_size`` and each image goes through ``preprocess.apply``. Rows past
    the end (padding) and, with ``skip_bad``, unreadable images have ``mask == False`` (their
    pixels are zero). ``batch_size`` is global and must divide evenly over the mesh's devices and
    the processes; each process loads only its contiguous slice of every batch.
    """

    def __init__(
        self,
        source: Source,
        batch_size: int = 64,
        preprocess: Preprocess | None = None,
        *,
        mesh: Any = None,
        num_workers: int | None = None,
        prefetch: int = 2,
        device_prefetch: int = 2,
        skip_bad: bool = False,
        process_index: int | None = None,
        process_count: int | None = None,
    ) -> None:
        self.source = source
        self.preprocess = preprocess or Preprocess()
        self.mesh = mesh
        self.batch_size = int(batch_size)
        self.prefetch = max(1, int(prefetch))
        self.device_prefetch = device_prefetch
        pc = jax.process_count() if process_count is None else process_count
        pi = jax.process_index() if process_index is None else process_index
        if mesh is not None:
            n_dev = int(np.asarray(mesh.devices).size)
            if self.batch_size % n_dev:
                raise ValueError(
                    f"eval batch_size {batch_size} must be a multiple of the {n_dev} devices; "
                    f"use e.g. {-(-batch_size // n_dev) * n_dev}"
                )
        if self.batch_size % pc:
            raise ValueError(f"eval batch_size {batch_size} must divide over {pc} processes")
        rows = self.batch_size // pc
        self._rows = (pi * rows, (pi + 1) * rows)
        self._labels = _check_int32(source.labels, "labels", source)
        self._uids = None if source.uids is None else _check_int32(source.uids, "uids", source)
        self._decoder = Decoder(source, skip_bad, self.preprocess.apply)
        self._pool = decode_pool(num_workers, "jaxrec-eval")

    def __len__(self) -> int:
        return -(-len(self.source) // self.batch_size)

    def _item(self, out: np.ndarray, row: int, i: int) -> bool:
        img = self._decoder.load(i)
        if img is None:
            return False
        out[row] = img
        return True

    def _submit(self, b: int, inflight: _InFlight) -> None:
        lo, hi = self._rows
        idx = np.arange(b * self.batch_size + lo, b * self.batch_size + hi)
        n = len(self.source)
        images = np.zeros((idx.size, *self.preprocess.input_size, 3), np.uint8)
        futs = [
            self._pool.submit(self._item, images, r, int(i)) for r, i in enumerate(idx) if i < n
        ]

        def finish() -> dict[str, np.ndarray]:
            mask = np.zeros(idx.size, bool)
            mask[: len(futs)] = [f.result() for f in futs]
            safe = np.minimum(idx, n - 1)
            batch = {
                "image": images,
                "label": np.where(idx < n, self._labels[safe], -1).astype(np.int32),
                "index": idx.astype(np.int32),
                "mask": mask,
            }
            if self._uids is not None:
                batch["uid"] = np.where(idx < n, self._uids[safe], -1).astype(np.int32)
            return batch

        inflight.add(futs, finish)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        inflight = _InFlight(lambda b: _put(b, self.mesh, self.batch_size), self.device_prefetch)
        nxt = 0
        try:
            for _ in range(len(self)):
                while nxt < len(self) and len(inflight.jobs) < self.prefetch:
                    self._submit(nxt, inflight)
                    nxt += 1
                yield inflight.pop()
        finally:
            inflight.clear()

    def bad_images(self) -> list[str]:
        """Images masked out because of ``skip_bad`` (file, list line and reason)."""
        return self._decoder.report()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> EvalLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
