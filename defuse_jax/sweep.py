"""`defuse-jax sweep`: a grid over latent-search settings on a trained run, as one table.

For every setting (perturbation distribution, scale, samples per source, mode, validity model)
it records the errors found (flips, and the codes kept), the distinct regions a fast mixture finds
in the kept codes, the bug yield (the share of kept codes an evaluation-only judge still reads as
their source class, `bug_yield`), errors per million evaluated samples, throughput and timings.
Settings that differ only in scale run as one compiled program (`latent_search_sweep`); every
other axis is a separate call.
Writes `sweep.csv`, `sweep.json` and `sweep.png` (errors per million and regions against scale).

    defuse-jax sweep --out runs/digits --scales 0.25 0.5 1 2 --modes sample gradient
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from defuse_jax import flags
from defuse_jax.regions import DistillConfig, distill
from defuse_jax.results_table import cell, write_results
from defuse_jax.search import SearchConfig, SearchResult, latent_search, latent_search_sweep
from defuse_jax.search.config import DISTRIBUTIONS, MODES, VALIDITIES
from defuse_jax.search.perturb import SCALED_DISTRIBUTIONS

FAST_DISTILL = DistillConfig(n_components=20, max_iter=200)
COLUMNS = (
    "mode", "distribution", "scale", "samples_per_source", "validity", "sources_used",
    "samples_evaluated", "flips", "errors_kept", "regions", "bug_yield", "errors_per_million",
    "throughput_samples_per_s",
    "run_s", "first_call_s", "compile_s", "settings_in_program", "distill_s",
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class SweepGrid:
    """The settings to sweep (their product, minus axes a setting does not use).

    Attributes:
      distributions: "sample"-mode perturbation laws (the other modes have none).
      scales: perturbation scales (gaussian / laplace scale; "gradient": initial jitter). Laws
        and modes without a scale ("uniform_ball", "beta_offset", "iterative") run once.
      samples: latent codes evaluated per source; "iterative" / "gradient" run
        ceil(samples / num_rounds) chains of num_rounds rounds.
      modes: search modes.
      validities: `SearchConfig.validity` values ("oracle" needs the run's oracle).
    """

    distributions: tuple[str, ...] = ("gaussian", "laplace", "beta_offset")
    scales: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    samples: tuple[int, ...] = (32, 100)
    modes: tuple[str, ...] = ("sample", "gradient")
    validities: tuple[str, ...] = ("none",)

    def __post_init__(self):
        for name, known in (
            ("distributions", DISTRIBUTIONS), ("modes", MODES), ("validities", VALIDITIES)
        ):  # fmt: skip
            values = getattr(self, name)
            if not values:
                raise ValueError(f"sweep: {name} is empty; give at least one.")
            bad = [v for v in values if v not in known]
            if bad:
                raise ValueError(f"sweep: unknown {name} {bad}; choose from {known}.")
        if not self.scales or not self.samples:
            raise ValueError("sweep: scales and samples must each hold at least one value.")
        for s in self.scales:
            if isinstance(s, bool) or not (math.isfinite(float(s)) and float(s) > 0):
                raise ValueError(f"sweep: every scale must be finite and > 0; got {s!r}.")
        for q in self.samples:
            if isinstance(q, bool) or not isinstance(q, int) or q < 1:
                raise ValueError(f"sweep: samples per source must be positive ints; got {q!r}.")


QUICK_GRID = SweepGrid(
    distributions=("gaussian", "laplace"), scales=(0.5, 1.0), samples=(16,), modes=("sample",)
)


def plan(grid: SweepGrid, base: SearchConfig) -> list[tuple[SearchConfig, tuple[float, ...]]]:
    """The programs to run: (config, scales); an empty scales tuple means "no scale axis"."""
    groups = []
    for validity in grid.validities:
        for mode in grid.modes:
            for q in grid.samples:
                if mode == "sample":
                    for dist in grid.distributions:
                        cfg = dataclasses.replace(
                            base, mode=mode, distribution=dist, num_samples=q, validity=validity
                        )
                        groups.append((cfg, grid.scales if dist in SCALED_DISTRIBUTIONS else ()))
                else:
                    chains = math.ceil(q / base.num_rounds)
                    cfg = dataclasses.replace(
                        base, mode=mode, chains_per_source=chains, validity=validity
                    )
                    groups.append((cfg, grid.scales if mode == "gradient" else ()))
    return groups


def _count_regions(
    res: SearchResult,
    num_classes: int,
    config: DistillConfig | None,
    free_dims: int | None = None,
) -> int | None:
    if config is None:
        return None
    if res.num_found < max(config.min_codes, 2):
        return 0
    with warnings.catch_warnings():  # the fast config caps iterations on purpose
        warnings.filterwarnings("ignore", message=".*did not converge.*")
        try:
            return distill(
                res.z,
                res.source_label,
                res.pred_label,
                num_classes=num_classes,
                config=config,
                free_dims=free_dims,
            ).num_regions
        except ValueError:  # too few codes for a region
            return 0


def run_sweep(
    decode_fn: Callable[[jax.Array], jax.Array],
    classify_fn: Callable[[jax.Array], jax.Array],
    z0: np.ndarray,
    y0: np.ndarray,
    *,
    grid: SweepGrid,
    base: SearchConfig,
    key: jax.Array,
    distill_config: DistillConfig | None = FAST_DISTILL,
    mesh: jax.sharding.Mesh | None = None,
    log: Callable[[str], None] = print,
    validity_fn: Callable[[jax.Array], jax.Array] | None = None,
    judge: Callable[[SearchResult], float | None] | None = None,
    free_dims: int | None = None,
) -> list[dict[str, Any]]:
    """Runs every setting of `grid` around the sources; returns one table row per setting.

    Each program runs twice: the first call compiles (`first_call_s`), the second is timed
    (`run_s`, shared by the `settings_in_program` settings it ran; throughput is that program's
    samples over `run_s`). Results of both calls are identical (same key).

    Args:
      decode_fn: z [B, L] -> x [B, ...]; classify_fn: x -> logits [B, C].
      z0: [N, L] source codes; y0: [N] labels.
      grid: the settings; base: every other search setting (e.g. the run's search config).
      key: PRNG key shared by every setting (so settings differ only by their settings).
      distill_config: the mixture used to count distinct regions in the kept codes (None: no
        region count, `regions` is None).
      mesh: devices (default: all).
      log: progress lines.
      validity_fn: the validity model of the settings with validity "oracle" (x -> logits).
      judge: a result's bug yield (`bug_yield`; None: the column is None).
      free_dims: the coordinates of the codes the search perturbs (`latent_search`).

    Returns:
      Rows with the keys of `COLUMNS` (`distribution` / `scale` None where not used).

    Example:
      >>> rows = run_sweep(decode, classify, mu, y, grid=QUICK_GRID, base=SearchConfig(),
      ...                  key=jax.random.key(0))
      >>> print(format_table(rows))
    """
    num_classes = int(
        jax.eval_shape(
            lambda z: classify_fn(decode_fn(z)), jax.ShapeDtypeStruct((1, z0.shape[1]), jnp.float32)
        ).shape[-1]
    )
    groups = plan(grid, base)
    if validity_fn is None and any(c.validity != "none" for c, _ in groups):
        raise ValueError(
            "sweep: validity 'oracle' needs the oracle's classify function (validity_fn); "
            "the CLI loads it from the run's label/oracle/."
        )
    rows = []
    for config, scales in groups:
        if scales:
            call = functools.partial(latent_search_sweep, config=config, scales=scales)
        else:
            call = functools.partial(lambda **kw: [latent_search(**kw)], config=config)
        kwargs = dict(decode_fn=decode_fn, classify_fn=classify_fn, z0=z0, y0=y0, key=key,
                      mesh=mesh, free_dims=free_dims,
                      validity_fn=None if config.validity == "none" else validity_fn)  # fmt: skip
        t0 = time.perf_counter()
        call(**kwargs)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        results = call(**kwargs)
        run_s = time.perf_counter() - t0
        total = sum(r.num_samples_evaluated for r in results)
        for res, scale in zip(results, scales or (None,), strict=True):
            t0 = time.perf_counter()
            regions = _count_regions(res, num_classes, distill_config, free_dims)
            n = res.num_samples_evaluated
            rows.append({
                "mode": config.mode,
                "distribution": config.distribution if config.mode == "sample" else None,
                "scale": scale,
                "samples_per_source": config.samples_per_source,
                "validity": config.validity,
                "sources_used": res.num_sources_used,
                "samples_evaluated": n,
                "flips": res.num_flips,
                "errors_kept": res.num_found,
                "regions": regions,
                "bug_yield": None if judge is None else judge(res),
                "errors_per_million": res.num_flips / n * 1e6 if n else 0.0,
                "throughput_samples_per_s": total / run_s,
                "run_s": run_s,
                "first_call_s": first,
                "compile_s": max(first - run_s, 0.0),
                "settings_in_program": len(results),
                "distill_s": time.perf_counter() - t0,
            })  # fmt: skip
            log(_row_line(rows[-1]))
    return rows


def _row_line(row: dict[str, Any]) -> str:
    return " ".join(cell(row[c]) for c in COLUMNS)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table."""
    cells = [list(COLUMNS)] + [[cell(r[c]) for c in COLUMNS] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        " ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells
    )


def write_outputs(
    rows: Sequence[dict[str, Any]], out_dir: str, *, meta: dict[str, Any]
) -> dict[str, str]:
    """Writes sweep.csv, sweep.json (rows + `meta`) and sweep.png; returns their paths."""
    return write_results(rows, out_dir, "sweep", columns=COLUMNS, meta=meta, plot=plot)


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Errors per million samples and distinct regions against scale, one line per (distribution,
    mode, samples); settings without a scale are dashed horizontal lines."""
    from defuse_jax.plots import plt, save_figure

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault((r["distribution"], r["mode"], r["samples_per_source"]), []).append(r)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, ((dist, mode, q), rs) in enumerate(lines.items()):
        label = f"{dist or '-'} / {mode} / {q} per source"
        color = colors[i % len(colors)]
        for ax, col in zip(axes, ("errors_per_million", "regions"), strict=True):
            if rs[0]["scale"] is None:
                if rs[0][col] is not None:
                    ax.axhline(rs[0][col], ls="--", color=color, label=label)
            else:
                rs = sorted(rs, key=lambda r: r["scale"])
                ys = [np.nan if r[col] is None else r[col] for r in rs]
                ax.plot([r["scale"] for r in rs], ys, "o-", color=color, label=label)
    scales = sorted({r["scale"] for r in rows if r["scale"] is not None})
    for ax, title in zip(axes, ("errors per million samples", "distinct regions"), strict=True):
        ax.set_xscale("log")
        if scales:
            ax.set_xticks(scales, labels=[f"{s:g}" for s in scales])
            ax.minorticks_off()
        ax.set_xlabel("perturbation scale")
        ax.set_title(title)
    axes[1].legend(fontsize=7, loc="best")
    save_figure(fig, path, dpi=110)


# --------------------------------------------------------------------------------------------
# Command line


GRID_AXES = ("distributions", "scales", "samples", "modes", "validities")


def grid_from_args(args: argparse.Namespace) -> SweepGrid:
    """The grid: `--quick`'s or the default, with the given lists on top (validated)."""
    base = QUICK_GRID if args.quick else SweepGrid()
    given = {k: tuple(getattr(args, k)) for k in GRID_AXES if getattr(args, k) is not None}
    return dataclasses.replace(base, **given)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the sweep's flags."""
    parser.add_argument("--out", default="runs/digits", help="a trained run directory")
    parser.add_argument("--sweep-dir", default=None, help="output folder (default <out>/sweep)")
    parser.add_argument("--quick", action="store_true", help="a small grid (smoke test)")
    lists = {
        "distributions": (str, f"perturbation laws of sample mode, of {DISTRIBUTIONS}"),
        "scales": (float, "perturbation scales"),
        "samples": (int, "samples per source"),
        "modes": (str, f"search modes, of {MODES}"),
        "validities": (str, f"validity models, of {VALIDITIES} ('oracle': the run's oracle)"),
    }
    for name, (elem, help_) in lists.items():
        parser.add_argument(f"--{name}", nargs="+", type=flags.list_of(elem), default=None,
                            help=f"{help_} (space-separated)")  # fmt: skip
    flags.renamed(parser, "--run", "--out (the run directory)")
    flags.renamed(parser, "--out-dir", "--sweep-dir")
    parser.add_argument("--max-sources", type=int, default=None,
                        help="search from at most this many test points (default: all; quick: "
                             "100)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of every search")


def run(args: argparse.Namespace) -> int:
    """Loads the run's models and test points, runs the grid, prints and writes the table."""
    grid = grid_from_args(args)  # bad grid input fails here, before any loading or compiling
    max_sources = (
        args.max_sources if args.max_sources is not None else (100 if args.quick else None)
    )
    if max_sources is not None and max_sources < 1:
        raise ValueError(f"sweep: --max-sources must be >= 1, got {max_sources}.")
    from defuse_jax import bug_yield, evaluation, identification, stage_context
    from defuse_jax import train_models as tm

    # The run's models as its stages load them (the user's own ones by their entry points).
    ctx = stage_context.of_run(args.out)
    config, ds, vae, clf = ctx.config, ctx.dataset, ctx.model("vae"), ctx.model("classifier")
    groups = None
    if "oracle" in grid.validities:
        oracle_dir = os.path.join(args.out, "label", "oracle")
        if not os.path.isdir(oracle_dir):
            raise FileNotFoundError(
                f"sweep: --validities oracle needs the run's oracle ({oracle_dir}); run "
                f"`defuse-jax run --out {args.out}` with the oracle labeler or check first."
            )
        groups = tm.load_shift_groups(oracle_dir)  # each shift group must read the source
    # The sources, functions and validity model as the run's search stage builds them.
    inputs = identification.search_inputs(ds, vae, clf, search=config.search,
                                          max_sources=max_sources, seed=config.data.seed,
                                          validity=groups)  # fmt: skip
    print(f"sweep on {args.out}: {len(inputs.idx)} sources, devices {jax.devices()}")
    # The run's judge: chosen as the evaluate stage chooses it (`bug_yield.judge_for`).
    choice = bug_yield.judge_for(ds, evaluation.classify(clf, ds.x_test),
                                 cache_dir=os.path.join(args.out, "cache", "judge"),
                                 seed=config.data.seed, train=config.classifier_train)  # fmt: skip
    judge = choice.judge

    def judged(res: SearchResult) -> float | None:
        return bug_yield.judge_codes(
            judge, vae, res.z, res.source_label, res.pred_label, seed=args.seed
        )["bug"]

    rows = run_sweep(
        inputs.decode_fn,
        inputs.classify_fn,
        inputs.z0,
        inputs.y0,
        grid=grid,
        base=config.search,
        key=jax.random.key(args.seed),
        log=lambda s: print(s, flush=True),
        validity_fn=inputs.kwargs["validity_fn"],
        judge=judged,
        free_dims=inputs.kwargs["free_dims"],
    )
    meta = {
        "judge": judge.name,
        "judge_test_accuracy": judge.test_accuracy,
        "judges": choice.scores,  # every candidate's score on the test split (`judge_score`)
        "run": args.out,
        "num_sources": int(len(inputs.idx)),
        "grid": dataclasses.asdict(grid),
        "base_search": dataclasses.asdict(config.search),
        "distill": dataclasses.asdict(FAST_DISTILL),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
    }
    paths = write_outputs(rows, args.sweep_dir or os.path.join(args.out, "sweep"), meta=meta)
    print(format_table(rows))
    print("wrote " + ", ".join(paths.values()))
    return 0
