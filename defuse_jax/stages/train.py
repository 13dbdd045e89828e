"""Stage 1, train: the classifier to debug and the VAE whose latent space the search walks
(`train_models`; a user's own models are recorded, not trained: `own_model`)."""

from __future__ import annotations

from typing import Any

from defuse_jax import train_models as tm
from defuse_jax.stage_context import Context


def stage_train(ctx: Context) -> dict[str, Any]:
    cfg, ds = ctx.config, ctx.dataset
    summary: dict[str, Any] = {}
    if ctx.own_classifier is None:
        clf = tm.train_classifier(
            ds, out_dir=ctx.path("train", "classifier"), config=cfg.classifier,
            train=cfg.classifier_train, progress=cfg.progress,
        )  # fmt: skip
        ctx._models["classifier"] = clf.params
        summary["classifier_test"] = clf.metrics
    else:  # the user's: nothing to train
        summary["classifier_test"] = tm.record_own_model(
            "classifier", ctx.own_classifier, ctx.own["classifier"], ds,
            out_dir=ctx.path("train", "classifier"),
        )  # fmt: skip
        summary["own_classifier"] = ctx.own["classifier"]
    name = f" ({ctx.own['classifier']['name']})" if ctx.own_classifier is not None else ""
    ctx.log(f"classifier{name}: test accuracy {summary['classifier_test']['accuracy']:.4f}")
    if "vae" not in ctx.own_models:
        vae = tm.train_vae(ds, out_dir=ctx.path("train", "vae"), config=cfg.vae,
                           train=cfg.vae_train, progress=cfg.progress)  # fmt: skip
        ctx._models["vae"] = vae.params
        summary["vae_test"] = vae.metrics
    else:  # the user's
        summary["vae_test"] = tm.record_own_model(
            "vae", ctx.own_models["vae"], ctx.own["vae"], ds, out_dir=ctx.path("train", "vae")
        )
        summary["own_vae"] = ctx.own["vae"]
    ctx.log("VAE: test " + ", ".join(f"{k} {v:.3f}" for k, v in summary["vae_test"].items()))
    return summary
