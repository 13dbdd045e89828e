"""Labeling stage: one label per misclassification region (METHOD.md step 3).

A region is one kind of model bug, so one answer per region is enough. This module owns the
labels file (CSV, one row per region) and everything that fills it:

* :func:`write_labels_file` writes the template a person fills in (rewriting it keeps every
  answer already given), :func:`read_labels` validates it and returns the answers;
* :func:`interactive_label` walks a person through the unanswered regions in the terminal,
  saving after every answer, so it can be killed and resumed at any time;
* :func:`label_by_source` / :func:`label_by_oracle` are automatic labelers for unattended runs
  and benchmarks, and :func:`write_auto_labels` stores their answers in the same file format.

File format (UTF-8 CSV, header first)::

    region_id,label,suggested,num_codes,weight,top_source,top_pred,grid
    3,,2,120,0.08,2,7,label/region_003.png

``label`` holds a class name, a class index or ``skip`` (reject the region as invalid or
ambiguous); empty means not answered yet. The other columns are informational. Extra columns a
person adds (e.g. ``notes``) are tolerated and kept when the file is rewritten.

Answers are represented as ``int`` (class index), ``None`` (skipped) and, only in
:func:`parse_label`, the string constant :data:`UNLABELED` (no answer yet).
"""

from __future__ import annotations

import csv
import os
import shutil
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np

from defuse_jax.files import atomic_write
from defuse_jax.labeling.answers import (
    INT_RE,
    SKIP,
    UNLABELED,
    canonical_text,
    check_class_names,
    parse_label,
    valid_answers,
)

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
_REQUIRED: Final = ("region_id", "label")
# Columns compared on rewrite to warn when an answered region id now describes other codes.
_STALE_CHECK: Final = ("num_codes", "top_source", "top_pred")
_CMD_QUIT: Final = ("quit", "exit")
_CMD_BACK: Final = ("back",)
_CMD_HELP: Final = ("?", "help")


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


def _check_regions(regions: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[int]:
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


def _describe_counts(counts: Sequence[int] | None, names: Sequence[str], k: int = 3) -> str:
    """'2: 110 (92%), 3: 10 (8%)' for the k largest non-zero counts."""
    if counts is None:
        return "n/a"
    arr = np.asarray(counts, dtype=np.float64)
    total = float(arr.sum())
    if total <= 0:
        return "none"
    order = np.argsort(-arr, kind="stable")[:k]
    parts = [f"{names[i]}: {int(arr[i])} ({arr[i] / total:.0%})" for i in order if arr[i] > 0]
    return ", ".join(parts)


def _template_row(region: Mapping[str, Any], names: Sequence[str], suggested: str) -> dict:
    weight = region.get("weight")
    num_codes = region.get("num_codes")
    return {
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
class _Table:
    """Structurally valid labels file: header and rows (line number, region id, cells)."""

    fieldnames: list[str]
    rows: list[tuple[int, int, dict[str, str]]] = field(default_factory=list)


def _read_table(path: str | os.PathLike) -> _Table:
    """Read the CSV, checking only structure (header, field counts, region ids)."""
    # utf-8-sig: spreadsheets often save a byte-order mark.
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)  # e.g. an unclosed quote is an error
        header: list[str] | None = None
        table: _Table | None = None
        try:
            for cells in reader:
                line = reader.line_num
                if not any(c.strip() for c in cells):
                    continue  # blank lines are harmless
                if header is None:
                    header = [c.strip() for c in cells]
                    _check_header(path, line, header)
                    table = _Table(fieldnames=header)
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


def _write_table(path: str | os.PathLike, fieldnames: Sequence[str], rows: Iterable[dict]) -> str:
    """Write atomically: a reader (or a killed process) never sees a half-written file."""
    path = os.fspath(path)
    with atomic_write(path, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fieldnames), lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in fieldnames})
    return path


def _backup(path: str | os.PathLike) -> str:
    """Copy the file to the first free ``<path>.bak``, ``<path>.bak1``, ... (never overwrites)."""
    path = os.fspath(path)
    n = 0
    while os.path.exists(backup := f"{path}.bak{n or ''}"):
        n += 1
    # Atomically too: a kill mid-copy must not leave a truncated backup that looks like the answers.
    with open(path, "rb") as src, atomic_write(backup, "wb") as dst:
        shutil.copyfileobj(src, dst)
    shutil.copystat(path, backup)
    return backup


