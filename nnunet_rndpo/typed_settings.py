"""Typed settings: each setting is one dataclass field with its type, default, help and bounds, and everything
else is generated from that one definition: the validation (`check_fields`), the command-line flags
(`add_arguments`) and the markdown table in the README (`markdown_table`).

A settings class declares its fields with `setting(default, help, ...)`; its own cross-field rules stay in its
`__post_init__`. Pure Python, no project imports: the proposal settings (nnunet_rndpo/proposals/plan.py) and the
fine-tuning settings (nnunet_rndpo/settings.py) both sit on it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import typing
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

_META = "rndpo_setting"


class SettingsError(ValueError):
    """A setting with a wrong name or value; the message names it and lists what is valid."""


@dataclasses.dataclass(frozen=True)
class SettingSpec:
    """What one setting accepts. `choices` may be a callable returning the valid values (e.g. a registry read at
    validation time). Bounds: `minimum`/`maximum`, exclusive when `*_exclusive`."""

    help: str
    choices: Optional[Sequence[Any] | Callable[[], Sequence[Any]]] = None
    minimum: Optional[float] = None
    maximum: Optional[float] = None
    minimum_exclusive: bool = False
    maximum_exclusive: bool = False
    cli_flags: tuple[str, ...] = ()  # extra spellings on the command line, e.g. ("-k",)

    def valid_choices(self) -> Optional[Sequence[Any]]:
        return self.choices() if callable(self.choices) else self.choices


def setting(default: Any, help: str, **spec: Any) -> Any:
    """A dataclass field with its help and bounds (SettingSpec). Mutable defaults (dict, list) are copied per
    instance; tuples are kept as they are."""
    metadata = {_META: SettingSpec(help=help, **spec)}
    if isinstance(default, (dict, list)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def specs(cls: type) -> dict[str, tuple[dataclasses.Field, SettingSpec]]:
    """Every declared setting of `cls`, in definition order."""
    return {f.name: (f, f.metadata[_META]) for f in dataclasses.fields(cls) if _META in f.metadata}


def default_of(cls: type, name: str) -> Any:
    """The one default of setting `name` of `cls` (what the CLI and the README show)."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _base_type(hint: Any) -> tuple[Any, bool]:
    """(the value type, whether None is allowed) of an annotation such as Optional[float] or tuple[str, ...]."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union or type(hint).__name__ == "UnionType":
        others = [a for a in args if a is not type(None)]
        return (others[0] if len(others) == 1 else hint), type(None) in args
    return hint, False


def _type_name(hint: Any) -> str:
    base, nullable = _base_type(hint)
    origin = typing.get_origin(base) or base
    name = {bool: "bool", int: "int", float: "float", str: "str", dict: "object", tuple: "list", list: "list"}.get(
        origin, getattr(origin, "__name__", str(origin))
    )
    return f"{name} or null" if nullable else name


def _check_type(name: str, value: Any, hint: Any, where: str) -> None:
    base, nullable = _base_type(hint)
    if value is None:
        if nullable:
            return
        raise SettingsError(f"setting {name} in {where} must not be null")
    origin = typing.get_origin(base) or base
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
        str: isinstance(value, str),
        dict: isinstance(value, dict),
        tuple: isinstance(value, (tuple, list)),
        list: isinstance(value, (tuple, list)),
    }.get(origin, True)
    if not ok:
        raise SettingsError(f"setting {name} in {where} must be {_type_name(hint)}, got {value!r}")


def check_fields(instance: Any, where: str = "the settings") -> None:
    """Check every declared setting of a dataclass instance against its type, choices and bounds."""
    hints = _hints(type(instance))
    for name, (_, spec) in specs(type(instance)).items():
        value = getattr(instance, name)
        _check_type(name, value, hints[name], where)
        if value is None:
            continue
        choices = spec.valid_choices()
        bounded = spec.minimum is not None or spec.maximum is not None
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if choices is not None and item not in choices:
                raise SettingsError(
                    f"setting {name}={item!r} is not valid; valid: {', '.join(map(str, choices))} ({where})"
                )
            if bounded and not _within(item, spec):
                raise SettingsError(f"setting {name} in {where} must be {_bounds(spec)}, got {value!r}")


def _within(value: Any, spec: SettingSpec) -> bool:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    low_ok = spec.minimum is None or (value > spec.minimum if spec.minimum_exclusive else value >= spec.minimum)
    high_ok = spec.maximum is None or (value < spec.maximum if spec.maximum_exclusive else value <= spec.maximum)
    return low_ok and high_ok


def _bounds(spec: SettingSpec) -> str:
    low = "" if spec.minimum is None else f"{'>' if spec.minimum_exclusive else '>='} {spec.minimum:g}"
    high = "" if spec.maximum is None else f"{'<' if spec.maximum_exclusive else '<='} {spec.maximum:g}"
    return " and ".join(part for part in (low, high) if part)


def apply_overrides(instance: Any, overrides: Mapping[str, Any], where: str, removed: Mapping[str, str] = {}) -> Any:
    """`instance` with `overrides` applied; unknown names fail with the valid ones listed (or, for a removed
    setting, with what replaced it). Lists become tuples where the field is a tuple."""
    names = [f.name for f in dataclasses.fields(instance)]
    for name in overrides:
        if name in removed:
            raise SettingsError(f"setting {name!r} in {where} {removed[name]}")
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise SettingsError(f"unknown setting(s) {unknown} in {where}; valid: {', '.join(names)}")
    hints = _hints(type(instance))
    converted = {
        key: tuple(value)
        if isinstance(value, list) and typing.get_origin(_base_type(hints[key])[0]) is tuple
        else value
        for key, value in overrides.items()
    }
    return dataclasses.replace(instance, **converted)


def describe_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list, dict)):
        return json.dumps(list(value) if isinstance(value, tuple) else value)
    return str(value)


def markdown_table(cls: type, names: Optional[Iterable[str]] = None, prefix: str = "") -> list[str]:
    """Rows `| key | type | default | meaning |` of the settings of `cls` (all, or `names`)."""
    hints = _hints(cls)
    chosen = specs(cls) if names is None else {name: specs(cls)[name] for name in names}
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, (_, spec) in chosen.items():
        choices = spec.valid_choices()
        listed = f" One of: {', '.join(f'`{c}`' for c in choices)}." if choices else ""
        meaning = spec.help.rstrip(".") + "." + listed
        default = describe_default(default_of(cls, name))
        lines.append(f"| `{prefix}{name}` | {_type_name(hints[name])} | `{default}` | {meaning} |")
    return lines


def add_arguments(parser: argparse.ArgumentParser, cls: type, names: Iterable[str]) -> None:
    """Command-line flags for the settings `names` of `cls`: `--name` (and each spec's extra spellings), typed,
    with the definition's default, choices and help. Booleans become `--name` switches when their default is
    false. Tuples take several values."""
    hints = _hints(cls)
    all_specs = specs(cls)
    for name in names:
        _, spec = all_specs[name]
        default = default_of(cls, name)
        base, _nullable = _base_type(hints[name])
        origin = typing.get_origin(base) or base
        flags = [f"--{name}", *spec.cli_flags]
        help_text = f"{spec.help} (default: {describe_default(default)})"
        choices = spec.valid_choices()
        if origin is bool:
            if default:
                raise ValueError(f"setting {name}: a switch must default to false to be a flag")
            parser.add_argument(*flags, action="store_true", help=help_text)
        elif origin in (tuple, list):
            item = (typing.get_args(base) or (str,))[0]
            parser.add_argument(
                *flags,
                nargs="*",
                type=item,
                default=list(default),
                choices=choices,
                metavar=name.upper(),
                help=help_text,
            )
        elif origin is dict:
            parser.add_argument(*flags, type=json.loads, default=default, metavar="JSON", help=help_text)
        else:
            parser.add_argument(*flags, type=origin, default=default, choices=choices, help=help_text)


def values_from_arguments(args: argparse.Namespace, cls: type, names: Iterable[str]) -> dict[str, Any]:
    """The settings `names` as parsed by `add_arguments`, ready for `apply_overrides`."""
    return {name: getattr(args, name) for name in names}
