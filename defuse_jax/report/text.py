"""Formatting shared by the report's Markdown and plots: percentages, cells, class names."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final

_NA: Final = "n/a"


def pct(x: float | None) -> str:
    """A fraction as a percentage with one decimal ("n/a" for None)."""
    return _NA if x is None else f"{100.0 * float(x):.1f}%"


def _pp(before: float | None, after: float | None) -> str:
    if before is None or after is None:
        return _NA
    return f"{100.0 * (float(after) - float(before)):+.1f} pp"


def _cell(text: Any) -> str:
    """Escape a value for a Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _class_name(class_names: Sequence[str], idx: int | None) -> str:
    if idx is None:
        return _NA
    idx = int(idx)
    return str(class_names[idx]) if 0 <= idx < len(class_names) else str(idx)


def _is_labeled(region: Mapping[str, Any]) -> bool:
    return not region.get("skipped") and region.get("label") is not None


def _region_label(region: Mapping[str, Any], class_names: Sequence[str]) -> str:
    if region.get("skipped"):
        return "skipped"
    if region.get("label") is None:
        return "unlabeled" if region.get("error_region", True) else "not an error region"
    return region.get("label_name") or _class_name(class_names, region["label"])
