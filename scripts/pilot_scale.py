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

from defuse_jax import identification, models
from defuse_jax import train_models as tm
from defuse_jax.data import load_dataset
from defuse_jax.run_config import load_run_config
from defuse_jax.search.scale_choice import choose_scale


def pilot(run_dir: str, scales: tuple[float, ...]) -> str:
    """The pilot's choice on `run_dir`, described."""
    config = load_run_config(run_dir)
    if config is None:
        raise SystemExit(f"{run_dir} holds no run (no config.json).")
    if config.max_sources is not None:
        raise SystemExit(f"{run_dir} searched a subset of its sources (max_sources); not handled.")
    ds = load_dataset(config.data)
    vae = tm.load_trained(os.path.join(run_dir, "train", "vae"))[0]
    clf = tm.load_trained(os.path.join(run_dir, "train", "classifier"))[0]
    y0 = ds.y_test.astype("int32")
    z0 = identification.encode_sources(vae, ds.x_test, y0)
    dtype = config.search.compute_dtype
    decode_fn, classify_fn = models.search_functions(vae, clf, compute_dtype=dtype)
    validity_fn = None
    if config.search.validity == "oracle":
        oracle = tm.load_ensemble(os.path.join(run_dir, "label", "oracle"))
        _, validity_fn = models.search_functions(vae, oracle, compute_dtype=dtype)
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
