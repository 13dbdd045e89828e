"""The results files every sweep writes: one row per setting as CSV, JSON and a plot.

`defuse-jax sweep` (search settings) and `defuse-jax sweep-budget` (search budgets) share this
plumbing; each keeps its own columns and plot.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Callable, Sequence
from typing import Any

from defuse_jax.files import atomic_write, write_json


def cell(value: Any) -> str:
    """A table cell: '-' for None, 4 significant digits for floats."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(
    rows: Sequence[dict[str, Any]],
    out_dir: str,
    stem: str,
    *,
    columns: Sequence[str],
    meta: dict[str, Any],
    plot: Callable[[Sequence[dict[str, Any]], str], None],
) -> dict[str, str]:
    """Writes `<stem>.csv` (the `columns`), `<stem>.json` (`meta` plus every row) and
    `<stem>.png` (drawn by `plot(rows, path)`) into `out_dir`, each atomically; returns their
    paths by suffix."""
    paths = {k: os.path.join(out_dir, f"{stem}.{k}") for k in ("csv", "json", "png")}
    with atomic_write(paths["csv"], newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows({c: ("" if r[c] is None else r[c]) for c in columns} for r in rows)
    write_json(paths["json"], {**meta, "rows": list(rows)})
    plot(rows, paths["png"])
    return paths
