"""`defuse-jax sweep-budget`: how Defuse's results grow with the search budget.

For every budget (latent codes searched per source point) it reruns search -> distill -> label
-> correct -> evaluate on a finished run's trained models, each budget point in its own run
directory `<out>/samples_<q>/` (a full run: report.json, report.md, grids, stage records). The
source run is only read: its trained models (train/, and the oracle in label/oracle/ when it
has one) are copied into each point, where the pipeline finds them done and reloads them; the
oracle, when the source run has none, is trained in the first point and copied into the
others. Then it writes `<out>/budget.csv`, `budget.json` and `budget.png`: errors found,
distinct regions, error codes explained, region and test accuracy after the correction, the
oracle's agreement, and the wall time of every stage, against the budget.

Everything is written atomically (`files`), and a point already finished is reused (the stages'
records say so), so an interrupted sweep resumes; its wall times are those of the run that
computed it.

Why its own command rather than an option of `defuse-jax sweep`: that sweep measures the search
alone (a grid of search settings, compile and run times of one program, a fast mixture's region
count, no labels, no correction, one table), while this one runs the whole rest of the pipeline
once per budget into run directories a person can open. One `--samples` meaning two things, and
two output layouts behind one command, would make both harder to read.

    defuse-jax sweep-budget --from runs/digits --out runs/digits_budget --samples 10 100 1000
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from defuse_jax import flags
from defuse_jax.files import copy_tree, read_json
from defuse_jax.results_table import cell, write_results
from defuse_jax.run_config import STAGES
from defuse_jax.run_dir import RunDir
from defuse_jax.search import SearchConfig

CPU_SAMPLES = (10, 100, 1000)
ACCELERATOR_SAMPLES = (10, 100, 1000, 10_000)
TIMED_STAGES = STAGES[1:]  # the train stage is copied, not rerun
COLUMNS = (
    "samples_per_source", "samples_evaluated", "flips", "errors_kept", "max_codes",
    "codes_fitted", "regions", "error_regions", "codes_explained", "codes_explained_share",
    "regions_labeled", "regions_confirmed", "regions_judge_backed", "region_accuracy_before",
    "region_accuracy_after",
    "test_accuracy_before", "test_accuracy_after", "test_accuracy_control", "oracle_agreement",
    "ambiguous_regions", "bug_yield", *(f"{s}_s" for s in TIMED_STAGES), "total_s", "run_dir",
)  # fmt: skip


def default_samples(backend: str | None = None) -> tuple[int, ...]:
    """The budgets swept by default: 10, 100, 1,000 per source, and 10,000 on an accelerator."""
    if backend is None:
        import jax

        backend = jax.default_backend()
    return CPU_SAMPLES if backend == "cpu" else ACCELERATOR_SAMPLES


def with_samples_per_source(search: SearchConfig, samples: int) -> SearchConfig:
    """`search` evaluating `samples` codes per source: that many samples in "sample" mode,
    ceil(samples / num_rounds) chains of num_rounds rounds in the chain modes."""
    if search.mode == "sample":
        return dataclasses.replace(search, num_samples=samples)
    return dataclasses.replace(search, chains_per_source=math.ceil(samples / search.num_rounds))


def point_dir(out: str, samples: int) -> str:
    """The run directory of one budget point."""
    return os.path.join(out, f"samples_{samples}")


def check_samples(samples: Sequence[int]) -> tuple[int, ...]:
    """The budgets, validated: positive ints, each once.

    Raises:
        ValueError: an empty list, a non-positive or non-int budget, or a repeated one.
    """
    if not samples:
        raise ValueError("sweep-budget: --samples is empty; give at least one budget.")
    for q in samples:
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ValueError(f"sweep-budget: samples per source must be positive ints; got {q!r}.")
    if len(set(samples)) != len(samples):
        raise ValueError(f"sweep-budget: a budget is given twice in {list(samples)}.")
    return tuple(samples)


def _check_dirs(source: str, out: str) -> None:
    source, out = os.path.realpath(source), os.path.realpath(out)
    if out == source or out.startswith(source + os.sep):
        raise ValueError(
            f"sweep-budget: --out {out} lies inside the source run {source}, which is never "
            "modified; give a directory outside it (e.g. <run>_budget)."
        )
    if not os.path.exists(RunDir(source).record("train")):
        raise FileNotFoundError(
            f"{source} has no finished train stage (train/stage.json); train it first: "
            f"`defuse-jax run --out {source}`."
        )


def run_budget_sweep(
    source: str,
    out: str,
    *,
    samples: Sequence[int],
    labeler: str | None = None,
    log: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Rerun the stages after training on `source`'s models for every budget.

    Args:
        source: a run directory with a finished train stage (only read).
        out: the sweep's directory; budget point q goes to `point_dir(out, q)`.
        samples: latent codes searched per source point, one budget point each.
        labeler: "source" or "oracle" (default: the source run's, which must be automatic).
        log: progress lines.

    Returns:
        One row per budget (keys `COLUMNS`), in the order given.

    Raises:
        ValueError: bad budgets, `out` inside `source`, or a manual labeler.
        FileNotFoundError: `source` has no trained models.
    """
    from defuse_jax import pipeline
    from defuse_jax.data import load_dataset
    from defuse_jax.run_config import load_run_config

    samples = check_samples(samples)
    _check_dirs(source, out)
    base = load_run_config(source)
    if base is None:
        raise FileNotFoundError(f"{source} holds no run (no config.json).")
    labeler = labeler or base.labeler
    if labeler not in ("source", "oracle"):
        raise ValueError(
            f"sweep-budget labels every budget point unattended; the run's labeler is "
            f"{labeler!r}. Pass --labeler source or --labeler oracle."
        )
    dataset = load_dataset(base.data)
    oracle_from = RunDir(source).path("label", "oracle")
    if not os.path.exists(os.path.join(oracle_from, "config.json")):
        oracle_from = None  # trained in the first point that needs it, then copied
    judge_from = RunDir(source).path("cache", "judge")  # the bug yield's judge (conv: trained)
    rows = []
    for q in samples:
        run_dir = point_dir(out, q)
        config = dataclasses.replace(
            base,
            search=with_samples_per_source(base.search, q),
            labeler=labeler,
            progress=False,
        )
        os.makedirs(run_dir, exist_ok=True)
        copy_tree(RunDir(source).path("train"), RunDir(run_dir).path("train"))
        if config.uses_oracle and oracle_from is not None:
            copy_tree(oracle_from, RunDir(run_dir).path("label", "oracle"))
        if os.path.isdir(judge_from):
            copy_tree(judge_from, RunDir(run_dir).path("cache", "judge"))
        log(f"[budget {q} per source] {run_dir}")
        t0 = time.perf_counter()
        report = pipeline.run(run_dir, config, log=lambda s: log(f"  {s}"), dataset=dataset)
        rows.append(table_row(run_dir, q, report["evaluate"]))
        log(f"  {time.perf_counter() - t0:.1f} s: " + _row_line(rows[-1]))
        if config.uses_oracle and oracle_from is None:
            oracle_from = RunDir(run_dir).path("label", "oracle")
        judge_from = RunDir(run_dir).path("cache", "judge")
    return rows


