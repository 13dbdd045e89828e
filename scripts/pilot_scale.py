"""The scale the search stage's pilot picks on finished runs (`search.scale_choice`), without
redoing their stages: the pilot a conditional VAE's search runs (or `--search-scales`).

    python scripts/pilot_scale.py runs/f10mv/seed0 runs/f10mv/seed1

Each run's pilot reads its VAE, classifier and oracle (validity model) as its search stage does,
with the candidates `--scales` (default: `identification.CONDITIONAL_SCALES`).
"""

from __future__ import annotations

import argparse
import os

import jax

from defuse_jax import identification, models, stage_context
from defuse_jax import train_models as tm
from defuse_jax.search.scale_choice import choose_scale


def pilot(run_dir: str, scales: tuple[float, ...]) -> str:
    """The pilot's choice on `run_dir`, described."""
    ctx = stage_context.of_run(run_dir)  # the run's models as its stages load them
    if ctx.config.max_sources is not None:
        raise SystemExit(f"{run_dir} searched a subset of its sources (max_sources); not handled.")
    config, ds, vae, clf = ctx.config, ctx.dataset, ctx.model("vae"), ctx.model("classifier")
    y0 = ds.y_test.astype("int32")
    z0 = identification.encode_sources(vae, ds.x_test, y0)
    dtype = config.search.compute_dtype
    decode_fn, classify_fn = models.search_functions(vae, clf, compute_dtype=dtype)
    validity_fn = None
    if config.search.validity == "oracle":
        # as the search stage reads it: each shift group of the oracle
        groups = tm.load_shift_groups(os.path.join(run_dir, "label", "oracle"))
        validity_fn = models.validity_function(groups, compute_dtype=dtype)
    choice = choose_scale(
        decode_fn, classify_fn, z0, y0, key=jax.random.key(config.search.seed),
        config=config.search, scales=scales, seed=config.data.seed, validity_fn=validity_fn,
        free_dims=models.style_dims(vae),
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
