"""Stage 5, correct: the classifier fine-tuned on samples of the labeled regions while keeping
its accuracy on held-out data (`correction`, `correction_selection`, `region_overlap`)."""

from __future__ import annotations

import time
from typing import Any

import jax

from defuse_jax import own_model, region_overlap
from defuse_jax.correction import fine_tune
from defuse_jax.files import prune_dirs, read_json
from defuse_jax.regions import load_regions
from defuse_jax.stage_context import Context
from defuse_jax.stages.label import read_answers


def _correction_runs(ctx: Context) -> str | None:
    """The correction's runs directory for the label stage as it stands (`RunDir.correction_runs`:
    keyed by its completion, so the runs are reused while it and everything upstream stand, and
    a redo upstream starts afresh); the runs of earlier completions can never be reused and are
    removed. None (runs inside correct/, not reused) for a label record without an id."""
    label_id = read_json(ctx.dir.record("label")).get("id")
    if not label_id:
        return None
    prune_dirs(ctx.dir.correction_runs(), keep=label_id)
    return ctx.dir.correction_runs(label_id)


def stage_correct(ctx: Context) -> dict[str, Any]:
    cfg = ctx.config.correct
    labels = {k: v for k, v in read_answers(ctx).items() if v is not None}
    if not labels:
        msg = "No region is labeled (all skipped, or no regions): correction skipped."
        ctx.log(msg)
        return {"skipped": True, "reason": msg}
    ds = ctx.dataset
    t0 = time.perf_counter()
    regions = load_regions(ctx.path("distill"))
    overlap = region_overlap.overlap_summary(
        regions, labels, tau=cfg.tau, key=jax.random.fold_in(jax.random.key(cfg.seed), 2)
    )
    result = fine_tune(
        ctx.model("classifier"),
        ctx.model("vae"),
        regions,
        labels,
        x_train=ds.x_train,
        y_train=ds.y_train,
        x_val=ds.x_val,
        y_val=ds.y_val,
        config=cfg,
        out_dir=ctx.path("correct", "classifier"),
        min_error_rate=ctx.config.distill.min_error_rate,
        runs_dir=_correction_runs(ctx),
        progress=ctx.config.progress,
    )
    ctx._models["corrected"] = result.params
    if ctx.own_classifier is not None:  # also in the user's own structure, to load back
        own_model.save_user_params(result.params, ctx.path("correct", "classifier", "own_params"))
    chosen = result.selection and result.selection["chosen"]
    if chosen is None:
        ctx.log(f"correct: fine-tuned on {len(labels)} labeled regions (lambda={cfg.lam})")
    elif result.selection["kept_original"]:
        ctx.log(
            f"correct: no epoch of lambda in {list(cfg.lams)} fixed the watched regions "
            "within the bounds on held-out data: the original classifier is kept"
        )
    else:
        ctx.log(
            f"correct: fine-tuned on {len(labels)} labeled regions; chose lambda="
            f"{chosen['lam']:g}, epoch {chosen['epoch']} of {cfg.epochs} on validation data"
        )
    return {"skipped": False, "reason": None, "num_regions": len(labels),
            "seconds": time.perf_counter() - t0, "history": result.history,
            "selection": result.selection, "control": result.control is not None,
            "overlap": {str(k): v for k, v in overlap.items()}}  # fmt: skip