def table_row(run_dir: str, samples: int, report: dict[str, Any]) -> dict[str, Any]:
    """One row of the table from a finished budget point's report and stage records."""
    rd = RunDir(run_dir)
    seconds = {s: read_json(rd.record(s))["seconds"] for s in TIMED_STAGES}
    distill = read_json(rd.record("distill"))["summary"]
    errors = [r for r in report["regions"] if r["error_region"]]
    explained = sum(r["num_codes"] for r in errors)
    kept = report["num_errors_found"]
    return {
        "samples_per_source": samples,
        "samples_evaluated": report["num_samples_evaluated"],
        "flips": report["num_flips"],
        "errors_kept": kept,
        "max_codes": distill.get("max_codes"),
        "codes_fitted": distill.get("codes_fitted"),
        "regions": report["num_regions"],
        "error_regions": len(errors),
        "codes_explained": explained,
        "codes_explained_share": explained / kept if kept else None,
        "regions_labeled": report["num_regions_labeled"],
        "regions_confirmed": report.get("num_regions_confirmed"),
        # confirmed regions whose label the judge reads on at least half of their samples
        "regions_judge_backed": (report.get("bug_yield") or {}).get("confirmed_judge_agrees"),
        "region_accuracy_before": report["region_accuracy_before"],
        "region_accuracy_after": report["region_accuracy_after"],
        "test_accuracy_before": report["test_accuracy_before"],
        "test_accuracy_after": report["test_accuracy_after"],
        # The same fine-tuning without regions (`CorrectConfig.control`; None: none trained).
        "test_accuracy_control": (report["correction"].get("control") or {}).get("test_accuracy"),
        "oracle_agreement": report.get("oracle_agreement"),
        "ambiguous_regions": report.get("num_ambiguous_regions"),
        # share of kept codes the evaluation-only judge reads as the source class
        "bug_yield": (report.get("bug_yield") or {}).get("bug"),
        **{f"{s}_s": seconds[s] for s in TIMED_STAGES},
        "total_s": sum(seconds.values()),
        "run_dir": os.path.basename(run_dir),
    }


