"""Loader end to end on tiny real images: 8-device sharding, resume, host slices, bad files."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import jax
import multiproc_util
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P
from PIL import Image

from jaxrec.data.datasets import load_list, load_query_gallery_list
from jaxrec.data.image import ImageDecodeError, decode_image
from jaxrec.data.loader import BadImageError, EvalLoader, TrainLoader
from jaxrec.data.preprocess import Preprocess
from jaxrec.data.sampler import PKSampler
from jaxrec.data.transforms import TrainTransform

SMALL = TrainTransform(size=32, pad=4)


def _photo(rng, h, w):
    base = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """12 ids with 2..6 JPEG/PNG images of varied sizes, a train list and a query/gallery list."""
    root = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    lines, qg = [], []
    n = 0
    for label in range(12):
        for k in range(2 + label % 5):
            img = _photo(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60)))
            name = f"img/{label}_{k}." + ("jpg" if n % 2 else "png")
            (root / "img").mkdir(exist_ok=True)
            Image.fromarray(img).save(root / name, quality=92)
            lines.append(f"{name} {label}")
            qg.append(f"{name} {label} {n}")
            n += 1
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "qg.txt").write_text("\n".join(qg) + "\n")
    return root


def _np(batch):
    return {k: np.asarray(v) for k, v in batch.items()}


def test_train_loader_sharded_pk_batches(dataset):
    src = load_list(dataset / "train.txt")
    mesh = jax.make_mesh((8,), ("data",))
    sampler = PKSampler(src.labels, 4, 2, sample_method="id_avg_prob", seed=1, num_shards=8)
    with TrainLoader(src, sampler, SMALL, mesh=mesh, seed=2, num_workers=4) as loader:
        batch = next(loader)
        assert batch["image"].shape == (32, 32, 32, 3) and batch["image"].dtype == np.uint8
        assert batch["label"].dtype == np.int32
        assert batch["image"].sharding.spec == P("data")
        assert len(batch["label"].addressable_shards) == 8
        for shard in batch["label"].addressable_shards:
            lab = np.asarray(shard.data).reshape(2, 2)  # P=2 ids x K=2 on every device
            assert (lab == lab[:, :1]).all() and lab[0, 0] != lab[1, 0]
        host = _np(batch)
        expect = sampler.global_batch(0, 0)
        np.testing.assert_array_equal(host["label"], src.labels[expect])


def test_resume_is_exact_and_worker_independent(dataset):
    src = load_list(dataset / "train.txt")
    sampler = PKSampler(src.labels, 4, 2, seed=3, num_shards=2)
    assert sampler.steps_per_epoch == 6  # ceil(ceil(45 / 2) / 4)
    a = TrainLoader(src, sampler, SMALL, seed=5, num_workers=3, prefetch=3)
    first = [_np(next(a)) for _ in range(8)]  # crosses the epoch boundary
    state = None
    b = TrainLoader(src, sampler, SMALL, seed=5, num_workers=1, prefetch=1)
    for i in range(3):
        np.testing.assert_array_equal(_np(next(b))["image"], first[i]["image"])
        if i == 1:
            state = b.state()
    assert state == {"epoch": 0, "step": 2, "seed": 5, "sampler_seed": 3, "num_shards": 2}
    c = TrainLoader(src, sampler, SMALL, seed=5, num_workers=2)
    c.restore(state)
    for i in range(2, 8):
        got = _np(next(c))
        np.testing.assert_array_equal(got["image"], first[i]["image"])
        np.testing.assert_array_equal(got["label"], first[i]["label"])
    assert c.state()["epoch"] == 1 and c.state()["step"] == 2
    assert not np.array_equal(first[0]["image"], first[6]["image"])
    d = TrainLoader(src, sampler, SMALL, seed=6)
    assert not np.array_equal(_np(next(d))["image"], first[0]["image"]), "seed changes augmentation"
    with pytest.raises(ValueError, match="seed=5"):
        d.restore(state)
    e = TrainLoader(src, sampler, SMALL, seed=5)
    assert len(list(e.iter_epoch())) == 6 and e.state()["epoch"] == 1
    for loader in (a, b, c, d, e):
        loader.close()


def test_cache_gives_identical_batches(dataset):
    src = load_list(dataset / "train.txt")
    sampler = PKSampler(src.labels, 4, 2, seed=3, num_shards=2)
    plain = TrainLoader(src, sampler, SMALL, seed=5)
    cached = TrainLoader(src, sampler, SMALL, seed=5, cache_bytes=10 * 32 * 32 * 3)
    for _ in range(7):
        np.testing.assert_array_equal(_np(next(plain))["image"], _np(next(cached))["image"])
    assert cached.cached_images == 10  # the byte budget holds exactly 10 images
    plain.close()
    cached.close()


def test_host_only_decodes_and_prepares_when_augmenting_on_device(dataset):
    src = load_list(dataset / "train.txt")
    sampler = PKSampler(src.labels, 4, 2, seed=3, num_shards=2)
    with TrainLoader(src, sampler, SMALL, seed=5, augment_on_host=False) as loader:
        batch = next(loader)
    idx = sampler.global_batch(0, 0)
    want = np.stack([SMALL.prepare(decode_image(src.read(int(i)))) for i in idx])
    np.testing.assert_array_equal(batch["image"], want)
    np.testing.assert_array_equal(batch["label"], src.labels[idx])


def test_device_prefetch_keeps_batches_and_state(dataset):
    """Transfers dispatched ahead change nothing: same batches, same resume point."""
    src = load_list(dataset / "train.txt")
    mesh = jax.make_mesh((8,), ("data",))
    sampler = PKSampler(src.labels, 2, 2, seed=3, num_shards=8)
    runs = {}
    for depth in (0, 3):
        with TrainLoader(src, sampler, SMALL, mesh=mesh, seed=1, device_prefetch=depth) as ld:
            runs[depth] = [_np(next(ld)) for _ in range(4)]
            state = ld.state()
            assert ld.batches_on_device <= depth
        assert state["step"] == 4 % sampler.steps_per_epoch
    for a, b in zip(runs[0], runs[3], strict=True):
        np.testing.assert_array_equal(a["image"], b["image"])
        np.testing.assert_array_equal(a["label"], b["label"])


def _list_with_a_bad_line(folder: Path, ids: int, per_id: int, bad_line: int, bad: str):
    """``ids`` x ``per_id`` small PNGs in a list whose line ``bad_line`` (0-based) is ``bad``."""
    rng = np.random.default_rng(0)
    lines = []
    for label in range(ids):
        for k in range(per_id):
            Image.fromarray(_photo(rng, 16, 16)).save(folder / f"{label}_{k}.png")
            lines.append(f"{label}_{k}.png {label}")
    lines[bad_line] = f"{bad} {bad_line // per_id}"
    (folder / "t.txt").write_text("\n".join(lines) + "\n")
    return load_list(folder / "t.txt")


def test_a_bad_image_fails_its_own_batch_not_an_earlier_one(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    src = _list_with_a_bad_line(tmp_path, 6, 2, 7, "bad.png")
    sampler = PKSampler(src.labels, 2, 2, seed=0)
    order = [(e, s) for e in range(10) for s in range(sampler.steps_per_epoch)]
    first_bad = next(n for n, (e, s) in enumerate(order) if 7 in sampler.batch(e, s))
    assert first_bad >= 2
    loader = TrainLoader(src, sampler, SMALL, prefetch=4, device_prefetch=3)
    for _ in range(first_bad):
        next(loader)  # later batches are decoded already; their failure must wait its turn
    with pytest.raises(BadImageError, match=r"bad\.png"):
        next(loader)
    loader.close()


def test_each_host_loads_only_its_slice(dataset):
    src = load_list(dataset / "train.txt")
    sampler = PKSampler(src.labels, 4, 2, seed=3, num_shards=4)
    full = _np(next(TrainLoader(src, sampler, SMALL, seed=1)))
    parts = [
        _np(next(TrainLoader(src, sampler, SMALL, seed=1, process_index=i, process_count=2)))
        for i in range(2)
    ]
    assert parts[0]["image"].shape[0] == 8
    np.testing.assert_array_equal(np.concatenate([p["image"] for p in parts]), full["image"])
    np.testing.assert_array_equal(np.concatenate([p["label"] for p in parts]), full["label"])
    with pytest.raises(ValueError, match="num_shards=8"):
        TrainLoader(src, sampler, SMALL, mesh=jax.make_mesh((8,), ("data",)))


def test_eval_loader_ordered_padded(dataset):
    src = load_query_gallery_list(dataset / "qg.txt")
    mesh = jax.make_mesh((8,), ("data",))
    with EvalLoader(src, 16, Preprocess(resize=(24, 24)), mesh=mesh) as ev:
        batches = [_np(b) for b in ev]
    assert len(batches) == 3  # 45 images / 16, last batch padded
    got = np.concatenate([b["index"][b["mask"]] for b in batches])
    np.testing.assert_array_equal(got, np.arange(len(src)))
    assert all(b["image"].shape == (16, 24, 24, 3) for b in batches)
    uids = np.concatenate([b["uid"] for b in batches])
    np.testing.assert_array_equal(uids[:45], src.uids)
    assert (uids[45:] == -1).all()
    one = decode_image(src.read(5))
    np.testing.assert_array_equal(batches[0]["image"][5], Preprocess(resize=(24, 24)).apply(one))
    # A centre crop makes a non-square input.
    with EvalLoader(src, 8, Preprocess(resize=None, resize_short=20, crop=(12, 16))) as ev:
        first = next(iter(ev))
    assert first["image"].shape == (8, 12, 16, 3)
    np.testing.assert_array_equal(
        first["image"][5], Preprocess(resize=None, resize_short=20, crop=(12, 16)).apply(one)
    )
    with EvalLoader(src, 40, Preprocess(resize=(8, 8))) as ev:
        last = list(ev)[-1]
    assert last["mask"].sum() == 5 and (last["label"][5:] == -1).all()
    assert (last["image"][5:] == 0).all()
    halves = [
        list(EvalLoader(src, 40, Preprocess(resize=(8, 8)), process_index=i, process_count=2))
        for i in range(2)
    ]
    np.testing.assert_array_equal(
        np.concatenate([halves[0][1]["index"], halves[1][1]["index"]]), last["index"]
    )
    with pytest.raises(ValueError, match="multiple of the 8 devices"):
        EvalLoader(src, 12, mesh=mesh)


# ---- broken inputs ---------------------------------------------------------------------------


def _broken_corpus(folder: Path) -> dict[str, bytes]:
    rng = np.random.default_rng(4)
    img = Image.fromarray(_photo(rng, 40, 40))
    jpg = io.BytesIO()
    img.save(jpg, format="JPEG", quality=90)
    png = io.BytesIO()
    img.save(png, format="PNG")
    png_bytes = bytearray(png.getvalue())
    # Corrupt the first IDAT chunk's data but keep its old CRC.
    i = png_bytes.index(b"IDAT") + 10
    png_bytes[i] ^= 0xFF
    assert zlib.crc32(bytes(png_bytes[i - 10 : i + 4])) != 0  # sanity: bytes changed
    corpus = {
        "truncated.jpg": jpg.getvalue()[: len(jpg.getvalue()) // 2],
        "zero.jpg": b"",
        "text.jpg": b"this is not an image\n",
        "badcrc.png": bytes(png_bytes),
    }
    for name, data in corpus.items():
        (folder / name).write_bytes(data)
    return corpus


def test_broken_files_are_named(tmp_path):
    corpus = _broken_corpus(tmp_path)
    img = Image.fromarray(np.zeros((8, 8, 3), np.uint8))
    for i in range(2):
        img.save(tmp_path / f"good{i}.png")
    for name in corpus:
        (tmp_path / "l.txt").write_text(f"good0.png 0\ngood1.png 0\n{name} 0\n")
        src = load_list(tmp_path / "l.txt")
        ev = EvalLoader(src, 3, Preprocess(resize=(8, 8)))
        with pytest.raises(BadImageError, match=rf"{name} \(.*l\.txt line 3\).*skip_bad"):
            list(ev)
        ev.close()
        ev = EvalLoader(src, 3, Preprocess(resize=(8, 8)), skip_bad=True)
        (batch,) = list(ev)
        assert batch["mask"].tolist() == [True, True, False]
        assert len(ev.bad_images()) == 1 and name in ev.bad_images()[0]
        ev.close()


def test_skip_bad_substitutes_same_id_in_training(tmp_path):
    _broken_corpus(tmp_path)
    src = _list_with_a_bad_line(tmp_path, 3, 3, 4, "text.jpg")
    sampler = PKSampler(src.labels, 6, 3, seed=0)
    with pytest.raises(BadImageError, match=r"text\.jpg \(.*line 5\)"):
        strict = TrainLoader(src, sampler, SMALL)
        for _ in range(3):
            next(strict)
    loose = TrainLoader(src, sampler, SMALL, skip_bad=True)
    for _ in range(3):
        b = next(loose)
        lab = b["label"].reshape(2, 3)
        assert (lab == lab[:, :1]).all(), "substitute keeps the id"
    assert any("text.jpg" in s for s in loose.bad_images())
    loose.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_fuzz_decoder_mutations(data):
    """Mutated/truncated JPEG and PNG bytes either decode to uint8 HxWx3 or raise a named error."""
    rng = np.random.default_rng(1)
    img = Image.fromarray(_photo(rng, 12, 10))
    fmt = data.draw(st.sampled_from(["JPEG", "PNG"]))
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    raw = bytearray(buf.getvalue())
    for _ in range(data.draw(st.integers(0, 4))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    raw = raw[: data.draw(st.integers(0, len(raw)))]
    try:
        out = decode_image(bytes(raw), name="fuzz.bin")
    except ImageDecodeError as e:
        assert "fuzz.bin" in str(e)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3


# ---- two real processes (jax.distributed on CPU with gloo) -----------------------------------

_WORKER = (
    multiproc_util.PREAMBLE
    + r"""
