"""Map frozen config dataclasses onto argparse flags and back, and the CLI's conventions.

`add_flags(parser, TrainConfig, prefix="clf-")` adds `--clf-epochs`, `--clf-batch-size`, ...
with the dataclass defaults; `from_flags(args, TrainConfig, prefix="clf-")` builds the config.
Booleans become `--flag/--no-flag`, tuples take several values, Literals become choices, help
comes from the Google-style `Attributes:` docstring section.

Conventions of every command: `--out DIR` is a run directory (pipeline commands, `sweep`,
`bench search`'s trained run); a benchmark's JSON file is `--json PATH`; lists are
space-separated (`nargs`, as config tuples are), and a comma inside a list value is rejected
with the fix (`list_of`); renamed flags fail with their new name (`renamed`).

Why not a library. tyro (`tyro.cli(RunConfig, default=saved)`) and ml_collections' config flags
(big_vision) were evaluated. Both derive flag names from the nesting, `--vae-train.epochs` or
`--config.vae_train.epochs`, where the CLI has `--vae-epochs` / `--clf-epochs` / `--search-*`
(prefixes grouping a model with its training); adopting either renames every flag that the
README, the notebook and users' scripts use. Neither removes the part that is not generic:
`vae`/`classifier` = None means "chosen from the image shape", resolved only after the data
flags and the saved config are merged (`cli.resolve`), and "flags left out keep the run
directory's saved values" needs the set of flags actually typed, which argparse's SUPPRESS gives
directly. A library would add a dependency and still need that logic, so this stays a small
argparse mapping over the dataclasses.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable
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


def list_of(elem: Callable[[str], Any]) -> Callable[[str], Any]:
    """argparse `type` for one element of a space-separated list (`nargs="+"`).

    A comma inside a value is the old comma-list spelling: it fails with the fix rather than as
    an unreadable value.
    """

    def parse(text: str) -> Any:
        if "," in text:
            fixed = " ".join(t for t in text.split(",") if t.strip())
            raise argparse.ArgumentTypeError(
                f"lists are space-separated: write {fixed!r} instead of {text!r}"
            )
        return elem(text)

    parse.__name__ = getattr(elem, "__name__", "value")
    return parse


class _Renamed(argparse.Action):
    def __init__(self, option_strings, dest, *, new: str, **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs="*", help=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(f"{option_string} was renamed: use {self.new}")


def renamed(parser: argparse.ArgumentParser, old: str, new: str) -> None:
    """A hidden flag `old` that fails with "use `new`" (`new` may be a sentence)."""
    parser.add_argument(old, action=_Renamed, new=new, dest=f"_renamed_{old.strip('-')}")


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
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        dest = _dest(prefix, rename.get(f.name, f.name))
        if hasattr(args, dest):
            value = getattr(args, dest)
            # None is "unset" for a field that cannot hold it; one that can (e.g.
            # --search-num-samples none: sized from the data) takes it over `base`'s value.
            if (
                base is not None
                and value is None
                and type(None) not in typing.get_args(hints[f.name])
            ):
                continue
            kwargs[f.name] = tuple(value) if isinstance(value, list) else value
    kwargs.update(overrides)
    return cls(**kwargs)