def _row_line(row: dict[str, Any]) -> str:
    keys = ("errors_kept", "regions", "codes_explained", "region_accuracy_after",
            "test_accuracy_after", "total_s")  # fmt: skip
    return ", ".join(f"{k} {cell(row[k])}" for k in keys)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows as an aligned text table, one column per budget (it is long, not wide)."""
    keys = [c for c in COLUMNS if c != "run_dir"]
    width = max(map(len, keys))
    cells = [[cell(r[k]) for r in rows] for k in keys]
    colw = [max(len(c[i]) for c in cells) for i in range(len(rows))]
    return "\n".join(
        f"{k:>{width}} " + " ".join(c.rjust(w) for c, w in zip(cs, colw, strict=True))
        for k, cs in zip(keys, cells, strict=True)
    )


def write_outputs(
    rows: Sequence[dict[str, Any]], out: str, *, meta: dict[str, Any]
) -> dict[str, str]:
    """Write budget.csv, budget.json (rows and `meta`) and budget.png into `out`."""
    return write_results(rows, out, "budget", columns=COLUMNS, meta=meta, plot=plot)


def plot(rows: Sequence[dict[str, Any]], path: str) -> None:
    """Four panels against the budget (log scale): errors, regions, accuracies, stage times."""
    from defuse_jax.plots import plt, save_figure

    rows = sorted(rows, key=lambda r: r["samples_per_source"])
    q = [r["samples_per_source"] for r in rows]

    def col(key: str, scale: float = 1.0) -> list[float]:
        return [np.nan if r[key] is None else scale * r[key] for r in rows]

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    panels = (
        ("errors", (("flips", "misclassified samples (flips)"), ("errors_kept", "errors kept"),
                    ("codes_explained", "codes in error regions")), 1.0, "count"),
        ("regions", (("regions", "regions"), ("error_regions", "error regions"),
                     ("ambiguous_regions", "ambiguous (oracle)")), 1.0, "count"),
        ("accuracy after the correction", (("region_accuracy_after", "region"),
                                            ("test_accuracy_after", "test"),
                                            ("oracle_agreement", "oracle agreement")), 100.0, "%"),
        ("wall time per stage", tuple((f"{s}_s", s) for s in TIMED_STAGES), 1.0, "seconds"),
    )  # fmt: skip
    for ax, (title, series, scale, unit) in zip(axes, panels, strict=True):
        for key, label in series:
            ax.plot(q, col(key, scale), "o-", label=label)
        ax.set_xscale("log")
        ax.set_xticks(q, labels=[f"{v:,}" for v in q])
        ax.minorticks_off()
        ax.set_xlabel("samples per source")
        ax.set_ylabel(unit)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=7, loc="best")
    axes[0].set_yscale("log")
    axes[3].set_yscale("log")
    save_figure(fig, path)


# --------------------------------------------------------------------------------------------
# Command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Registers the budget sweep's flags."""
    parser.add_argument("--from", dest="source", required=True,
                        help="a finished run directory (only read)")  # fmt: skip
    parser.add_argument("--out", required=True,
                        help="the sweep's directory: one run directory per budget, the table "
                             "and the plot")  # fmt: skip
    parser.add_argument("--samples", nargs="+", type=flags.list_of(int), default=None,
                        help="latent codes searched per source, one budget each (space-"
                             f"separated; default {' '.join(map(str, CPU_SAMPLES))}, and "
                             f"{ACCELERATOR_SAMPLES[-1]} on an accelerator)")  # fmt: skip
    parser.add_argument("--labeler", choices=("source", "oracle"), default=None,
                        help="default: the source run's (it must be automatic)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    """Runs every budget, prints the table and writes budget.csv / .json / .png."""
    import jax

    samples = check_samples(tuple(args.samples) if args.samples else default_samples())
    t0 = time.perf_counter()
    rows = run_budget_sweep(
        args.source, args.out, samples=samples, labeler=args.labeler,
        log=lambda s: print(s, flush=True),
    )  # fmt: skip
    meta = {
        "source_run": os.path.abspath(args.source),
        "samples": list(samples),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "cpu_count": os.cpu_count(),
        "wall_time_s": time.perf_counter() - t0,
    }
    paths = write_outputs(rows, args.out, meta=meta)
    print(format_table(rows))
    print("wrote " + ", ".join(paths.values()))
    return 0