def _old_rows(path: str | os.PathLike) -> tuple[list[str], dict[int, dict[str, str]]]:
    """Previous rows by region id; duplicates are merged unless their answers conflict."""
    table = _read_table(path)
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
            ``source_label_counts``, ``pred_label_counts``, ``grid`` shown when present), in the
            order they should be presented.
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
    ids = _check_regions(regions, names)
    suggested = _suggestion_names(suggestions, ids, names)
    old_fields, old = _old_rows(path) if os.path.exists(path) else ([], {})
    extra = [c for c in old_fields if c not in HEADER]

    rows, stale = [], []
    for region, rid in zip(regions, ids, strict=True):
        row = _template_row(region, names, suggested.get(rid, ""))
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
        backup = _backup(path)
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
    return _write_table(path, list(HEADER) + extra, rows)


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
    for line, rid, row in _read_table(path).rows:
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
    return [rid for _, rid, _ in _read_table(path).rows]


# --------------------------------------------------------------------------------------------
# Automatic labelers


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

    Same columns as :func:`write_labels_file` plus a trailing ``labeler`` column, so an
    unattended run leaves the artefact a person would, and :func:`read_labels` reads either.
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
    ids = _check_regions(regions, names)
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
        row = _template_row(region, names, "" if value is None else text)
        row["label"] = text
        row["labeler"] = labeler if text else ""
        rows.append(row)
    return _write_table(path, list(HEADER) + ["labeler"], rows)


def _backup_if_answers_differ(
    path: str | os.PathLike, new: Mapping[int, str], names: Sequence[str]
) -> None:
    try:
        old_rows = [(rid, row["label"]) for _, rid, row in _read_table(path).rows]
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
    backup = _backup(path)
    warnings.warn(
        f"{os.fspath(path)}: overwritten with automatic labels; the previous answers are kept in "
        f"{backup}",
        stacklevel=3,
    )


# --------------------------------------------------------------------------------------------
# Interactive labeling


def _help_text(names: Sequence[str]) -> str:
    classes = "\n".join(f"    {i:>3}  {n}" for i, n in enumerate(names))
    return (
        "Look at the grid of samples decoded from the region (titles: the classifier's "
        "predictions)\nand type the class the samples really show:\n"
        f"{classes}\n"
        "  a class name (case-insensitive) or index   label the region\n"
        f"  {SKIP:<41}reject it (garbage or ambiguous samples)\n"
        "  back                                      revisit the previous region\n"
        "  quit (or Ctrl-D / Ctrl-C)                 stop; answers so far are saved\n"
        "  ?, help                                   this text\n"
        "Answers are saved after each one; rerun to resume. Class names that collide with a\n"
        "command (skip, back, quit, exit, help) are given by index."
    )


def _lenient_answers(
    rows: Sequence[tuple[int, int, dict[str, str]]],
    names: Sequence[str],
    path: str | os.PathLike,
    print_fn: Callable[..., Any],
) -> dict[int, int | None]:
    """Valid answers in the file; invalid ones are reported and treated as unanswered."""
    answers: dict[int, int | None] = {}
    for line, rid, row in rows:
        try:
            value = parse_label(row["label"], names)
        except ValueError as e:
            print_fn(f"{os.fspath(path)}, line {line}: region {rid}: {e} (asking again)")
            continue
        if not isinstance(value, str):
            answers[rid] = value
    return answers


def interactive_label(
    path: str | os.PathLike,
    regions: Sequence[Mapping[str, Any]],
    class_names: Sequence[str],
    *,
    run_dir: str | os.PathLike = ".",
    input_fn: Callable[[str], str] = input,
    print_fn: Callable[..., Any] = print,
) -> dict[int, int | None]:
    """Walk a person through the regions not yet answered in the labels file.

    The file is created (or synced with ``regions``, keeping answers) first. For each unanswered
    region the session prints its id, size and weight, top source and predicted labels, the
    absolute path of its grid PNG and the suggested label, then asks for a class name or index,
    ``skip``, ``back``, ``quit`` or ``?``. Invalid input re-prompts. The file is saved
    atomically after every answer, so a killed session loses nothing and the next one resumes at
    the first unanswered region. ``quit``, EOF (Ctrl-D) and Ctrl-C end the session cleanly.
    Answers in the file that do not parse are reported and asked again.

    Args:
        path: the labels CSV.
        regions: region dicts (see :func:`write_labels_file`), in presentation order.
        class_names: class names in index order.
        run_dir: directory the regions' ``grid`` paths are relative to.
        input_fn: reads one answer (tests pass a scripted function).
        print_fn: writes one message.

    Returns:
        ``{region_id: class index or None (skip)}`` for every answered region in the file.

    Example:
        >>> interactive_label("run/label/labels.csv", regions, ("0", "1"), run_dir="run")
        ... # doctest: +SKIP
    """
    names = check_class_names(class_names)
    ids = _check_regions(regions, names)
    write_labels_file(path, regions, names)  # creates or syncs; keeps answers and suggestions
    table = _read_table(path)
    rows = {rid: row for _, rid, row in table.rows}
    answers = _lenient_answers(table.rows, names, path, print_fn)
    queue = [(region, rid) for region, rid in zip(regions, ids, strict=True) if rid not in answers]

    if not queue:
        print_fn(f"All {len(ids)} regions are already answered in {os.fspath(path)}.")
        return _final_answers(path, ids, names, print_fn)
    print_fn(
        f"Labeling {len(queue)} of {len(ids)} regions ({len(ids) - len(queue)} already "
        f"answered); answers go to {os.fspath(path)}. Type ? for help."
    )

    i = 0
    try:
        while i < len(queue):
            region, rid = queue[i]
            _show_region(region, rid, rows[rid], i, len(queue), names, run_dir, answers, print_fn)
            step = _ask(rid, names, input_fn, print_fn, can_go_back=i > 0)
            if step == "quit":
                break
            if step == "back":
                i -= 1
                continue
            rows[rid]["label"] = canonical_text(step, names)
            if "labeler" in rows[rid]:  # file came from write_auto_labels: record who answered
                rows[rid]["labeler"] = "interactive"
            _write_table(path, table.fieldnames, (row for _, _, row in table.rows))
            answers[rid] = step
            print_fn(f"  region {rid}: {'skipped' if step is None else names[step]} (saved)")
            i += 1
    except KeyboardInterrupt:
        # Every answer is already on disk; nothing to flush.
        print_fn("\nInterrupted.")
    return _final_answers(path, ids, names, print_fn)


