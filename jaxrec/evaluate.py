"""`python evaluate.py --workdir`: evaluate a training run's checkpoint with its own config.

Needs no optimizer: the model variables are read from the checkpoint (read-only; an unreadable
best checkpoint falls back to the newest readable one with a warning, and nothing in the
workdir is moved). Writes the metrics as JSON and a rank-list picture; when the query list holds
classes absent from the gallery, also the open-set figures (`open_set.py`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

from jaxrec.evaluation.evaluator import RetrievalEvaluator
from jaxrec.evaluation.open_set import open_set_report
from jaxrec.evaluation.ranklist import save_rank_list
from jaxrec.evaluation.retrieval import topk_neighbors
from jaxrec.parallel import make_mesh
from jaxrec.training.checkpoint import restore_variables
from jaxrec.training.workdir import Workdir


def evaluate_workdir(
    workdir: str,
    which: str = "best",
    step: int | None = None,
    output: str | None = None,
    num_visualize: int = 8,
) -> dict[str, Any]:
    """Evaluate a checkpoint of a training run; returns {"step", "metrics", "json", "png",
    "source"}. Writes `eval_step{N}.json` and (num_visualize > 0) `ranklist_step{N}.png` into
    `output` (default WORKDIR/eval)."""
    from jaxrec.models import build_model

    workdir = os.path.abspath(workdir)
    run, variables, n, desc = restore_variables(workdir, which, step)
    mesh = make_mesh()
    model = build_model(run.arch, **run.model_options(training=False))
    evaluator = RetrievalEvaluator.for_model(run.eval, model, mesh)
    res = evaluator.evaluate(variables, return_features=True)
    metrics = res["metrics"]
    q, g = evaluator.query, evaluator.gallery
    open_set = open_set_report(
        res["query_features"], q.labels, res["gallery_features"], g.labels, q.uids, g.uids, mesh
    )  # None unless the query list holds classes absent from the gallery
    out_dir = output or str(Workdir(workdir).eval)
    result = {"step": n, "metrics": metrics, "json": None, "png": None, "source": desc}
    result["open_set"] = open_set
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        jpath = os.path.join(out_dir, f"eval_step{n}.json")
        with open(jpath, "w") as f:
            extra = {} if open_set is None else {"open_set": open_set}
            json.dump({"workdir": workdir, "step": n, "metrics": metrics, **extra}, f, indent=2)
            f.write("\n")
        result["json"] = jpath
        if num_visualize > 0:
            png = os.path.join(out_dir, f"ranklist_step{n}.png")
            result["png"] = draw_ranklist(evaluator, res, png, num_visualize)
    return result


def draw_ranklist(evaluator: RetrievalEvaluator, res: dict, path: str, num: int, k: int = 5) -> str:
    """Rank-list PNG of `num` evenly spaced queries and their top-k gallery items."""
    from jaxrec.data.loader import to_rgb_array

    q, g = evaluator.query, evaluator.gallery
    rows = np.unique(np.linspace(0, len(q) - 1, num).round().astype(np.int64))
    has_ids = q.uids is not None and g.uids is not None
    scores, idx = topk_neighbors(
        res["query_features"][rows],
        res["gallery_features"],
        min(k, len(g)),
        query_labels=q.labels[rows],
        gallery_labels=g.labels,
        query_ids=q.uids[rows] if has_ids else None,
        gallery_ids=g.uids if has_ids else None,
        mesh=make_mesh(jax.local_devices()),  # process 0 alone draws: no cross-host collective
    )

    def load(src, i):
        return to_rgb_array(src.read(int(i)), src.paths[int(i)])

    gallery_images = {int(j): load(g, j) for j in np.unique(idx)}
    save_rank_list(
        path, [load(q, i) for i in rows], gallery_images, q.labels[rows], g.labels, idx, scores
    )
    return path
