"""The labels file: one CSV row per region, read, written and merged without losing an answer.

File format (UTF-8 CSV, header first)::

    region_id,label,suggested,num_codes,weight,top_source,top_pred,grid
    3,,2,120,0.08,2,7,label/region_003.png

``label`` holds an answer (see :mod:`defuse_jax.labeling.answers`): a class name, a class index
or ``skip``; empty means not answered yet. The other columns are informational. When the run
checks labels with the oracle classifier (:mod:`defuse_jax.label_validity`), three more follow
(:data:`ORACLE_COLUMNS`): ``oracle`` (the oracle's majority class on fresh region samples),
``oracle_agreement`` (the share of those samples it classifies as the suggested label) and
``ambiguous`` (``yes`` when that share is under one half: look twice before labeling). Extra
columns a person adds (e.g. ``notes``) are tolerated and kept when the file is rewritten.

:func:`write_labels_file` writes the template a person fills in (rewriting it keeps every answer
already given, backing the old file up before dropping any), :func:`read_labels` validates it
and returns the answers, :func:`listed_regions` checks only its structure. Every write is atomic
(:func:`defuse_jax.files.atomic_write`): a reader, or a killed process, never sees half a file.
The helpers the labelers share (:func:`check_regions`, :func:`template_row`, :func:`read_table`,
:func:`write_table`, :func:`write_backup`) live here too.
"""

from __future__ import annotations

import csv
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import numpy as np

from defuse_jax.files import atomic_write, copy_file
from defuse_jax.labeling.answers import INT_RE, canonical_text, check_class_names, parse_label

HEADER: Final = (
    "region_id",
    "label",
    "suggested",
    "num_codes",
    "weight",
    "top_source",
    "top_pred",
    "grid",
)
# Written when the regions carry the oracle's check (keys oracle_label, oracle_agreement,
# ambiguous); never kept from an older file, so a stale verdict does not survive a rewrite.
ORACLE_COLUMNS: Final = ("oracle", "oracle_agreement", "ambiguous")
_REQUIRED: Final = ("region_id", "label")
# Columns compared on rewrite to warn when an answered region id now describes other codes.
_STALE_CHECK: Final = ("num_codes", "top_source", "top_pred")


class LabelsFileError(ValueError):
    """A labels file that cannot be used; the message names the file and the line.

    Attributes:
        path: the labels file.
        line: 1-based line number of the offending row (the header is line 1).
    """

    def __init__(self, path: str | os.PathLike, line: int, message: str):
        self.path = os.fspath(path)
        self.line = line
        super().__init__(f"{self.path}, line {line}: {message}")


# --------------------------------------------------------------------------------------------
# Regions


def check_regions(regions: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[int]:
    """Check the region dicts a labels file is written for.

    Args:
        regions: region dicts (see :func:`write_labels_file`).
        names: checked class names, in index order.

    Returns:
        The region ids, in order, as ``int``.

    Raises:
        ValueError: an id that is not an int or is given twice, or label counts whose length is
            not the number of classes.
    """
    ids: list[int] = []
    for region in regions:
        rid = region.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (int, np.integer)):
            raise ValueError(f"region id must be an int, got {rid!r}")
        rid = int(rid)
        if rid in ids:
            raise ValueError(f"duplicate region id {rid}")
        for key in ("source_label_counts", "pred_label_counts"):
            counts = region.get(key)
            if counts is not None and len(counts) != len(names):
                raise ValueError(
                    f"region {rid}: {key} has {len(counts)} entries, expected {len(names)}"
                )
        ids.append(rid)
    return ids


def _top(counts: Sequence[int] | None, names: Sequence[str]) -> str:
    if counts is None or len(counts) == 0 or float(np.sum(counts)) <= 0:
        return ""
    return names[int(np.argmax(np.asarray(counts)))]