def _ask(
    rid: int,
    names: Sequence[str],
    input_fn: Callable[[str], str],
    print_fn: Callable[..., Any],
    *,
    can_go_back: bool,
) -> int | None | Literal["quit", "back"]:
    """Prompt until a valid answer or command."""
    prompt = f"label for region {rid} [class name/index, skip, back, quit, ?]: "
    while True:
        try:
            text = input_fn(prompt)
        except EOFError:
            print_fn("")
            return "quit"
        command = text.strip().casefold()
        if command in _CMD_HELP:
            print_fn(_help_text(names))
            continue
        if command in _CMD_QUIT:
            return "quit"
        if command in _CMD_BACK:
            if can_go_back:
                return "back"
            print_fn("  nothing to go back to in this session")
            continue
        try:
            value = parse_label(text, names)
        except ValueError as e:
            print_fn(f"  {e}")
            continue
        if isinstance(value, str):  # empty input
            print_fn(f"  no answer given; type {valid_answers(names)} (? for help)")
            continue
        return value


def _show_region(
    region: Mapping[str, Any],
    rid: int,
    row: Mapping[str, str],
    i: int,
    n: int,
    names: Sequence[str],
    run_dir: str | os.PathLike,
    answers: Mapping[int, int | None],
    print_fn: Callable[..., Any],
) -> None:
    grid = region.get("grid")
    if grid:
        grid_path = os.path.abspath(os.path.join(os.fspath(run_dir), os.fspath(grid)))
        grid_text = grid_path + ("" if os.path.exists(grid_path) else "  (file missing)")
    else:
        grid_text = "(none)"
    size = []
    if region.get("num_codes") is not None:
        size.append(f"{int(region['num_codes'])} error codes")
    if region.get("weight") is not None:
        size.append(f"weight {float(region['weight']):.3f}")
    print_fn("")
    print_fn(f"Region {rid}  ({i + 1}/{n})  " + ", ".join(size))
    print_fn(f"  source labels:    {_describe_counts(region.get('source_label_counts'), names)}")
    print_fn(f"  predicted labels: {_describe_counts(region.get('pred_label_counts'), names)}")
    print_fn(f"  grid:             {grid_text}")
    print_fn(f"  suggested:        {row.get('suggested') or '(none)'}")
    if rid in answers:
        current = answers[rid]
        print_fn(f"  current answer:   {SKIP if current is None else names[current]}")


def _final_answers(
    path: str | os.PathLike,
    ids: Sequence[int],
    names: Sequence[str],
    print_fn: Callable[..., Any],
) -> dict[int, int | None]:
    try:
        answers = read_labels(path, region_ids=ids, class_names=names)
    except LabelsFileError as e:  # leftover invalid answers the person did not reach
        print_fn(f"warning: {e}")
        answers = _lenient_answers(_read_table(path).rows, names, path, lambda *a, **k: None)
    skipped = sum(v is None for v in answers.values())
    left = len(ids) - len(answers)
    print_fn(
        f"{len(answers)}/{len(ids)} regions answered ({skipped} skipped) in {os.fspath(path)}"
        + (f"; rerun to label the remaining {left}." if left else ".")
    )
    return answers
