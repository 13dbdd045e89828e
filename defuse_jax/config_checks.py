"""Declarative checks of configuration fields: a config lists its rules, `check_fields` applies
them.

A rule is a predicate and what the value must be, in words. The checks run in `__post_init__`,
so a bad value fails where the config is made: from the command line, before any stage moves an
output aside or saves the config into the run directory.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple


class Rule(NamedTuple):
    ok: Callable[[Any], bool]
    must_be: str  # completes "it must be ..."


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


POSITIVE_INT = Rule(lambda v: _is_int(v) and v >= 1, "an integer >= 1")
POSITIVE = Rule(lambda v: _is_real(v) and v > 0, "a number > 0")
NON_NEGATIVE = Rule(lambda v: _is_real(v) and v >= 0, "a number >= 0")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "an integer >= 0")
OPTIONAL_SHIFTS = Rule(
    lambda v: v is None or (isinstance(v, tuple) and len(v) > 0 and len(set(v)) == len(v)
                            and all(NON_NEGATIVE_INT.ok(s) for s in v)),
    "None, an integer >= 0, or distinct integers >= 0",
)  # fmt: skip
OPTIONAL_POSITIVE_INT = Rule(lambda v: v is None or POSITIVE_INT.ok(v), "an integer >= 1 or None")


def check_fields(config: Any, rules: Mapping[str, Rule]) -> None:
    """Raises ValueError naming the first field of `config` that breaks its rule.

    Args:
        config: a configuration dataclass instance.
        rules: {field name: `Rule`}.
    """
    for name, rule in rules.items():
        value = getattr(config, name)
        if not rule.ok(value):
            raise ValueError(
                f"{type(config).__name__}: {name}={value!r}; it must be {rule.must_be}."
            )


def fingerprint_fields(config: Any, *, only: tuple[str, ...] | None = None) -> dict[str, Any]:
    """`dataclasses.asdict(config)` as fingerprints record it: a field listed in the class's
    `LATER_DEFAULTS` ({name: value}, fields added after runs were made) is left out while it
    holds that value, so that runs made before the field existed keep their fingerprints.
    `only`: leave out these of them alone (a record that began after the others)."""
    return without_later_defaults(dataclasses.asdict(config), type(config), only=only)


def without_later_defaults(
    settings: Mapping[str, Any], cls: type, *, only: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """`settings` (a recorded `dataclasses.asdict` of a `cls`) without the fields that
    `fingerprint_fields` leaves out; fields the record lacks stay absent."""
    out = dict(settings)
    for name, value in getattr(cls, "LATER_DEFAULTS", {}).items():
        if (only is None or name in only) and name in out and out[name] == value:
            del out[name]
    return out
