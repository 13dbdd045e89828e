"""Run report: its schema (`Report`), ``report.json``, ``report.md`` and summary plots.

`Report` is the stable schema of ``report.json`` (a TypedDict: the file is plain JSON, the keys
and their meaning are fixed here). :func:`assemble` builds one from a run's evaluated numbers;
:func:`write_report` stores it unchanged (plus the plot paths) as ``report.json``, renders the
human summary
``report.md`` a person debugging the model reads first, and draws two plots under ``plots/``:

* ``latent_pca.png``: the error codes projected on their first two principal components,
  coloured by region (skipped when fewer than 3 codes);
* ``region_accuracy.png``: accuracy before/after correction per labeled region (skipped when no
  labeled region has an accuracy).

All paths inside the report are relative to the run directory, so the directory can be moved or
rendered as Markdown anywhere.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from defuse_jax.files import atomic_write, make_dirs, remove
from defuse_jax.report.assembly import assemble
from defuse_jax.report.figures import pca_2d, plot_latent_pca, plot_region_accuracy
from defuse_jax.report.markdown import (
    _SCOPES,
    before_after_table,
    correction_summary,
    render_markdown,
)
from defuse_jax.report.schema import (
    WORSE_BY,
    BugYield,
    ControlReport,
    CorrectionReport,
    JudgeScore,
    RegionReport,
    Report,
)
from defuse_jax.report.text import _is_labeled, pct

__all__ = [
    "ACCURACY_PLOT", "PCA_PLOT", "WORSE_BY", "BugYield", "ControlReport", "CorrectionReport",
    "JudgeScore", "RegionReport", "Report", "assemble", "before_after_table",
    "correction_summary", "pca_2d", "pct", "plot_latent_pca", "plot_region_accuracy",
    "read_report", "render_markdown", "write_report",
]  # fmt: skip

PCA_PLOT: Final = "plots/latent_pca.png"
ACCURACY_PLOT: Final = "plots/region_accuracy.png"


def _jsonable(obj: Any) -> Any:
    """Plain-JSON copy: numpy scalars/arrays to Python, non-finite floats to None.

    NaN/Infinity are not JSON; strict parsers (jq, browsers) reject them, so they become null.
    """
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        return _jsonable(obj.item())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def read_report(run_dir: str) -> Report:
    """The `Report` of a finished run (<run_dir>/report.json)."""
    with open(os.path.join(run_dir, "report.json")) as f:
        return json.load(f)


def write_report(
    run_dir: str, report: Mapping[str, Any], *, codes: np.ndarray, assignment: np.ndarray
) -> dict[str, str]:
    """Write <run_dir>/report.json, <run_dir>/report.md and plots under <run_dir>/plots/.

    Args:
        run_dir: the run directory (created if missing).
        report: a `Report` (see `assemble`). It is not modified.
        codes: [M, L] float32 latent codes of the errors the search found (M may be 0).
        assignment: [M] int32 region index of each code, -1 for codes outside every kept region.

    Returns:
        {"json": path, "markdown": path, "latent_pca": path or absent,
        "region_accuracy": path or absent}; each path is ``os.path.join(run_dir, ...)``.

    Raises:
        ValueError: codes is not 2-D or assignment does not have one entry per code.
    """
    codes = np.asarray(codes, np.float32)
    assignment = np.asarray(assignment, np.int64).reshape(-1)
    if codes.ndim != 2:
        if codes.size == 0:  # an empty search may hand over a shapeless empty array
            codes = codes.reshape(0, 0)
        else:
            raise ValueError(f"codes must be [M, L], got shape {codes.shape}")
    if assignment.shape[0] != codes.shape[0]:
        raise ValueError(f"assignment has {assignment.shape[0]} entries for {codes.shape[0]} codes")
    make_dirs(run_dir)
    names = report.get("class_names") or []
    plots: dict[str, str] = {}
    paths: dict[str, str] = {}

    finite = np.isfinite(codes).all(axis=1) if codes.size else np.zeros(0, bool)
    if codes.shape[0] >= 3 and codes.shape[1] >= 1 and finite.sum() >= 3:
        paths["latent_pca"] = plot_latent_pca(
            os.path.join(run_dir, PCA_PLOT),
            codes[finite],
            assignment[finite],
            title=f"{report.get('dataset', '')}: {int(finite.sum()):,} error codes by region",
        )
        plots["latent_pca"] = PCA_PLOT

    labeled = [r for r in report.get("regions") or [] if _is_labeled(r)]
    has_numbers = any(
        r.get("accuracy_before") is not None or r.get("accuracy_after") is not None for r in labeled
    )
    if has_numbers:  # labeled regions without an accuracy show as n/a bars
        paths["region_accuracy"] = plot_region_accuracy(
            os.path.join(run_dir, ACCURACY_PLOT),
            labeled,
            class_names=names,
            overall_before=report.get("region_accuracy_before"),
            overall_after=report.get("region_accuracy_after"),
            overall_of=_SCOPES.get(report.get("region_accuracy_scope") or "", "all regions"),
        )
        plots["region_accuracy"] = ACCURACY_PLOT

    for key, rel in (("latent_pca", PCA_PLOT), ("region_accuracy", ACCURACY_PLOT)):
        stale = os.path.join(run_dir, rel)
        if key not in plots and os.path.exists(stale):  # from an earlier report of this run
            remove(stale)

    data = _jsonable({**report, "plots": plots})
    json_path = os.path.join(run_dir, "report.json")
    with atomic_write(json_path) as f:
        json.dump(data, f, indent=2, sort_keys=True, allow_nan=False)
        f.write("\n")
    md_path = os.path.join(run_dir, "report.md")
    markdown = render_markdown(data, plots, run_dir=run_dir)
    with atomic_write(md_path) as f:
        f.write(markdown)
    return {"json": json_path, "markdown": md_path, **paths}
