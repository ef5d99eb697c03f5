"""Rank-list PNG grid: real image files in, a real PNG out, border colours checked."""

import numpy as np
import pytest
from PIL import Image

from jaxrec.evaluation import ranklist as visualize


def _write_images(tmp_path, n, prefix):
    paths = []
    rng = np.random.default_rng(len(prefix))
    for i in range(n):
        h, w = (40, 60) if i % 2 else (64, 32)
        arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        path = tmp_path / f"{prefix}{i}.jpg"
        Image.fromarray(arr).save(path, quality=90)
        paths.append(str(path))
    return paths


def test_rank_list_png_size_and_border_colours(tmp_path):
    query_paths = _write_images(tmp_path, 2, "q")
    gallery_paths = _write_images(tmp_path, 5, "g")
    query_labels = [1, 2]
    gallery_labels = [1, 2, 1, 3, 2]
    indices = np.array([[0, 1, 2], [4, 3, 1]])
    scores = np.array([[0.91, 0.55, 0.40], [0.88, 0.30, 0.20]])
    out = tmp_path / "out" / "ranks.png"
    tile, border, gap, caption = 64, 4, 10, 16
    visualize.save_rank_list(
        out,
        query_paths,
        gallery_paths,
        query_labels,
        gallery_labels,
        indices,
        scores,
        tile_size=tile,
        border=border,
        gap=gap,
        caption_height=caption,
    )
    with Image.open(out) as im:
        assert im.format == "PNG"
        img = np.asarray(im.convert("RGB"))
    k = 3
    assert img.shape == (gap + 2 * (tile + caption + gap), gap + (tile + gap) * (k + 1) + gap, 3)

    def border_pixel(row, col):  # col 0 = query, 1.. = results; sample the top border middle
        x = gap if col == 0 else gap + (tile + gap) * col + gap
        y = gap + row * (tile + caption + gap)
        return tuple(img[y + 1, x + tile // 2])

    assert border_pixel(0, 0) == visualize.BLUE
    expected = [[True, False, True], [True, False, True]]  # labels: row0 1,2,1; row1 2,3,2
    for r, row in enumerate(expected):
        for c, ok in enumerate(row):
            assert border_pixel(r, c + 1) == (visualize.GREEN if ok else visualize.RED)
    # The similarity text is drawn below each tile in its border colour (anti-aliased).
    y0 = gap + tile
    for col, green in ((1, True), (2, False)):
        x0 = gap + (tile + gap) * col + gap
        box = img[y0 : y0 + caption, x0 : x0 + tile].astype(int)
        inked = (box != 255).any(axis=-1)
        assert inked.sum() > 20
        r, g = box[..., 0][inked], box[..., 1][inked]
        assert ((g > r) if green else (r > g)).all()


def test_arrays_and_errors():
    q = np.zeros((10, 10), np.float32)
    g = np.full((8, 12, 3), 200, np.uint8)
    grid = visualize.rank_list_grid([q], [[g, g]], [[True, False]], [[1.0, 0.5]], tile_size=32)
    assert grid.size == (12 + 44 * 3 + 12, 12 + 32 + 16 + 12)
    with pytest.raises(ValueError, match="one entry per row"):
        visualize.rank_list_grid([q], [[g], [g]], [[True]])
    with pytest.raises(ValueError, match="cannot read image"):
        visualize.rank_list_grid(["/nonexistent.png"], [[g]], [[True]])
