"""Map frozen config dataclasses onto argparse flags and back.

`add_flags(parser, TrainConfig, prefix="clf-")` adds `--clf-epochs`, `--clf-batch-size`, ...
with the dataclass defaults; `from_flags(args, TrainConfig, prefix="clf-")` builds the config.
Booleans become `--flag/--no-flag`, tuples take several values, Literals become choices.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field descriptions from the Google-style `Attributes:` section of `cls`'s docstring."""
    docs: dict[str, str] = {}
    lines = (cls.__doc__ or "").splitlines()
    current = None
    inside = False
    for line in lines:
        stripped = line.strip()
        if stripped == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not stripped:
            current = None
            continue
        head, sep, rest = stripped.partition(":")
        if sep and head.isidentifier() and " " not in head:
            current = head
            docs[current] = rest.strip()
        elif current is not None:
            docs[current] += " " + stripped
    return docs


def _dest(prefix: str, name: str) -> str:
    return (prefix + name).replace("-", "_")


def add_flags(
    parser: argparse.ArgumentParser,
    cls: type,
    *,
    prefix: str = "",
    defaults: Any = None,
    skip: tuple[str, ...] = (),
    rename: dict[str, str] | None = None,
    unset_default: str | None = None,
    suppress: bool = False,
) -> None:
    """Add one flag per field of dataclass `cls` (defaults from `defaults` or the class).

    With `unset_default` (a description such as "chosen from the image shape"), every flag
    defaults to None and `from_flags(..., base=...)` fills the unset ones from a base config.
    With `suppress`, flags not given on the command line are absent from the parsed namespace
    (the help still shows the default), so `from_flags(..., base=...)` overrides only what the
    user typed.
    """
    rename = rename or {}
    hints = _field_types(cls)
    docs = _attribute_docs(cls)
    group = parser.add_argument_group(f"{cls.__name__} ({prefix or 'no prefix'})")
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        default = getattr(defaults, f.name) if defaults is not None else f.default
        if unset_default is not None:
            default = None
        name = rename.get(f.name, f.name)
        flag = "--" + prefix + name.replace("_", "-")
        dest = _dest(prefix, name)
        tp, optional = _unwrap_optional(hints[f.name])
        origin = typing.get_origin(tp)
        shown = unset_default if unset_default is not None else default
        if suppress:
            default = argparse.SUPPRESS
        help_ = f"{docs.get(f.name, '')} (default: {shown})".replace("%", "%%").strip()
        if tp is bool:
            group.add_argument(
                flag, dest=dest, action=argparse.BooleanOptionalAction, default=default, help=help_
            )
        elif origin is Literal:
            group.add_argument(
                flag, dest=dest, choices=list(typing.get_args(tp)), default=default, help=help_
            )
        elif origin is tuple:
            elem = typing.get_args(tp)[0]
            group.add_argument(flag, dest=dest, nargs="+", type=elem, default=default, help=help_)
        else:
            conv = _optional(tp) if optional else tp
            group.add_argument(flag, dest=dest, type=conv, default=default, help=help_)


def given(args: argparse.Namespace, cls: type, *, prefix: str = "", rename=None) -> bool:
    """Whether any flag of `cls` is present in `args` (see `add_flags(suppress=True)`)."""
    rename = rename or {}
    return any(
        hasattr(args, _dest(prefix, rename.get(f.name, f.name))) for f in dataclasses.fields(cls)
    )


def _optional(tp: Any):
    def parse(s: str):
        return None if s.lower() in ("none", "") else tp(s)

    parse.__name__ = getattr(tp, "__name__", "value")
    return parse


def from_flags(
    args: argparse.Namespace,
    cls: type,
    *,
    prefix: str = "",
    rename: dict[str, str] | None = None,
    base: Any = None,
    **overrides: Any,
) -> Any:
    """Build `cls` from the parsed flags that `add_flags` added (plus `overrides`).

    With `base`, flags left at None take `base`'s value (see `add_flags(unset_default=...)`).
    """
    rename = rename or {}
    # Shallow: nested dataclass fields of `base` stay dataclasses.
    kwargs = {f.name: getattr(base, f.name) for f in dataclasses.fields(base)} if base else {}
    for f in dataclasses.fields(cls):
        dest = _dest(prefix, rename.get(f.name, f.name))
        if hasattr(args, dest):
            value = getattr(args, dest)
            if base is not None and value is None:
                continue
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    kwargs.update(overrides)
    return cls(**kwargs)
