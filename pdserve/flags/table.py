"""Flag tables: one row per command-line flag, the frozen-config field it sets, and the two
helpers that turn a table into argparse arguments and parsed arguments back into that config.

A row (`Flag`) holds the flag's spellings (pdserve's first, then SGLang's and vLLM's aliases),
the config field it sets ("retry.max_attempts": field `max_attempts` of the nested config
`retry`), how its text is read (`type`, `choices`, `nargs`) and its help. `add_flags` shows in
--help the default it reads from the config the table is built over, so a default is written
once, in its frozen dataclass. A switch (`type` None) is present or not; present, it sets its
field to `const`, after every valued flag (`--disable-retries` wins over `--retry-max-retries`).

    argv ──argparse──▶ Namespace ──flag_values──▶ {field: value} ──with_values(config)──▶ config

Every argparse default is None: the Namespace tells which flags the command line gave (the
engine's combination rules need that), `flag_values` takes only those, and the config keeps its
own default for the rest (and an environment knob under a flag keeps its say). A peer's flag
that changes nothing here is accepted with `noop` set (its field None): `noop_warnings` says so.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

@dataclass(frozen=True)
class Flag:
    """One flag: its spellings, the config field it sets and how its text is read."""

    names: tuple[str, ...]
    field: str | None  # the config field ("a.b": field b of nested config a); None: read by the builder itself
    type: Callable[[str], Any] | None  # None: a switch, no value
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | tuple[str, ...] | None = None
    nargs: str | None = None  # argparse's: "+", "*", "?" (given bare, the flag's value is `const`)
    repeat: bool = False  # each use appends a value (argparse's action="append")
    const: Any = True  # a switch: the field's value when the switch is present
    unit: float = 1.0  # the field holds value x unit (a flag in ms over a field in seconds: 0.001)
    shown: str | None = None  # the default --help names, where the config's is not what to say
    noop: str | None = None  # accepted for a peer's sake but without effect here: why (`noop_warnings`)

    @property
    def dest(self) -> str:
        """Where argparse puts it: the field (dots as underscores), a switch or builder flag by its name."""
        if self.type is None or self.field is None:
            return self.names[0].lstrip("-").replace("-", "_")
        return self.field.replace(".", "_")


def noop_warnings(args: argparse.Namespace, flags: Iterable[Flag]) -> list[str]:
    """One line per flag given that has no effect in pdserve (a peer's flag accepted so its
    command lines run): the flag and why."""
    return [f"{f.names[0]} has no effect: {f.noop}" for f in flags
            if f.noop is not None and getattr(args, f.dest, None) not in (None, False)]


def field_value(config: object, field: str) -> Any:
    """`config`'s value of a (dotted) field."""
    for part in field.split("."):
        config = getattr(config, part)
    return config


def with_values(config: Any, values: Mapping[str, Any]) -> Any:
    """A copy of the frozen `config` with (dotted) fields replaced; nested configs are copied too."""
    flat = {k: v for k, v in values.items() if "." not in k}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in values.items():
        if "." in key:
            head, _, rest = key.partition(".")
            nested.setdefault(head, {})[rest] = value
    flat.update({head: with_values(getattr(config, head), sub) for head, sub in nested.items()})
    return dataclasses.replace(config, **flat) if flat else config


def _shown_value(flag: Flag, config: object) -> Any:
    """The flag's default as typed on the command line (the config's value over its unit)."""
    if flag.field is None or flag.type is None:
        return None
    value = field_value(config, flag.field)
    return value / flag.unit if value is not None and flag.unit != 1.0 else value


def _text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def help_text(flag: Flag, config: object) -> str:
    """The flag's help with its default: `shown` (words), else the config's value (none for a
    switch or a None)."""
    if flag.shown is not None:
        return f"{flag.help} (default: {flag.shown})".strip()
    value = _shown_value(flag, config)
    return flag.help if value is None else f"{flag.help} (default {_text(value)})".strip()


def add_flags(group: Any, flags: Iterable[Flag], config: object) -> None:
    """Put `flags` on an argparse parser or argument group; their --help defaults read from `config`."""
    for f in flags:
        kwargs: dict[str, Any] = {"dest": f.dest, "help": help_text(f, config)}
        if f.type is None:
            kwargs.update(action="store_true")
        else:
            metavar = f.metavar or (None if f.choices else f.names[0].lstrip("-").replace("-", "_").upper())
            kwargs.update(type=f.type, choices=f.choices, metavar=metavar, nargs=f.nargs, default=None,
                          action="append" if f.repeat else "store")
            if f.nargs == "?":
                kwargs["const"] = f.const
        group.add_argument(*f.names, **kwargs)


def flag_values(args: argparse.Namespace, flags: Iterable[Flag], config: object) -> dict[str, Any]:
    """{field: value} of every flag with a field that the command line gave (units applied: an
    int field stays int; a list becomes a tuple), switches last."""
    values: dict[str, Any] = {}
    switches: dict[str, Any] = {}
    for f in flags:
        value = getattr(args, f.dest)
        if f.field is None or value is None or value is False:
            continue
        if f.type is None:
            switches[f.field] = f.const
        elif f.unit != 1.0:
            scaled = value * f.unit
            values[f.field] = int(scaled) if isinstance(field_value(config, f.field), int) else scaled
        else:
            values[f.field] = tuple(value) if isinstance(value, list) else value
    return {**values, **switches}
