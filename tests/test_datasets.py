"""Dataset sources: list parsing (fuzzed), relabel, missing files, folders, tfds."""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from jaxrec.data.datasets import (
    DatasetError,
    load_image_folder,
    load_list,
    load_query_gallery_list,
    load_tfds,
    parse_label_lines,
    relabel_map,
)
from jaxrec.data.image import decode_image

DEMO = Path(__file__).parents[1] / "data" / "demo"


def _png(path: Path, value: int = 0, size=(6, 5)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full(size + (3,), value, np.uint8)).save(path)


def test_load_list_and_relabel(tmp_path):
    for n in range(4):
        _png(tmp_path / "img" / f"{n}.png", n)
    (tmp_path / "list.txt").write_text("img/0.png 10\nimg/1.png 3\n\nimg/2.png 7\nimg/3.png 3\n")
    src = load_list(tmp_path / "list.txt")
    np.testing.assert_array_equal(src.labels, [10, 3, 7, 3])
    assert src.labels.dtype == np.int64
    np.testing.assert_array_equal(src.lines, [1, 2, 4, 5])  # blank line skipped, numbering kept
    assert src.paths[2] == str(tmp_path / "img" / "2.png")
    rel = load_list(tmp_path / "list.txt", image_root=tmp_path, relabel=True)
    np.testing.assert_array_equal(rel.labels, [2, 0, 1, 0])  # sorted-unique map
    assert relabel_map(np.array([5, 1, 9])) == {1: 0, 5: 1, 9: 2}
    assert decode_image(src.read(1))[0, 0, 0] == 1
    assert "line 4" in src.describe(2)
    sub = src.subset([3, 0])
    np.testing.assert_array_equal(sub.labels, [3, 10])
    assert decode_image(sub.read(0))[0, 0, 0] == 3


def test_delimiter_option(tmp_path):
    _png(tmp_path / "a b.png")
    (tmp_path / "l.txt").write_bytes("\ufeffa b.png\t4\r\n".encode())  # BOM, CRLF
    assert load_list(tmp_path / "l.txt", delimiter="\t").labels.tolist() == [4]
    with pytest.raises(DatasetError, match=r"l\.txt:1: label 'b\.png\\t4' is not an integer"):
        load_list(tmp_path / "l.txt")  # default single space


@pytest.mark.parametrize(
    "text, match",
    [
        ("a.png 1\nb.png x\n", r":2: label 'x' is not an integer"),
        ("a.png 1\nb.png\n", r":2: expected 'path label'"),
        ("a.png  1\n", r":1: empty label field .* two delimiters in a row"),
        ("a.png 1.5\n", r":1: label '1.5' is not an integer"),
        ("a.png 99999999999999999999\n", r":1: label 99999999999999999999 does not fit"),
        ("\n\n", r"no entries"),
    ],
)
def test_malformed_lines_name_file_and_line(tmp_path, text, match):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "bad.txt").write_text(text)
    with pytest.raises(DatasetError, match=match) as e:
        load_list(tmp_path / "bad.txt")
    assert "bad.txt" in str(e.value)


def test_all_missing_files_reported(tmp_path):
    _png(tmp_path / "ok.png")
    lines = ["ok.png 0"] + [f"missing{i}.png {i}" for i in range(25)]
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError) as e:
        load_list(tmp_path / "l.txt")
    msg = str(e.value)
    assert "25 of 26 images" in msg and "line 2: " in msg and "missing19.png" in msg
    assert "and 5 more" in msg and "missing24.png" not in msg
    with pytest.raises(DatasetError, match="does not exist"):
        load_list(tmp_path / "nope.txt")
    with pytest.raises(DatasetError, match="image_root"):
        load_list(tmp_path / "l.txt", image_root=tmp_path / "nope")
    assert len(load_list(tmp_path / "l.txt", check_files=False)) == 26


def test_query_gallery_list(tmp_path):
    for n in range(3):
        _png(tmp_path / f"{n}.png")
    (tmp_path / "qg.txt").write_text("0.png 5 0\n1.png\t\t5   1\n  2.png 6 2  \n")
    src = load_query_gallery_list(tmp_path / "qg.txt")
    np.testing.assert_array_equal(src.labels, [5, 5, 6])
    np.testing.assert_array_equal(src.uids, [0, 1, 2])
    (tmp_path / "two.txt").write_text("0.png 5\n1.png 6\n")
    assert load_query_gallery_list(tmp_path / "two.txt").uids is None
    (tmp_path / "mixed.txt").write_text("0.png 5 0\n1.png 6\n")
    with pytest.raises(DatasetError, match=r"mixed\.txt:2: .*third column"):
        load_query_gallery_list(tmp_path / "mixed.txt")
    (tmp_path / "baduid.txt").write_text("0.png 5 zero\n")
    with pytest.raises(DatasetError, match=r":1: unique id 'zero'"):
        load_query_gallery_list(tmp_path / "baduid.txt")


