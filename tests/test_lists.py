"""jaxrec.data.lists: the one image-extension list and list-file reader (extract, search, data)."""

from __future__ import annotations

import pytest

from jaxrec.data import datasets, lists
from jaxrec.errors import DatasetError, JaxrecError


def _touch(path, data=b"x"):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_one_extension_list_and_one_parser():
    assert datasets.IMAGE_EXTENSIONS is lists.IMAGE_EXTENSIONS
    assert datasets.parse_label_lines is lists.parse_label_lines
    assert datasets.DatasetError is DatasetError and issubclass(DatasetError, JaxrecError)
    assert all(e == e.lower() and e.startswith(".") for e in lists.IMAGE_EXTENSIONS)
    assert lists.is_image_path("a/B.JPG") and lists.is_image_path("x.webp")
    assert not lists.is_image_path(".hidden.png") and not lists.is_image_path("notes.md")


def test_folder_scan_sorted_relative_and_skips_hidden(tmp_path):
    for name in ["b/2.png", "a/1.JPG", "c.jpeg", ".cache/x.png", "a/.y.png", "notes.txt"]:
        _touch(tmp_path / name)
    got = lists.resolve_images(tmp_path)
    assert [n for n, _ in got] == ["a/1.JPG", "b/2.png", "c.jpeg"]
    assert got[0][1] == str(tmp_path / "a" / "1.JPG")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no images found under folder .*empty"):
        lists.resolve_images(tmp_path / "empty")
    with pytest.raises(DatasetError, match="nowhere.*does not exist"):
        lists.resolve_images(tmp_path / "nowhere")


def test_image_list_comments_label_lines_and_single_image(tmp_path):
    _touch(tmp_path / "imgs" / "a.jpg")
    _touch(tmp_path / "imgs" / "with space.png")
    _touch(tmp_path / "b.png")
    lst = tmp_path / "imgs" / "q.list"
    lst.write_text(
        "\ufeff# a comment\n\na.jpg 3 17\nwith space.png\n../b.png\n" + str(tmp_path / "b.png")
    )
    got = lists.resolve_images(lst)
    assert [n for n, _ in got] == ["a.jpg", "with space.png", "../b.png", str(tmp_path / "b.png")]
    assert got[0][1] == str(tmp_path / "imgs" / "a.jpg")
    assert lists.resolve_images(tmp_path / "b.png") == [("b.png", str(tmp_path / "b.png"))]
    # A list with another suffix is recognised as text; a binary file is taken as one image.
    other = tmp_path / "list.dat"
    other.write_text("imgs/a.jpg\n")
    assert lists.resolve_images(other) == [("imgs/a.jpg", str(tmp_path / "imgs" / "a.jpg"))]
    blob = _touch(tmp_path / "photo.raw", b"\x00\x01\xff")
    assert lists.resolve_images(blob) == [("photo.raw", str(blob))]
    blank = tmp_path / "blank.txt"
    blank.write_text("# nothing\n\n")
    with pytest.raises(DatasetError, match="blank.txt.*no image paths"):
        lists.resolve_images(blank)
    bad = _touch(tmp_path / "latin1.txt", "caf\xe9.png\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="latin1.txt: not a UTF-8 text file"):
        lists.read_image_list(bad)


def test_gallery_list(tmp_path):
    _touch(tmp_path / "g" / "a.jpg")
    _touch(tmp_path / "g" / "b.jpg")
    lst = tmp_path / "g" / "gallery.txt"
    lst.write_text("\ufeffa.jpg\tred can\textra\n\nb.jpg\tblue box\n")
    items = lists.read_gallery_list(lst)
    assert [(i.rel_path, i.label, i.line, i.lineno) for i in items] == [
        ("a.jpg", "red can", "a.jpg\tred can\textra", 1),
        ("b.jpg", "blue box", "b.jpg\tblue box", 3),
    ]
    assert items[0].path == str(tmp_path / "g" / "a.jpg")
    # Paths relative to another image root; a space delimiter (PaddleClas `path label id`).
    (tmp_path / "sp.txt").write_text("g/a.jpg 7 0\n")
    (item,) = lists.read_gallery_list(tmp_path / "sp.txt", image_root=tmp_path, delimiter=" ")
    assert (item.label, item.path) == ("7", str(tmp_path / "g" / "a.jpg"))
    lst.write_text("a.jpg\tred\nb.jpg red\n")
    with pytest.raises(DatasetError, match=r"gallery.txt:2: expected 'path'\\t'label'"):
        lists.read_gallery_list(lst)
    lst.write_text("a.jpg\tred\nnope.jpg\tx\nnope2.jpg\ty\n")
    with pytest.raises(DatasetError, match=r"gallery.txt:2: image .*nope.jpg not found \(and 1"):
        lists.read_gallery_list(lst)
    assert len(lists.read_gallery_list(lst, check_exists=False)) == 3
    with pytest.raises(DatasetError, match="list file .*missing.txt does not exist"):
        lists.read_gallery_list(tmp_path / "missing.txt")
