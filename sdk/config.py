"""Settings for Tessera's daemons and tools: TOML file plus command-line flags, checked up front.

Every daemon takes ``--config FILE`` (one TOML table named after the program: ``[server]``, ``[agent]``,
``[helper]``) and flags of the same names; a flag given on the command line wins. Everything is validated
before anything starts, so an operator's typo stops start-up with one line naming the key instead of
surfacing later as a confusing runtime failure.

It is in the SDK, not in ``tessera._daemon``, because tessera-helper (``sdk/helper``) reads its ``[helper]`` table
with it and the SDK may not import the daemons' private package; the daemons take it from the SDK. It needs
only the standard library, and ``import tessera.sdk`` does not load it.
"""

from __future__ import annotations

import argparse
import math
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tessera.sdk.errors import TesseraError

Kind = Literal["str", "int", "float", "bool", "duration", "list", "path"]

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*(ms|s|m|h|d|w)?\s*$", re.ASCII)
MAX_DURATION = 100 * 365 * 86400.0
"""A century: longer is a typo, and would overflow datetime arithmetic."""
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class ConfigError(TesseraError, ValueError):
    """A configuration file or flag is unreadable, unknown, missing or out of range."""


def parse_duration(value: str | int | float, key: str = "duration") -> float:
    """Seconds from ``90``, ``90s``, ``1.5m``, ``10m``, ``1h``, ``7d`` or ``250ms``; negative is refused."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration such as 90s, 10m, 1h or 7d, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        match = _DURATION.match(value) if isinstance(value, str) else None
        if not match:
            raise ConfigError(f"{key}: expected a duration such as 90s, 10m, 1h or 7d, got {value!r}")
        number, unit = match.groups()
        seconds = float(number) * _UNITS[unit or "s"]
    if math.isnan(seconds):
        raise ConfigError(f"{key}: expected a duration such as 90s, 10m, 1h or 7d, got {value!r}")
    if seconds < 0:
        raise ConfigError(f"{key}: duration must not be negative, got {value!r}")
    if seconds > MAX_DURATION:
        # inf or absurdly long values would overflow datetime arithmetic later, far from the typo.
        raise ConfigError(f"{key}: duration {value!r} is longer than the {MAX_DURATION / 86400 / 365:g} years allowed")
    return seconds


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: its key in the TOML table (flag ``--key-with-dashes``), kind and default."""

    name: str
    kind: Kind = "str"
    default: Any = None
    required: bool = False
    help: str = ""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _coerce(setting: Setting, value: Any) -> Any:
    key = setting.name
    kind = setting.kind
    if kind == "duration":
        return parse_duration(value, key)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a whole number, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            text = value.strip()
            try:
                return int(text, 0) if text.lower().startswith(("0o", "0x", "0b")) else int(text)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a whole number, got {value!r}")
    if kind == "float":
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if kind == "list":
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    if kind in ("str", "path"):
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        if kind == "path" and not value:
            raise ConfigError(f"{key}: path must not be empty")
        return value
    raise ConfigError(f"{key}: unknown setting kind {kind!r}")  # a programming error, reported plainly


def read_config_file(path: str | Path, table: str) -> dict[str, Any]:
    """The ``[table]`` of a TOML file (top-level keys are accepted when the file has no such table)."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except PermissionError:
        raise ConfigError(f"config file {path} is not readable (permission denied)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory") from None
    if table in data:
        section = data[table]
        if not isinstance(section, dict):
            raise ConfigError(f"config file {path}: [{table}] must be a table")
        others = sorted(k for k in data if k != table)
        if others:
            raise ConfigError(f"config file {path}: unknown key or table {others[0]!r} (settings go in [{table}])")
        return dict(section)
    return dict(data)


def load_settings(
    table: str,
    settings: Sequence[Setting],
    config_file: str | Path | None,
    overrides: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Merges defaults < config file < flags, validating every value; returns every setting by name.

    ``overrides`` are parsed command-line values keyed by setting name; ``None`` means "not given".
    Keys in ``overrides`` that are not settings (e.g. argparse's ``command``) are ignored.
    """
    by_name = {s.name: s for s in settings}
    values: dict[str, Any] = {}
    if config_file is not None:
        for key, raw in read_config_file(config_file, table).items():
            setting = by_name.get(key)
            if setting is None:
                hint = f" (did you mean {key.replace('-', '_')!r}?)" if key.replace("-", "_") in by_name else ""
                raise ConfigError(f"config file {config_file}: unknown key {key!r} in [{table}]{hint}")
            values[key] = _coerce(setting, raw)
    for key, raw in (overrides or {}).items():
        setting = by_name.get(key)
        if setting is None or raw is None:
            continue
        values[key] = _coerce(setting, raw)
    result: dict[str, Any] = {}
    for setting in settings:
        if setting.name in values:
            result[setting.name] = values[setting.name]
        elif setting.required:
            raise ConfigError(
                f"missing required setting {setting.name!r} (flag {setting.flag} or {setting.name} in [{table}])"
            )
        else:
            default = setting.default
            result[setting.name] = list(default) if isinstance(default, list | tuple) else default
    return result


def add_arguments(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    """Adds ``--config`` (when absent) and one ``--long-flag`` per setting, all defaulting to None so
    :func:`load_settings` can tell "not given" from a value."""
    if not any("--config" in action.option_strings for action in parser._actions):
        parser.add_argument("--config", metavar="FILE", default=None, help="TOML configuration file")
    for setting in settings:
        help_text = setting.help or setting.name.replace("_", " ")
        if setting.default is not None:
            help_text += f" (default: {setting.default})"
        if setting.kind == "bool":
            parser.add_argument(
                setting.flag, dest=setting.name, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
        else:
            parser.add_argument(setting.flag, dest=setting.name, default=None, metavar="VALUE", help=help_text)