def test_image_folder(tmp_path):
    _png(tmp_path / "zebra" / "b.png")
    _png(tmp_path / "zebra" / "a.jpg.png")
    _png(tmp_path / "apple" / "x.PNG")
    (tmp_path / "apple" / ".hidden.png").write_bytes(b"")
    (tmp_path / "apple" / "notes.txt").write_text("hi")
    src = load_image_folder(tmp_path)
    assert src.class_names == ("apple", "zebra")
    np.testing.assert_array_equal(src.labels, [0, 1, 1])
    assert [Path(p).name for p in src.paths] == ["x.PNG", "a.jpg.png", "b.png"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"without images: \['empty'\]"):
        load_image_folder(tmp_path)
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_image_folder(tmp_path / "apple")


def test_shipped_demo_data():
    train = load_list(DEMO / "train_list.txt", DEMO)
    qg = load_query_gallery_list(DEMO / "query_gallery_list.txt", DEMO)
    assert len(train) == 1800 and sorted(set(train.labels.tolist())) == [0, 1, 2, 3, 4, 5]
    assert len(qg) == 400 and sorted(set(qg.labels.tolist())) == [6, 7, 8, 9]
    np.testing.assert_array_equal(qg.uids, np.arange(400))
    img = decode_image(train.read(0))
    assert img.shape == (28, 28, 3) and img.dtype == np.uint8
    assert load_image_folder(DEMO / "images" / "train").labels.tolist() == train.labels.tolist()


# ---- tfds (a real array_record dataset built locally; no network, no TensorFlow) -----------


@functools.cache
def _tiny_builder_class():
    """Defined once: tfds registers builder classes by name at class creation."""
    import tensorflow_datasets as tfds

    class JaxrecTinyImages(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                        "label": tfds.features.ClassLabel(names=["a", "b", "c"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(7):
                buf = io.BytesIO()
                Image.fromarray(np.full((5, 4, 3), 30 * i, np.uint8)).save(buf, format="PNG")
                yield i, {"image": buf.getvalue(), "label": i % 3}

    return JaxrecTinyImages


def _build_tiny_tfds(data_dir: Path) -> None:
    _tiny_builder_class()(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


def test_tfds_source(tmp_path):
    _build_tiny_tfds(tmp_path)
    src = load_tfds("jaxrec_tiny_images", "train", data_dir=tmp_path)
    assert len(src) == 7 and src.class_names == ("a", "b", "c")
    seen = {}
    for i in range(7):
        raw = src.read(i)
        assert isinstance(raw, bytes)  # undecoded: the pipeline decodes like files
        value = int(decode_image(raw)[0, 0, 0])
        seen[value // 30] = int(src.labels[i])
    assert seen == {i: i % 3 for i in range(7)}
    with pytest.raises(DatasetError, match="no feature 'camera'"):
        load_tfds("jaxrec_tiny_images", "train", data_dir=tmp_path, uid_key="camera")
    with pytest.raises(DatasetError, match="is not prepared in data_dir .*tfds build jaxrec_tiny"):
        load_tfds("jaxrec_tiny_images", "train", data_dir=tmp_path / "elsewhere")
    with pytest.raises(DatasetError, match="split 'validation' could not be opened") as err:
        load_tfds("jaxrec_tiny_images", "validation", data_dir=tmp_path)
    assert "\n" not in str(err.value)


def test_tfds_source_through_threaded_loader(tmp_path):
    from jaxrec.data.loader import EvalLoader
    from jaxrec.data.preprocess import Preprocess

    _build_tiny_tfds(tmp_path)
    src = load_tfds("jaxrec_tiny_images", "train", data_dir=tmp_path)
    with EvalLoader(src, 4, Preprocess(resize=(6, 6)), num_workers=4) as ev:
        batches = list(ev)
    images = np.concatenate([b["image"] for b in batches])[:7]
    for i in range(7):
        np.testing.assert_array_equal(images[i], decode_image(src.read(i))[0, 0, 0])


# ---- fuzzing ---------------------------------------------------------------------------------

_token = st.text(st.characters(blacklist_categories=("Cs",)), min_size=0, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.lists(_token, min_size=0, max_size=4).map(" ".join), max_size=6))
def test_fuzz_parser_only_raises_dataset_error(lines):
    for delim in (" ", None):
        try:
            paths, labels, uids, nums = parse_label_lines(
                lines, "fuzz.txt", delimiter=delim, max_used_fields=3 if delim is None else 2
            )
        except DatasetError as e:
            assert "fuzz.txt" in str(e)
            continue
        assert len(paths) == len(labels) == len(nums)
        assert all(isinstance(v, int) for v in labels)
        assert uids is None or len(uids) == len(paths)


_path = st.text(st.sampled_from("abcXYZ019_-./é"), min_size=1, max_size=10)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_path, st.integers(-(2**63), 2**63 - 1)), min_size=1, max_size=8))
def test_fuzz_parser_round_trip(rows):
    text = [f"{p} {v}" for p, v in rows]
    paths, labels, _, nums = parse_label_lines(text, "rt.txt")
    assert paths == [p for p, _ in rows] and labels == [v for _, v in rows]
    assert nums == list(range(1, len(rows) + 1))


def test_tfds_missing_package_says_how_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # makes the import fail
    with pytest.raises(DatasetError, match=r'pip install -e "\.\[tfds\]"'):
        load_tfds("mnist", "train")
