"""`python evaluate.py --workdir`: evaluate a training run's checkpoint with its own config.

Needs no optimizer: the model variables are read from the checkpoint (read-only; an unreadable
best checkpoint falls back to the newest readable one with a warning, and nothing in the
workdir is moved). Writes the metrics as JSON and a rank-list picture; when the query list holds
classes absent from the gallery, also the open-set figures (`open_set.py`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxrec.config import Run
from jaxrec.data.loader import to_rgb_array
from jaxrec.evaluation.evaluator import RetrievalEvaluator
from jaxrec.evaluation.open_set import open_set_report
from jaxrec.evaluation.ranklist import save_rank_list
from jaxrec.evaluation.retrieval import topk_neighbors
from jaxrec.models import build_model
from jaxrec.parallel import make_mesh
from jaxrec.training.checkpoint import restore_variables, steps_in
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
    workdir = os.path.abspath(workdir)
    run, variables, n, desc = restore_variables(workdir, which, step)
    evaluator = _evaluator(run)
    return _evaluate(workdir, evaluator, variables, n, desc, output, num_visualize)


def _evaluator(run: Run) -> RetrievalEvaluator:
    model = build_model(run.arch, **run.model_options(training=False))
    return RetrievalEvaluator.for_model(run.eval, model, make_mesh())


def _evaluate(
    workdir: str,
    evaluator: RetrievalEvaluator,
    variables: Any,
    n: int,
    desc: str,
    output: str | None,
    num_visualize: int,
) -> dict[str, Any]:
    res = evaluator.evaluate(variables, return_features=True)
    metrics = res["metrics"]
    q, g = evaluator.query, evaluator.gallery
    feats_q, feats_g = res["query_features"], res["gallery_features"]
    open_set = open_set_report(
        feats_q, q.labels, feats_g, g.labels, q.uids, g.uids, evaluator.mesh
    )  # None unless the query list holds classes absent from the gallery
    out_dir = output or str(Workdir(workdir).eval)
    result = {"step": n, "metrics": metrics, "json": None, "png": None, "source": desc}
    result["open_set"] = open_set
    if jax.process_index() == 0:
        os.makedirs(out_dir, exist_ok=True)
        jpath = os.path.join(out_dir, f"eval_step{n}.json")
        tmp = f"{jpath}.tmp"
        with open(tmp, "w") as f:
            extra = {} if open_set is None else {"open_set": open_set}
            json.dump({"workdir": workdir, "step": n, "metrics": metrics, **extra}, f, indent=2)
            f.write("\n")
        os.replace(tmp, jpath)
        result["json"] = jpath
        if num_visualize > 0:
            png = os.path.join(out_dir, f"ranklist_step{n}.png")
            result["png"] = draw_ranklist(evaluator, res, png, num_visualize)
    return result


def follow_workdir(
    workdir: str,
    report: Callable[[dict[str, Any]], None],
    poll_seconds: float = 10.0,
    idle_seconds: float = 600.0,
    output: str | None = None,
    num_visualize: int = 0,
) -> list[dict[str, Any]]:
    """Evaluate each new checkpoint of a (running) training run as it appears, like a
    TensorBoard beside it: the newest one in WORKDIR/checkpoints, again whenever a newer one is
    saved (checkpoints saved while an evaluation runs are skipped for the newest). `report` gets
    each result. Returns after `idle_seconds` without a new checkpoint (the run ended or
    stalled). The evaluator is built (compiled) once."""
    workdir = os.path.abspath(workdir)
    done, evaluator, results = -1, None, []
    last_new = time.monotonic()
    while True:
        steps = steps_in(workdir, "latest")
        if steps and steps[-1] > done:
            run, variables, n, desc = restore_variables(workdir, "latest")
            last_new = time.monotonic()
            if n > done:
                evaluator = evaluator or _evaluator(run)
                res = _evaluate(workdir, evaluator, variables, n, desc, output, num_visualize)
                report(res)
                results.append(res)
                done = n
                continue
        if time.monotonic() - last_new > idle_seconds:
            return results
        time.sleep(poll_seconds)


def draw_ranklist(evaluator: RetrievalEvaluator, res: dict, path: str, num: int, k: int = 5) -> str:
    """Rank-list PNG of `num` evenly spaced queries and their top-k gallery items."""
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