import numpy as np
root = sys.argv[4]
from jaxrec.data.datasets import load_list, load_query_gallery_list
from jaxrec.data.loader import EvalLoader, TrainLoader
from jaxrec.data.sampler import PKSampler
from jaxrec.data.preprocess import Preprocess
from jaxrec.data.transforms import TrainTransform
mesh = jax.make_mesh((8,), ("data",))
src = load_list(root + "/train.txt")
sampler = PKSampler(src.labels, 4, 2, seed=9, num_shards=8)
loader = TrainLoader(src, sampler, TrainTransform(size=16, pad=2), mesh=mesh, seed=4)
batch = next(loader)
local = np.concatenate([np.asarray(s.data) for s in batch["label"].addressable_shards])
total = int(jax.jit(lambda x: x.sum())(batch["label"]))
ev = EvalLoader(load_query_gallery_list(root + "/qg.txt"), 16, Preprocess(resize=(8, 8)), mesh=mesh)
n_valid = sum(int(jax.jit(lambda m: m.sum())(b["mask"])) for b in ev)
print(json.dumps({"local": local.tolist(), "total": total, "n_valid": n_valid,
                  "shards": loader.shards}))
"""
)


def test_two_processes_load_their_own_slices(dataset, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    outs = multiproc_util.run_processes(script, str(dataset))
    src = load_list(dataset / "train.txt")
    sampler = PKSampler(src.labels, 4, 2, seed=9, num_shards=8)
    expect = src.labels[sampler.global_batch(0, 0)]
    assert outs[0]["shards"] == [0, 1, 2, 3] and outs[1]["shards"] == [4, 5, 6, 7]
    np.testing.assert_array_equal(outs[0]["local"], expect[:16])
    np.testing.assert_array_equal(outs[1]["local"], expect[16:])
    assert outs[0]["total"] == outs[1]["total"] == int(expect.sum())
    assert outs[0]["n_valid"] == outs[1]["n_valid"] == 45


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_decoder_random_bytes(raw):
    try:
        out = decode_image(raw, name="rand.bin")
    except ImageDecodeError as e:
        assert "rand.bin" in str(e) or "<bytes>" in str(e)
        return
    assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