def oracle_columns(regions: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    """:data:`ORACLE_COLUMNS` if any region carries the oracle's check, else none."""
    return ORACLE_COLUMNS if any("oracle_agreement" in r for r in regions) else ()


def template_row(region: Mapping[str, Any], names: Sequence[str], suggested: str) -> dict:
    """A region's row of the labels file, unanswered: the :data:`HEADER` columns as text, and
    the :data:`ORACLE_COLUMNS` when the region carries the oracle's check.

    Args:
        region: a checked region dict (see :func:`write_labels_file`).
        names: checked class names, in index order.
        suggested: the ``suggested`` cell.

    Returns:
        ``{column: text}`` with ``label`` empty.
    """
    weight = region.get("weight")
    num_codes = region.get("num_codes")
    oracle = {}
    if "oracle_agreement" in region:
        oracle = {
            "oracle": names[int(region["oracle_label"])],
            "oracle_agreement": f"{float(region['oracle_agreement']):.2f}",
            "ambiguous": "yes" if region.get("ambiguous") else "",
        }
    return {
        **oracle,
        "region_id": str(int(region["id"])),
        "label": "",
        "suggested": suggested,
        "num_codes": "" if num_codes is None else str(int(num_codes)),
        "weight": "" if weight is None else f"{float(weight):.6g}",
        "top_source": _top(region.get("source_label_counts"), names),
        "top_pred": _top(region.get("pred_label_counts"), names),
        "grid": str(region.get("grid") or ""),
    }


# --------------------------------------------------------------------------------------------
# Reading and writing the file


@dataclass
class Table:
    """Structurally valid labels file: header and rows (line number, region id, cells)."""

    fieldnames: list[str]
    rows: list[tuple[int, int, dict[str, str]]] = field(default_factory=list)


def read_table(path: str | os.PathLike) -> Table:
    """Read the CSV, checking only structure (header, field counts, region ids).

    Args:
        path: the labels file.

    Returns:
        Its header and rows; the answers are not checked.

    Raises:
        LabelsFileError: an empty file, a malformed header or row, or malformed CSV.
        FileNotFoundError: no file at ``path``.
    """
    # utf-8-sig: spreadsheets often save a byte-order mark.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)  # e.g. an unclosed quote is an error
        header: list[str] | None = None
        table: Table | None = None
        try:
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue  # blank lines are harmless
                if header is None:
                    header = [c.strip() for c in cells]
                    _check_header(path, line, header)
                    table = Table(fieldnames=header)
                    continue
                if len(cells) > len(header):
                    raise LabelsFileError(
                        path,
                        line,
                        f"malformed row: {len(cells)} fields but the header has {len(header)} "
                        "(an unquoted comma?)",
                    )
                # Short rows are tolerated: missing trailing cells read as empty.
                row = {
                    name: (cells[i].strip() if i < len(cells) else "")
                    for i, name in enumerate(header)
                }
                rid_text = row["region_id"]
                if not INT_RE.fullmatch(rid_text):
                    raise LabelsFileError(
                        path, line, f"malformed row: region_id {rid_text!r} is not an integer"
                    )
                assert table is not None
                table.rows.append((line, int(rid_text), row))
        except csv.Error as e:
            raise LabelsFileError(path, reader.line_num, f"malformed CSV: {e}") from e
    if table is None:
        raise LabelsFileError(path, 1, f"empty file; expected the header {','.join(HEADER)}")
    return table


def _check_header(path: str | os.PathLike, line: int, header: list[str]) -> None:
    expected = ",".join(HEADER)
    missing = [c for c in _REQUIRED if c not in header]
    if missing:
        raise LabelsFileError(
            path,
            line,
            f"malformed header: missing column(s) {', '.join(missing)}; expected {expected}",
        )
    if "" in header:
        raise LabelsFileError(
            path, line, f"malformed header: empty column name; expected {expected}"
        )
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise LabelsFileError(path, line, f"malformed header: duplicate column(s) {dupes}")


def write_table(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict]) -> str:
    """Write atomically: a reader (or a killed process) never sees a half-written file.

    Args:
        path: the CSV file.
        fieldnames: the header, in order.
        rows: ``{column: text}`` dicts; missing columns are written empty, others ignored.

    Returns:
        ``path`` as a string.
    """
    path = os.fspath(path)
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fieldnames})
    return path


def write_backup(path: str | os.PathLike) -> str:
    """Copy the file to the first free ``<path>.bak``, ``<path>.bak1``, ... (never overwrites).

    Args:
        path: the file to keep a copy of.

    Returns:
        The backup's path.
    """
    path = os.fspath(path)
    n = 0
    while os.path.exists(backup := f"{path}.bak{n or ''}"):
        n += 1
    # Atomically too: a kill mid-copy must not leave a truncated backup that looks like the answers.
    copy_file(path, backup)
    return backup


def _old_rows(path: str | os.PathLike) -> tuple[list[str], dict[int, dict[str, str]]]:
    """Previous rows by region id; duplicates are merged unless their answers conflict."""
    table = read_table(path)
    by_id: dict[int, dict[str, str]] = {}
    first_line: dict[int, int] = {}
    for line, rid, row in table.rows:
        if rid in by_id:
            old = by_id[rid]["label"]
            if old and row["label"] and old != row["label"]:
                raise LabelsFileError(
                    path,
                    line,
                    f"region {rid} answered twice ({old!r} on line {first_line[rid]}, "
                    f"{row['label']!r} here); keep one row and rerun",
                )
            if not old:
                by_id[rid] = row
            continue
        by_id[rid] = row
        first_line[rid] = line
    return table.fieldnames, by_id


