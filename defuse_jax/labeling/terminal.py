"""The terminal session: a person labels the unanswered regions one at a time.

:func:`interactive_label` shows each unanswered region (size, top labels, the path of its grid
of decoded samples, the suggestion) and asks for an answer or a command (``skip``, ``back``,
``quit``, ``?``). The labels file is saved after every answer, so a session can be killed and
resumed at any time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal

import numpy as np

from defuse_jax.labeling.answers import (
    SKIP,
    canonical_text,
    check_class_names,
    parse_label,
    valid_answers,
)
from defuse_jax.labeling.labels_file import (
    LabelsFileError,
    check_regions,
    read_labels,
    read_table,
    write_labels_file,
    write_table,
)

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
    absolute path of its grid PNG and the suggested label (with the oracle classifier's verdict
    and the ambiguous flag when the file has the oracle's columns), then asks for a class name or
    index, ``skip``, ``back``, ``quit`` or ``?``. Invalid input re-prompts. The file is saved
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
    if row.get("oracle_agreement"):
        verdict = (
            "AMBIGUOUS: the oracle disagrees with the suggestion on most samples; look twice"
            if row.get("ambiguous")
            else "agrees with the suggestion"
        )
        print_fn(
            f"  oracle:           says {row.get('oracle') or '?'}; on "
            f"{_share(row['oracle_agreement'])} of fresh samples it says the suggested label "
            f"({verdict})"
        )
    if rid in answers:
        current = answers[rid]
        print_fn(f"  current answer:   {SKIP if current is None else names[current]}")


def _share(text: str) -> str:
    """'0.23' -> '23%' (the text itself if it is no number)."""
    try:
        return f"{float(text):.0%}"
    except ValueError:
        return text


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
