"""Stage 3, distill: the search's error codes grouped into misclassification regions by a
mixture model (`regions`, the `defuse_jax.mixture` engine)."""

from __future__ import annotations

from typing import Any

import numpy as np

from defuse_jax import evaluation, identification, models
from defuse_jax.regions import (
    Regions,
    distill,
    no_region_note,
    not_converged_note,
    resolved_max_codes,
    save_regions,
)
from defuse_jax.stage_context import Context


def stage_distill(ctx: Context) -> dict[str, Any]:
    errors = identification.load_errors(ctx.path("search"))
    cfg = ctx.config.distill
    n = len(errors["z"])
    if n < max(cfg.min_codes, 2):
        msg = (
            f"The search found {n} errors, too few to distill regions (min_codes={cfg.min_codes}). "
            "Widen the search (--search-scale, --search-num-samples, --max-sources) and rerun."
        )
        ctx.log(msg)
        L = errors["z"].shape[1] if errors["z"].ndim == 2 else 0
        regions = Regions(
            np.zeros((0, L), np.float32), np.zeros((0, L, L), np.float32),
            np.zeros((0,), np.float32), np.full(n, -1, np.int32), [],
        )  # fmt: skip
        save_regions(regions, ctx.path("distill"))
        return {"num_regions": 0, "message": msg}
    vae, clf = ctx.model("vae"), ctx.model("classifier")
    free_dims = models.style_dims(vae)  # a conditional VAE's style: one mixture per class
    regions = distill(
        errors["z"],
        errors["source_label"],
        errors["pred_label"],
        num_classes=ctx.dataset.num_classes,
        config=cfg,
        predict_fn=lambda z: evaluation.predict(vae, clf, np.asarray(z)),
        free_dims=free_dims,
    )
    save_regions(regions, ctx.path("distill"))
    covered = int((regions.assignment >= 0).sum())
    # With max_codes=None an accelerator fits every code up to 200,000 (a CPU: 10,000). What
    # was fitted: groups too small (or too collapsed) for a mixture form no region.
    fitted = sum(f["codes"] for f in regions.fits)
    cap = resolved_max_codes(cfg)
    ctx.log(
        f"distill: {regions.num_regions} regions explain {covered} of {n} errors (mixture "
        f"fitted on {fitted} codes, max_codes {cap})"
    )
    if not regions.converged:
        ctx.log(f"distill: {not_converged_note(cfg.max_iter)}")
    empty = no_region_note(n, regions.num_regions, cfg)
    if empty:
        ctx.log(f"distill: {empty}")
    return {"num_regions": regions.num_regions, "codes_in_regions": covered,
            "codes_fitted": fitted, "max_codes": cap,
            "mixture_converged": regions.converged}  # fmt: skip
