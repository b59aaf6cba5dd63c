"""``--dashed-flags`` of the command line, made from :class:`~sccoreset.tl.StreamConfig`'s fields."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, get_args, get_origin

from ._config import StreamConfig, option_fields


# -- flags made from StreamConfig's fields -------------------------------------------------------
def _none_or(base: type) -> typing.Callable[[str], Any]:
    """A converter for an optional ``int`` / ``float``: ``none`` (any case) gives None."""

    def convert(text: str) -> Any:
        return None if text.lower() == "none" else base(text)

    convert.__name__ = f"{base.__name__} or none"  # argparse names the type in its error message
    return convert


def _flag_kwargs(hint: Any) -> dict[str, Any]:
    """``add_argument`` keywords for a field of type ``hint``; values are checked again by StreamConfig."""
    origin, args = get_origin(hint), get_args(hint)
    if hint is bool:
        return {"action": argparse.BooleanOptionalAction}
    if origin is Literal:
        return {"type": type(args[0]), "choices": args}
    if origin is tuple:
        base = args[0] if args and args[0] in (int, float) else str
        return {"type": base, "nargs": "+"} | ({"metavar": "N" if base is int else "X"} if base is not str else {})
    if origin in (typing.Union, types.UnionType):
        tuples = [a for a in args if get_origin(a) is tuple]
        if tuples:  # obs keys (budget_key: tuple[str, ...] | None): comma-separated, so files after them stay files
            return {"type": _keys, "metavar": "KEY[,KEY...]"}
        simple = [a for a in args if a in (int, float, str)]
        base = simple[0] if simple else str
        if type(None) in args and base is not str:
            return {"type": _none_or(base), "metavar": f"{{{base.__name__},none}}"}
        return {"type": base} if base is str else {"type": base, "metavar": "N" if base is int else "X"}
    if hint in (int, float):
        return {"type": hint, "metavar": "N" if hint is int else "X"}
    return {"type": str}


def _keys(text: str) -> tuple[str, ...] | None:
    """Comma-separated obs keys; ``none`` (any case) gives None."""
    return None if text.lower() == "none" else tuple(text.split(","))


def _show_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple | list):
        return " ".join(map(str, value))
    return str(value)


def _help(field: Any) -> str:
    text = field.metadata.get("doc", "").replace("``", "")
    return f"{text} (default: {_show_default(field.default)})".replace("%", "%%")


def flag(name: str) -> str:
    """The command-line flag of an option: ``buffer_size`` -> ``--buffer-size``."""
    return "--" + name.replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`StreamConfig` option; a value not given is left out of the namespace."""
    hints = typing.get_type_hints(StreamConfig)
    group = parser.add_argument_group(
        "training options", "The options of sccoreset.tl.stream_train (StreamConfig); 'none' gives None."
    )
    for f in option_fields():
        if not f.metadata.get("cli", True):
            continue
        group.add_argument(
            flag(f.name), dest=f.name, default=argparse.SUPPRESS, help=_help(f), **_flag_kwargs(hints[f.name])
        )


def config_options(ns: argparse.Namespace) -> dict[str, Any]:
    """The StreamConfig options given on the command line, as keyword arguments."""
    out = {}
    for f in option_fields():
        if hasattr(ns, f.name):
            value = getattr(ns, f.name)
            out[f.name] = tuple(value) if isinstance(value, list) else value
    return out


# -- the parser ----------------------------------------------------------------------------------