def write_labels_file(
    path: str | os.PathLike,
    regions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    suggestions: Mapping[int, int | None] | None = None,
) -> str:
    """Write the labels template: one row per region, ``label`` empty for a person to fill in.

    Rewriting an existing file never loses answers: the ``label`` text already given for a region
    that still exists is kept verbatim (even if invalid, so :func:`read_labels` can point at it),
    as are extra columns a person added. If ``suggestions`` is None, the previous ``suggested``
    values are kept too. Answered regions that are no longer present are dropped from the file
    with a warning, after the old file is copied to ``<path>.bak`` (``.bak1``, ... if taken).

    Args:
        path: the CSV file (parent directories are created); written atomically.
        regions: region dicts (``id`` required; ``num_codes``, ``weight``,
            ``source_label_counts``, ``pred_label_counts``, ``grid`` shown when present; with
            ``oracle_label``, ``oracle_agreement`` and ``ambiguous`` the :data:`ORACLE_COLUMNS`
            are written), in the order they should be presented.
        class_names: class names in index order.
        suggestions: optional ``{region_id: class index}`` (e.g. :func:`label_by_source`),
            written as class names to the informational ``suggested`` column.

    Returns:
        ``path`` as a string.

    Raises:
        LabelsFileError: the existing file is malformed or answers a region twice differently
            (it is left untouched).
        ValueError: invalid regions, class names or suggestions.

    Example:
        >>> write_labels_file("run/label/labels.csv", regions, ("0", "1"),
        ...                   suggestions=label_by_source(regions))  # doctest: +SKIP
        'run/label/labels.csv'
    """
    names = check_class_names(class_names)
    ids = check_regions(regions, names)
    suggested = _suggestion_names(suggestions, ids, names)
    old_fields, old = _old_rows(path) if os.path.exists(path) else ([], {})
    extra = [c for c in old_fields if c not in HEADER and c not in ORACLE_COLUMNS]

    rows, stale = [], []
    for region, rid in zip(regions, ids, strict=True):
        row = template_row(region, names, suggested.get(rid, ""))
        prev = old.get(rid)
        if prev is not None:
            row["label"] = prev.get("label", "")
            if suggestions is None and "suggested" in prev:
                row["suggested"] = prev["suggested"]
            row.update({c: prev.get(c, "") for c in extra})
            if row["label"] and any(c in prev and prev[c] != row[c] for c in _STALE_CHECK):
                stale.append(rid)
        rows.append(row)

    dropped = sorted(rid for rid, prev in old.items() if rid not in ids and prev.get("label"))
    if dropped:
        backup = write_backup(path)
        warnings.warn(
            f"{os.fspath(path)}: answers for regions {dropped} dropped (those regions no longer "
            f"exist); the previous file is kept as {backup}",
            stacklevel=2,
        )
    if stale:
        warnings.warn(
            f"{os.fspath(path)}: answered regions {stale} changed (size or top labels differ "
            "from when they were answered); their answers are kept, check them",
            stacklevel=2,
        )
    return write_table(path, [*HEADER, *oracle_columns(regions), *extra], rows)


def _suggestion_names(
    suggestions: Mapping[int, int | None] | None, ids: Sequence[int], names: Sequence[str]
) -> dict[int, str]:
    out: dict[int, str] = {}
    for rid, value in (suggestions or {}).items():
        if int(rid) not in ids:
            raise ValueError(f"suggestion for unknown region {rid}")
        if value is None:
            continue
        value = int(value)
        if not 0 <= value < len(names):
            raise ValueError(f"suggestion for region {rid}: class index {value} out of range")
        out[int(rid)] = canonical_text(value, names)
    return out


def read_labels(
    path: str | os.PathLike, *, region_ids: Iterable[int], class_names: Sequence[str]
) -> dict[int, int | None]:
    """Validate the whole labels file and return its answers.

    Args:
        path: the CSV written by :func:`write_labels_file` (and filled in by a person).
        region_ids: ids of the regions of this run; any other id in the file is an error.
        class_names: class names in index order.

    Returns:
        ``{region_id: class index, or None if skipped}`` for answered rows only; unanswered rows
        and regions missing from the file are omitted.

    Raises:
        LabelsFileError: naming the file and line, for a malformed header or row, an unknown
            region id, a region listed twice, or an unknown class name/index.
        FileNotFoundError: no file at ``path``.

    Example:
        >>> read_labels("run/label/labels.csv", region_ids=[0, 3], class_names=("0", "1"))
        ... # doctest: +SKIP
        {0: 1, 3: None}
    """
    names = check_class_names(class_names)
    known = {int(r) for r in region_ids}
    seen: dict[int, int] = {}
    answers: dict[int, int | None] = {}
    for line, rid, row in read_table(path).rows:
        if rid not in known:
            listed = sorted(known)
            shown = ", ".join(map(str, listed[:20])) + (", ..." if len(listed) > 20 else "")
            raise LabelsFileError(path, line, f"unknown region id {rid} (this run has: {shown})")
        if rid in seen:
            raise LabelsFileError(
                path, line, f"duplicate region id {rid} (already listed on line {seen[rid]})"
            )
        seen[rid] = line
        try:
            value = parse_label(row["label"], names)
        except ValueError as e:
            raise LabelsFileError(path, line, f"region {rid}: {e}") from None
        if not isinstance(value, str):  # UNLABELED rows are omitted
            answers[rid] = value
    return answers


def listed_regions(path: str | os.PathLike) -> list[int]:
    """Region ids a labels file lists, in file order; its structure is checked, answers are not.

    Tells whether a labels file is whole (a truncated one lacks rows or fails to parse) without
    the class names, which :func:`read_labels` needs to check the answers themselves.

    Raises:
        LabelsFileError: an empty file, a malformed header or row.
        FileNotFoundError: no file at ``path``.
    """
    return [rid for _, rid, _ in read_table(path).rows]
