"""The scale the search stage's pilot picks on finished runs (`search.scale_choice`), without
redoing their stages: the pilot a conditional VAE's search runs (or `--search-scales`).

    python scripts/pilot_scale.py runs/f10mv/seed0 runs/f10mv/seed1

Each run's pilot reads its VAE, classifier and oracle (validity model) as its search stage does,
with the candidates `--scales` (default: `identification.CONDITIONAL_SCALES`).
"""

from __future__ import annotations

import argparse
import os

from defuse_jax import identification, stage_context
from defuse_jax import train_models as tm
from defuse_jax.search.scale_choice import choose_scale


def pilot(run_dir: str, scales: tuple[float, ...]) -> str:
    """The pilot's choice on `run_dir`, described."""
    ctx = stage_context.of_run(run_dir)  # the run's models as its stages load them
    config = ctx.config
    validity = None
    if config.search.validity == "oracle":  # as the search stage reads it: each shift group
        validity = tm.load_shift_groups(os.path.join(run_dir, "label", "oracle"))
    # The sources, functions and validity model as the search stage builds them.
    inputs = identification.search_inputs(
        ctx.dataset, ctx.model("vae"), ctx.model("classifier"), search=config.search,
        max_sources=config.max_sources, seed=config.data.seed, validity=validity,
    )  # fmt: skip
    choice = choose_scale(
        inputs.decode_fn, inputs.classify_fn, inputs.z0, inputs.y0, config=config.search,
        scales=scales, seed=config.data.seed, **inputs.kwargs,
    )  # fmt: skip
    return choice.describe()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="finished run directories")
    p.add_argument("--scales", nargs="+", type=float, default=identification.CONDITIONAL_SCALES)
    args = p.parse_args()
    for run in args.runs:
        print(f"{run}: {pilot(run, tuple(args.scales))}")


if __name__ == "__main__":
    main()
