"""Stage 2, search: natural-looking inputs the classifier gets wrong, found in the VAE's latent
space around test points (`identification`, the `defuse_jax.search` engine)."""

from __future__ import annotations

from typing import Any

from defuse_jax import identification
from defuse_jax.stage_context import Context
from defuse_jax.stages.label import oracle_shift_groups


def stage_search(ctx: Context) -> dict[str, Any]:
    # The validity model is the oracle, trained here before the label stage that also uses it
    # (in label/oracle/, which the label stage then reuses): each of its shift groups must
    # still read the source class.
    validity = oracle_shift_groups(ctx) if ctx.config.search.validity == "oracle" else None
    vae = ctx.model("vae")
    result, idx, choice = identification.run_search(
        ctx.dataset,
        vae,
        ctx.model("classifier"),
        search=ctx.config.search,
        max_sources=ctx.config.max_sources,
        seed=ctx.config.data.seed,
        validity=validity,
        scales=identification.candidate_scales(ctx.config.search_scales, vae),
    )
    if choice is not None:
        ctx.log(f"search: {choice.describe()}")
    summary = identification.save_search(result, idx, ctx.path("search"), scale_choice=choice)
    ctx.log(
        f"search: {summary['num_errors_found']} errors kept ({summary['num_flips']} flips) from "
        f"{summary['num_samples_evaluated']} samples around {summary['num_sources_used']} sources "
        f"in {summary['wall_time_s']:.1f}s"
    )
    note = identification.thin_search_note(summary, ctx.config.search)
    if note:
        ctx.log(f"search: {note}")
    return summary
