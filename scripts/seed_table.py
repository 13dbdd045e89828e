"""Run the whole pipeline once per seed and tabulate region and test accuracy (README's table).

"without regions" is the test change of the correction's control: the same fine-tuning on the
training data alone (`CorrectConfig.control`).

Every seed of the run is set to the same value in turn: the data split, the VAE, the
classifier, the search, the mixture and the correction. Other settings are `defuse-jax run`'s
defaults, plus whatever extra flags you pass after `--`.

    python scripts/seed_table.py --out runs/seeds --seeds 0 1 2
    python scripts/seed_table.py --out runs/seeds-conv --seeds 0 1 2 -- --image-size 28

Each seed runs in its own run directory under --out (resumable: a finished seed is not redone).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

SEED_FLAGS = ("--data-seed", "--vae-seed", "--clf-seed", "--search-seed", "--distill-seed",
              "--correct-seed")  # fmt: skip


def run_seed(out: str, seed: int, extra: list[str]) -> dict:
    run_dir = os.path.join(out, f"seed{seed}")
    cmd = [sys.executable, "-m", "defuse_jax.cli", "run", "--out", run_dir, "--no-progress"]
    for flag in SEED_FLAGS:
        cmd += [flag, str(seed)]
    subprocess.run(cmd + extra, check=True)
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _kept(report: dict) -> str:
    """The kept lambda and epoch (chosen on validation data, or the fixed schedule)."""
    corr = report.get("correction") or {}
    if corr.get("skipped"):
        return "skipped"
    sel = corr.get("selection")
    if sel and sel.get("kept_original"):
        return "original kept"
    return f"{corr.get('lam'):g} / {corr.get('epochs')}" + ("" if sel else " (fixed)")


def _control(report: dict) -> str:
    """The test change of the same fine-tuning without regions (`CorrectConfig.control`)."""
    ctl = (report.get("correction") or {}).get("control")
    if not ctl:
        return "n/a"
    return f"{100 * (ctl['test_accuracy'] - report['test_accuracy_before']):+.1f} pt"


def table(reports: dict[int, dict]) -> str:
    lines = [
        "| seed | bug yield | regions (labeled / confirmed errors / backed by the judge) "
        "| region accuracy | test accuracy | test change | without regions | regions >5 pt worse "
        "| kept lambda / epoch |",
        "|---:|---:|---|---|---|---:|---:|---:|---|",
    ]
    for seed, r in reports.items():
        drop = 100 * (r["test_accuracy_after"] - r["test_accuracy_before"])
        scope = " (all labeled)" if r.get("region_accuracy_scope") == "labeled" else ""
        found = r.get("bug_yield") or {}  # the evaluation-only judge's figures (None: no codes)
        lines.append(
            f"| {seed} | {_pct(found.get('bug'))} | {r['num_regions']} "
            f"({r['num_regions_labeled']} / {r['num_regions_confirmed']} / "
            f"{found.get('confirmed_judge_agrees', 'n/a')}) | "
            f"{_pct(r['region_accuracy_before'])} -> "
            f"{_pct(r['region_accuracy_after'])}{scope} | {_pct(r['test_accuracy_before'])} -> "
            f"{_pct(r['test_accuracy_after'])} | {drop:+.1f} pt | {_control(r)} | "
            f"{len(r['regions_worse_after'])} | {_kept(r)} |"
        )
    after = [r["region_accuracy_after"] for r in reports.values()]
    changes = [100 * (r["test_accuracy_after"] - r["test_accuracy_before"])
               for r in reports.values()]  # fmt: skip
    if all(a is not None for a in after):
        lines.append(
            f"| mean / min | | | after: {_pct(statistics.mean(after))} / {_pct(min(after))} | "
            f"| {statistics.mean(changes):+.2f} / {min(changes):+.1f} pt | | | |"
        )
    return "\n".join(lines)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--out", required=True, help="directory of the per-seed run directories")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--json", default=None, help="also write the reports' numbers here")
    args = parser.parse_args(argv)
    reports = {s: run_seed(args.out, s, extra) for s in args.seeds}
    print(table(reports))
    if args.json:
        keys = ("num_regions", "num_regions_labeled", "num_regions_confirmed",
                "region_accuracy_before", "region_accuracy_after", "test_accuracy_before",
                "test_accuracy_after", "regions_worse_after", "region_accuracy_scope",
                "correction")  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({s: {k: r[k] for k in keys} for s, r in reports.items()}, f, indent=1)


if __name__ == "__main__":
    main()
