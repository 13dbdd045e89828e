"""The answer grammar: what may be written for a region, and what it means.

An answer is a class name, a class index or ``skip`` (reject the region as invalid or
ambiguous); empty means not answered yet. :func:`parse_label` reads one answer, from the labels
file or the terminal; :func:`canonical_text` is the text stored for an answer so that it reads
back as the same answer; :func:`check_class_names` checks the class names every answer is read
against.

Answers are represented as ``int`` (class index), ``None`` (skipped) and, only in
:func:`parse_label`, the string constant :data:`UNLABELED` (no answer yet).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Final, Literal

SKIP: Final = "skip"
"""Answer that rejects a region (garbage or ambiguous samples); read back as ``None``."""

UNLABELED: Final = "unlabeled"
"""Returned by :func:`parse_label` for an empty answer. A string sentinel: it can never be
mistaken for a class index (``int``) or a skip (``None``), and it is JSON-able."""

INT_RE: Final = re.compile(r"[+-]?\d+")
"""An integer, as a class index or a region id is written."""


def check_class_names(class_names: Sequence[str]) -> tuple[str, ...]:
    """Check the class names answers are read against.

    Args:
        class_names: the dataset's class names, in index order.

    Returns:
        The names as a tuple.

    Raises:
        ValueError: no names, a name that is not a non-empty string, or a name given twice.
    """
    names = tuple(class_names)
    if not names:
        raise ValueError("class_names is empty")
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class names must be non-empty strings, got {name!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names must be unique, got {names}")
    return names


def valid_answers(names: Sequence[str]) -> str:
    """What may be answered, for error messages and prompts (at most 30 names are listed).

    Args:
        names: checked class names, in index order.

    Returns:
        E.g. ``"a class name (0, 1), an index 0..1, or 'skip'"``.
    """
    shown = ", ".join(names[:30]) + (f", ... ({len(names)} classes)" if len(names) > 30 else "")
    return f"a class name ({shown}), an index 0..{len(names) - 1}, or '{SKIP}'"


def parse_label(text: str, class_names: Sequence[str]) -> int | None | Literal["unlabeled"]:
    """Parse one answer from the labels file or the terminal.

    Resolution order: empty -> :data:`UNLABELED`; ``skip`` (any case) -> ``None``; exact class
    name; case-insensitive class name (only if exactly one matches); integer class index. So a
    name wins over an index (with names ``("3", "5")``, ``"5"`` is class 1), and a class literally
    named ``skip`` can only be given by its index.

    Args:
        text: the answer; surrounding whitespace is ignored.
        class_names: the dataset's class names, in index order.

    Returns:
        The class index, ``None`` for a skipped region, or :data:`UNLABELED` for an empty answer.

    Raises:
        ValueError: unknown name, ambiguous name or index out of range; the message lists the
            valid answers.

    Example:
        >>> parse_label("Smiling", ("not_smiling", "smiling"))
        1
        >>> parse_label("0", ("not_smiling", "smiling")), parse_label(" skip ", ("a", "b"))
        (0, None)
    """
    names = check_class_names(class_names)
    s = str(text).strip()
    if not s:
        return UNLABELED
    if s.casefold() == SKIP:
        return None
    if s in names:
        return names.index(s)
    folded = [i for i, n in enumerate(names) if n.casefold() == s.casefold()]
    if len(folded) == 1:
        return folded[0]
    if len(folded) > 1:
        matches = ", ".join(names[i] for i in folded)
        raise ValueError(f"label {s!r} is ambiguous ({matches}); give the exact name or index")
    if INT_RE.fullmatch(s):
        index = int(s)
        if 0 <= index < len(names):
            return index
        raise ValueError(f"class index {index} out of range; expected {valid_answers(names)}")
    raise ValueError(f"unknown label {s!r}; expected {valid_answers(names)}")


def canonical_text(value: int | None, names: Sequence[str]) -> str:
    """Text to store for an answer: the class name, unless that would parse to something else.

    Args:
        value: a class index, or ``None`` for a skipped region.
        names: checked class names, in index order.

    Returns:
        :data:`SKIP`, the class name, or the index as text when the name reads as another class.

    Raises:
        ValueError: neither the name nor the index reads back as ``value``.
    """
    if value is None:
        return SKIP
    for candidate in (names[value], str(value)):
        try:
            if parse_label(candidate, names) == value:
                return candidate
        except ValueError:
            pass
    raise ValueError(f"class {value} ({names[value]!r}) cannot be written unambiguously")
