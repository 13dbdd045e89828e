"""`RunDir`: where every file of a run lives, in one place.

    <run>/config.json               the run's configuration (the CLI's defaults next time)
    <run>/train/{vae,classifier}/   trained models (Orbax checkpoints, configs, histories)
    <run>/search/                   errors.npz, summary.json
    <run>/distill/                  regions.npz, regions.json
    <run>/label/                    labels.csv, region_XXX.png grids (oracle/ for that labeler)
    <run>/correct/                  fine-tuned classifier (its own checkpoints)
    <run>/cache/correct/<label id>/ each region weight's fine-tuning run, kept while the label
                                    stage stands (a new choice reuses them; a cache, pruned)
    <run>/report.json, report.md, plots/
    <run>/audit/                    a person's blind check of the bug yield (`yield_audit`):
                                    sheets, key.npz, labels.csv, score.json
    <run>/stale/                    outdated or damaged outputs, set aside (kept)
    <run>/<stage>/stage.json        a finished stage's record (started.json while it runs)

Paths inside reports and label rows are relative to the run directory (`RunDir.grid`), so a run
directory can be moved or rendered anywhere.
"""

from __future__ import annotations

import dataclasses
import os
import time

LABELS_FILE = "label/labels.csv"


def check_not_a_file(run_dir: str) -> None:
    """Raises ValueError when `run_dir` names an existing file rather than a directory."""
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ValueError(f"The run directory {run_dir} is a file: pass a directory to --out.")


@dataclasses.dataclass(frozen=True)
class RunDir:
    """The run directory `root` (absolute or relative) and the paths inside it."""

    root: str

    def path(self, *parts: str) -> str:
        """`root` joined with `parts` (e.g. `path("search", "errors.npz")`)."""
        return os.path.join(self.root, *parts)

    def rel(self, relative: str) -> str:
        """The path of a '/'-separated path relative to the run directory."""
        return self.path(*relative.split("/"))

    @staticmethod
    def grid(region_id: int) -> str:
        """A region's sample grid, relative to the run directory."""
        return f"label/region_{int(region_id):03d}.png"

    @property
    def labels(self) -> str:
        return self.rel(LABELS_FILE)

    @property
    def config(self) -> str:
        return self.path("config.json")

    def record(self, stage: str) -> str:
        """A finished stage's record (written last)."""
        return self.path(stage, "stage.json")

    def started(self, stage: str) -> str:
        """The record a stage writes when it starts (its fingerprint)."""
        return self.path(stage, "started.json")

    def correction_runs(self, label_id: str | None = None) -> str:
        """Where the correction trains each region weight for the label stage's completion
        `label_id` (None: the folder that holds one such directory per completion)."""
        base = self.path("cache", "correct")
        return base if label_id is None else os.path.join(base, label_id)

    def new_stale(self, stage: str) -> str:
        """A new <run>/stale/<stage>-<time>[-n] path (created by whoever moves things there)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = self.path("stale", f"{stage}-{stamp}")
        n = 1
        while os.path.exists(dest):
            dest = self.path("stale", f"{stage}-{stamp}-{n}")
            n += 1
        return dest
