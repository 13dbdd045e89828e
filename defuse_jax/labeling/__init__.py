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

import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

import numpy as np

from defuse_jax.labeling.answers import (
    SKIP,
    UNLABELED,
    canonical_text,
    check_class_names,
    parse_label,
    valid_answers,
)
from defuse_jax.labeling.labels_file import (
    HEADER,
    LabelsFileError,
    check_regions,
    listed_regions,
    read_labels,
    read_table,
    template_row,
    write_backup,
    write_labels_file,
    write_table,
)

__all__ = [
    "HEADER",
    "SKIP",
    "UNLABELED",
    "LabelsFileError",
    "interactive_label",
    "label_by_oracle",
    "label_by_source",
    "listed_regions",
    "parse_label",
    "read_labels",
    "write_auto_labels",
    "write_labels_file",
]

_CMD_QUIT: Final = ("quit", "exit")
_CMD_BACK: Final = ("back",)
_CMD_HELP: Final = ("?", "help")


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
    return write_table(path, list(HEADER) + ["labeler"], rows)


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
    ids = check_regions(regions, names)
    write_labels_file(path, regions, names)  # creates or syncs; keeps answers and suggestions
    table = read_table(path)
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
            write_table(path, table.fieldnames, (row for _, _, row in table.rows))
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
        answers = _lenient_answers(read_table(path).rows, names, path, lambda *a, **k: None)
    skipped = sum(v is None for v in answers.values())
    left = len(ids) - len(answers)
    print_fn(
        f"{len(answers)}/{len(ids)} regions answered ({skipped} skipped) in {os.fspath(path)}"
        + (f"; rerun to label the remaining {left}." if left else ".")
    )
    return answers
