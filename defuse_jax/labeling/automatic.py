"""Automatic labelers, for unattended runs and benchmarks, and the file they write.

:func:`label_by_source` takes each region's majority source label, :func:`label_by_oracle` the
majority vote of a stronger classifier; :func:`write_auto_labels` stores such answers (or any
program's) in the labels file format, keeping a copy of the file first if it held other answers.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from defuse_jax.labeling.answers import UNLABELED, canonical_text, check_class_names, parse_label
from defuse_jax.labeling.labels_file import (
    HEADER,
    LabelsFileError,
    check_regions,
    oracle_columns,
    read_table,
    template_row,
    write_backup,
    write_table,
)


def label_by_source(regions: Sequence[Mapping[str, Any]]) -> dict[int, int]:
    """Majority source label of each region's codes (ties -> smallest class index).

    The source label is the true class of the image the error code was found from, so this is
    the "free" labeler for benchmarks; it is wrong when the search drifted into another class.

    Args:
        regions: region dicts with ``id`` and ``source_label_counts``.

    Returns:
        ``{region_id: class index}``.

    Raises:
        ValueError: a region without any source label counts.

    Example:
        >>> label_by_source([{"id": 3, "source_label_counts": [0, 4, 4]}])
        {3: 1}
    """
    out: dict[int, int] = {}
    for region in regions:
        counts = np.asarray(region.get("source_label_counts", ()), dtype=np.int64)
        if counts.ndim != 1 or counts.size == 0 or counts.sum() <= 0:
            raise ValueError(f"region {region.get('id')!r} has no source label counts")
        out[int(region["id"])] = int(np.argmax(counts))  # argmax: first maximum on ties
    return out


def label_by_oracle(region_predictions: Mapping[int, np.ndarray]) -> dict[int, int]:
    """Majority vote of an oracle classifier's predictions per region (ties -> smallest index).

    Args:
        region_predictions: ``{region_id: int array [S]}`` of the stronger classifier's predicted
            classes on samples decoded from the region.

    Returns:
        ``{region_id: class index}``.

    Raises:
        ValueError: empty, non-1-D, non-integer or negative predictions.

    Example:
        >>> label_by_oracle({0: np.array([2, 1, 2, 1])})
        {0: 1}
    """
    out: dict[int, int] = {}
    for rid, preds in region_predictions.items():
        arr = np.asarray(preds)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"region {rid}: expected non-empty predictions [S], got {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"region {rid}: predictions must be class indices, got {arr.dtype}")
        if arr.min() < 0:
            raise ValueError(f"region {rid}: negative class index in predictions")
        out[int(rid)] = int(np.argmax(np.bincount(arr)))
    return out


def write_auto_labels(
    path: str | os.PathLike,
    regions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    labels: Mapping[int, int | None],
    *,
    labeler: str,
) -> str:
    """Write a labels file whose ``label`` column is filled by an automatic labeler.

    Same columns as :func:`write_labels_file` (the oracle's check included) plus a trailing
    ``labeler`` column, so an unattended run leaves the artefact a person would, and
    :func:`read_labels` reads either. Regions the oracle flags ambiguous keep their label: the
    flag is information for whoever reviews the file.
    ``suggested`` repeats the label, so clearing the ``label`` column turns the file into a
    template for human review. If the file exists and holds different answers (e.g. a person's),
    it is first copied to ``<path>.bak`` with a warning.

    Args:
        path: the CSV file; written atomically.
        regions: region dicts, as for :func:`write_labels_file`.
        class_names: class names in index order.
        labels: ``{region_id: class index or None (skip)}``; regions absent stay unanswered.
        labeler: name of the labeler (e.g. ``"source"``, ``"oracle"``).

    Returns:
        ``path`` as a string.

    Example:
        >>> write_auto_labels("labels.csv", regions, names, label_by_source(regions),
        ...                   labeler="source")  # doctest: +SKIP
        'labels.csv'
    """
    names = check_class_names(class_names)
    ids = check_regions(regions, names)
    for rid, value in labels.items():
        if int(rid) not in ids:
            raise ValueError(f"label for unknown region {rid}")
        if value is not None and not 0 <= int(value) < len(names):
            raise ValueError(f"region {rid}: class index {value} out of range")
    new = {int(r): canonical_text(None if v is None else int(v), names) for r, v in labels.items()}
    if os.path.exists(path):
        _backup_if_answers_differ(path, new, names)

    rows = []
    for region, rid in zip(regions, ids, strict=True):
        value = labels.get(rid)
        text = new.get(rid, "")
        row = template_row(region, names, "" if value is None else text)
        row["label"] = text
        row["labeler"] = labeler if text else ""
        rows.append(row)
    return write_table(path, [*HEADER, *oracle_columns(regions), "labeler"], rows)


def _backup_if_answers_differ(
    path: str | os.PathLike, new: Mapping[int, str], names: Sequence[str]
) -> None:
    try:
        old_rows = [(rid, row["label"]) for _, rid, row in read_table(path).rows]
    except LabelsFileError:
        old_rows = None  # unreadable: keep a copy rather than judge it
    if old_rows is not None:
        differs = False
        for rid, text in old_rows:
            if not text:
                continue
            try:
                old_value = parse_label(text, names)
                new_value = parse_label(new[rid], names) if rid in new else UNLABELED
                differs = old_value != new_value
            except ValueError:
                differs = True
            if differs:
                break
        if not differs:
            return
    backup = write_backup(path)
    warnings.warn(
        f"{os.fspath(path)}: overwritten with automatic labels; the previous answers are kept in "
        f"{backup}",
        stacklevel=3,
    )
