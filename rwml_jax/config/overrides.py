"""Command-line overrides of a recipe, parsed by ml_collections' `config_flags` on an absl `FlagValues`.

    apply_overrides(config, ["--config.rwml.learning_rate=2e-6", "--config.seed", "3"])

The config is held by a `config_flags.DEFINE_config_dict("config", ...)` flag on a private `FlagValues`,
which parses the arguments exactly as a program using `config_flags` would: ``--config.KEY=VALUE`` or
``--config.KEY VALUE``; a bool alone (``--config.triplets.drop_invalid``) is True and
``--noconfig.KEY`` False; a tuple may be repeated (``--config.env.domains=airline
--config.env.domains=retail``); ``--flagfile=FILE`` reads arguments from a file.

Each field's text is read by a `FieldParser` that knows the field's name and current value, so errors
name the field and the type it takes, and values read as a user means them: an int field takes
``1e3`` (= 1000) but not ``8.5``; a string may be quoted (``'/data/my model'``); a tuple takes
``a,b`` or a Python literal ``('a', 'b')`` and its elements are read as the type of the current ones;
``none`` / ``null`` sets a non-string field to None. Keys are checked first: an unknown or mistyped
key raises `ConfigError` naming the closest valid key, before any value is set.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Sequence
from typing import Any

from absl import flags
from ml_collections import config_flags

from rwml_jax.config.keys import ConfigDict, ConfigError, get_path

FLAG = "config"
_OVERRIDE = re.compile(rf"^--?(?:no)?{FLAG}\.([^=]+)")
_NONE = ("none", "null")
_BOOL_WORDS = ("true", "false", "t", "f", "1", "0")  # what absl's BooleanParser reads
_ABSL_PARSERS: dict[type, tuple[flags.ArgumentParser, str]] = {
    bool: (flags.BooleanParser(), "a bool (true/false)"), int: (flags.IntegerParser(), "an int"),
    float: (flags.FloatParser(), "a float"),
}


class FieldParser(flags.ArgumentParser):
    """Reads one field's command-line text as the type of the field's current value."""

    def __init__(self, key: str, current: Any) -> None:
        self.key, self.current = key, current

    def flag_type(self) -> str:
        return type(self.current).__name__

    def parse(self, argument: Any) -> Any:
        if not isinstance(argument, str):  # a default value, already typed
            return argument
        if _OVERRIDE.match(argument):  # absl took the next override as this one's value
            raise _needs_value(f"--{FLAG}.{self.key}")
        cur = self.current
        if isinstance(cur, (tuple, list)):  # "()" is the empty tuple
            return type(cur)(self._sequence(argument))
        if argument.strip().lower() in _NONE and not isinstance(cur, str):
            return None  # a string field keeps the text: "none" is a valid value of execution.remat
        return _scalar(self.key, argument, type(cur))

    def _sequence(self, raw: str) -> list[Any]:
        s = raw.strip()
        if s in ("", "()", "[]"):
            return []
        if s[0] in "([":
            try:
                lit = ast.literal_eval(s)
            except (ValueError, SyntaxError):
                raise ConfigError(f"config key {self.key!r} is a tuple; cannot parse {raw!r} "
                                  f"(use e.g. \"(1,2)\" or \"a,b\")") from None
            items = list(lit) if isinstance(lit, (tuple, list)) else [lit]
        else:
            items = [p.strip() for p in s.split(",") if p.strip()]
        kinds = {type(x) for x in self.current}
        if len(kinds) != 1:  # empty or mixed: each text item read as a Python literal
            return [_scalar(f"{self.key}[{i}]", x, type(None)) if isinstance(x, str) else x
                    for i, x in enumerate(items)]
        (kind,) = kinds
        return [x if type(x) is kind else _scalar(f"{self.key}[{i}]", str(x), kind) for i, x in enumerate(items)]


def _scalar(key: str, raw: str, kind: type) -> Any:
    """`raw` read as `kind` (bool, int, float, str; anything else: a Python literal, else the text)."""
    s = raw.strip()
    if kind in _ABSL_PARSERS:
        parser, what = _ABSL_PARSERS[kind]
        try:
            return parser.parse(s)
        except ValueError:
            f = _float_or_nan(s)
            if kind is int and math.isfinite(f) and f == int(f):  # "1e3"
                return int(f)
            raise ConfigError(f"config key {key!r} is {what}; got {raw!r}") from None
    if kind is str:
        return s[1:-1] if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"" else s
    try:
        return ast.literal_eval(s)
    except (ValueError, SyntaxError):
        return _scalar(key, s, str)


def _needs_value(flag: str) -> ConfigError:
    return ConfigError(f"config override {flag} needs a value ({flag}=VALUE)")


def _float_or_nan(s: str) -> float:
    try:
        return float(s)
    except ValueError:
        return math.nan


# config_flags has no parser for a field holding None or a list, so it would refuse to override one;
# these let it define their flags (whose parsers `apply_overrides` then replaces, like every field's).
config_flags.register_flag_parser_for_type(type(None), FieldParser("", None))
config_flags.register_flag_parser_for_type(list, FieldParser("", []))


def override_keys(args: Sequence[str]) -> list[str]:
    """The dotted keys that ``--config.KEY...`` arguments set, in order (what config_flags defines)."""
    return [m.group(1) for a in args if (m := _OVERRIDE.match(a))]


def apply_overrides(config: ConfigDict, args: Sequence[str]) -> ConfigDict:
    """Set the fields named by ``--config.KEY=VALUE`` arguments in place (see module doc); returns config.

    Raises ConfigError for an unknown key (naming the closest valid one), a section given a value, a
    value that does not read as its field's type, or an argument that is not a config override.
    """
    values = flags.FlagValues()
    argv = values.read_flags_from_files(["rwml-jax", *args], force_gnu=False)  # expands --flagfile=FILE
    keys = override_keys(argv[1:])
    for key in keys:
        if isinstance(get_path(config, key), ConfigDict):
            raise ConfigError(f"config key {key!r} is a section, not a value; set its fields "
                              f"(e.g. --{FLAG}.{key}.<field>=...)")
    try:
        config_flags.DEFINE_config_dict(FLAG, config, flag_values=values, lock_config=False, sys_argv=argv)
        for key in keys:
            values[f"{FLAG}.{key}"].parser = FieldParser(key, get_path(config, key))
        rest = values(argv)
    except flags.UnrecognizedFlagError as e:
        raise ConfigError(f"unrecognized argument {e.flagvalue!r}: config overrides look like "
                          f"--{FLAG}.section.key=value (or --{FLAG}.section.key value)") from None
    except flags.IllegalFlagValueError as e:
        if isinstance(e.__context__, ConfigError):  # a FieldParser's message, naming the field
            raise e.__context__ from None
        raise ConfigError(str(e)) from None
    except flags.Error as e:
        missing = re.match(r"Missing value for flag (\S+)", str(e))
        raise (_needs_value(missing.group(1)) if missing else ConfigError(str(e))) from None
    except (TypeError, ValueError) as e:  # ConfigDict refused the parsed value
        raise ConfigError(f"cannot apply config overrides {args}: {e}") from None
    if len(rest) > 1:
        bool_hint = f" (a bool takes --{FLAG}.section.key={rest[1]})" if rest[1].lower() in _BOOL_WORDS else ""
        raise ConfigError(f"unrecognized argument {rest[1]!r}: config overrides look like "
                          f"--{FLAG}.section.key=value (or --{FLAG}.section.key value){bool_hint}")
    return config
