"""Rank-list PNG grids: each row shows a query and its top-k gallery images.

A query tile has a blue border; a result tile has a green border when it is correct (same label)
and a red one when it is wrong. The similarity (and rank) is printed under each result.
Images may be file paths, PIL images or HxW(x3) arrays (uint8, or float in [0, 1]).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

GREEN = (0, 170, 0)
RED = (220, 0, 0)
BLUE = (0, 90, 220)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)

ImageLike = str | os.PathLike | Image.Image | np.ndarray


def _load(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype != np.uint8:
            arr = np.clip(np.round(arr.astype(np.float64) * 255.0), 0, 255).astype(np.uint8)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"image arrays must be HxW, HxWx1, HxWx3 or HxWx4, got {arr.shape}")
        if arr.shape[-1] == 1:
            arr = np.repeat(arr, 3, axis=-1)
        return Image.fromarray(arr[..., :3])
    try:
        with Image.open(image) as im:
            return im.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot read image {os.fspath(image)!r}: {err}") from err


def _tile(image: ImageLike, size: int, border: int, color: tuple[int, int, int]) -> Image.Image:
    """Letterbox ``image`` into a size x size tile with a coloured border of ``border`` px."""
    im = _load(image)
    inner = size - 2 * border
    scale = inner / max(im.width, im.height)
    w, h = max(1, round(im.width * scale)), max(1, round(im.height * scale))
    im = im.resize((w, h), Image.BILINEAR)
    tile = Image.new("RGB", (size, size), color)
    ImageDraw.Draw(tile).rectangle(
        [border, border, size - border - 1, size - border - 1], fill=BACKGROUND
    )
    tile.paste(im, (border + (inner - w) // 2, border + (inner - h) // 2))
    return tile


def rank_list_grid(
    queries: Sequence[ImageLike],
    results: Sequence[Sequence[ImageLike]],
    correct: Sequence[Sequence[bool]],
    scores: Sequence[Sequence[float]] | None = None,
    tile_size: int = 128,
    border: int = 5,
    gap: int = 12,
    caption_height: int = 16,
    query_captions: Sequence[str] | None = None,
) -> Image.Image:
    """Build the grid image. Row i: ``queries[i]``, then ``results[i][0..k-1]``.

    ``correct[i][r]`` picks the green/red border of result r; ``scores[i][r]`` is printed under
    it (with its rank). Rows may have different lengths; the grid is as wide as the longest.
    """
    if not (len(queries) == len(results) == len(correct)):
        raise ValueError(
            f"queries, results and correct need one entry per row, got {len(queries)}, "
            f"{len(results)} and {len(correct)}"
        )
    if scores is not None and len(scores) != len(queries):
        raise ValueError(f"scores needs {len(queries)} rows, got {len(scores)}")
    if not queries:
        raise ValueError("no queries to draw")
    if 2 * border >= tile_size:
        raise ValueError(f"border {border} is too wide for tiles of {tile_size} px")
    k = max(len(r) for r in results)
    row_h = tile_size + caption_height
    width = gap + (tile_size + gap) * (k + 1) + gap
    height = gap + len(queries) * (row_h + gap)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    for i, (query, row) in enumerate(zip(queries, results, strict=True)):
        if len(correct[i]) != len(row) or (scores is not None and len(scores[i]) != len(row)):
            raise ValueError(f"row {i}: results, correct and scores must have the same length")
        y = gap + i * (row_h + gap)
        canvas.paste(_tile(query, tile_size, border, BLUE), (gap, y))
        caption = query_captions[i] if query_captions is not None else "query"
        draw.text((gap + 2, y + tile_size + 2), caption, fill=TEXT, font=font)
        for r, item in enumerate(row):
            x = gap + (tile_size + gap) * (r + 1) + gap
            color = GREEN if correct[i][r] else RED
            canvas.paste(_tile(item, tile_size, border, color), (x, y))
            text = f"#{r + 1}"
            if scores is not None:
                text += f": {float(scores[i][r]):.3f}"
            draw.text((x + 2, y + tile_size + 2), text, fill=color, font=font)
    return canvas


def save_rank_list(
    path: str | os.PathLike,
    query_images: Sequence[ImageLike],
    gallery_images: Sequence[ImageLike],
    query_labels: Sequence[int],
    gallery_labels: Sequence[int],
    indices: np.ndarray,
    scores: np.ndarray | None = None,
    rows: Sequence[int] | None = None,
    **grid_kwargs,
) -> Image.Image:
    """Draw ranked retrieval results and write them as a PNG.

    ``indices[q]`` / ``scores[q]`` are the ranked gallery indices and similarities of query q
    (e.g. from :func:`jaxrec.evaluation.retrieval.topk_neighbors`); ``rows`` selects which
    queries to draw (default: all). A result is correct when its gallery label equals the
    query label.
    """
    indices = np.asarray(indices)
    rows = list(range(indices.shape[0])) if rows is None else list(rows)
    gl = np.asarray(gallery_labels).reshape(-1)
    ql = np.asarray(query_labels).reshape(-1)
    for q in rows:
        if not 0 <= q < indices.shape[0]:
            raise ValueError(f"query row {q} is out of range [0, {indices.shape[0]})")
    grid = rank_list_grid(
        [query_images[q] for q in rows],
        [[gallery_images[g] for g in indices[q]] for q in rows],
        [[bool(gl[g] == ql[q]) for g in indices[q]] for q in rows],
        None if scores is None else [np.asarray(scores)[q] for q in rows],
        query_captions=[f"query {q} (label {ql[q]})" for q in rows],
        **grid_kwargs,
    )
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    grid.save(path, format="PNG")
    return grid
