"""Swift-style flags for any dataclass: `SwiftArgParser(MyArgs).parse(argv)`.

What "swift-style" means (ms-swift's `swift sft/infer/eval` command lines):

- every dataclass field `foo_bar` is a flag `--foo_bar`, also spelled `--foo-bar`;
- booleans take a value: `--packing true`, `--packing false` (also yes/no/1/0/on/off); a bare `--packing` means true;
- list fields take several values: `--dataset a b c`, `--model_name 小黄 'Xiao Huang'`;
- `Literal[...]` fields only accept their values; `X | None` fields also accept `none`/`null` (unless X is str);
- a config file gives values too: `prog config.yaml [flags]` or `--config FILE` (YAML or JSON, keys in either
  spelling); flags on the command line override the file, the file overrides the dataclass defaults;
- an unknown flag or file key raises `ArgumentError` naming the closest real one (difflib), never exits.

Field metadata understood: `help` (str), `max_len` (int, the most values a list field takes), `aliases`
(other flag names, e.g. swift's older spellings). Type hints are read with `typing.get_type_hints`, so
`from __future__ import annotations` is fine. Standard library only; PyYAML is imported only for .yaml files.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .errors import ArgumentError, unknown_name_error

TRUE = frozenset({"true", "t", "yes", "y", "1", "on"})
FALSE = frozenset({"false", "f", "no", "n", "0", "off"})
NONE = frozenset({"none", "null"})
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def arg(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field for SwiftArgParser: `help` for --help, extra metadata such as `max_len`/`aliases`;
    list defaults are copied per instance."""
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return dataclasses.field(default=default, metadata={"help": help, **meta})


def parse_bool(value: Any, where: str = "") -> bool:
    """`true/false` (and yes/no/1/0/on/off, any case) -> bool; anything else -> ArgumentError."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    text = str(value).strip().lower()
    if text in TRUE:
        return True
    if text in FALSE:
        return False
    raise ArgumentError(where, f"expected a boolean, got {value!r}", "write true or false")


@dataclasses.dataclass(frozen=True)
class FieldSpec:
    """How one dataclass field is read from text: its scalar type, whether it is a list, its choices."""

    name: str
    scalar: type  # bool, int, float or str (the item type for lists)
    is_list: bool
    optional: bool
    choices: tuple[Any, ...] | None
    default: Any
    help: str
    max_len: int | None
    aliases: tuple[str, ...]

    @property
    def flag(self) -> str:
        return "--" + self.name

    def convert(self, value: Any, where: str = "") -> Any:
        """A raw value (text from argv, or a YAML/JSON value) -> the field's Python value, or ArgumentError."""
        where = where or self.flag
        if self.is_list:
            items = list(value) if isinstance(value, (list, tuple)) else [value]
            out = [self._scalar(v, where) for v in items]
            if self.max_len is not None and len(out) > self.max_len:
                raise ArgumentError(where, f"takes at most {self.max_len} values, got {len(out)} ({out})",
                                    f"pass up to {self.max_len}, e.g. {self.flag} 中文名 'English Name'")
            return out
        if isinstance(value, (list, tuple)):
            if len(value) != 1:
                raise ArgumentError(where, f"takes one value, got {len(value)}", "pass a single value")
            value = value[0]
        return self._scalar(value, where)

    def _scalar(self, value: Any, where: str) -> Any:
        if value is None or (self.optional and self.scalar is not str and str(value).strip().lower() in NONE):
            if self.optional or self.is_list:
                return None
            raise ArgumentError(where, "may not be empty", f"pass a {self.scalar.__name__} value")
        out: Any
        try:
            if self.scalar is bool:
                out = parse_bool(value, where)
            elif self.scalar is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise ValueError(value)
                out = int(value) if not isinstance(value, str) else int(value.strip())
            elif self.scalar is float:
                if isinstance(value, bool):
                    raise ValueError(value)
                out = float(value)
                if not math.isfinite(out):  # inf/nan would train to NaN weights and still say "done"
                    raise ArgumentError(where, f"expected a finite number, got {value!r}", "pass a finite number")
            else:
                out = str(value)
        except ArgumentError:
            raise
        except (TypeError, ValueError):
            raise ArgumentError(where, f"expected {_article(self.scalar)}, got {value!r}",
                                f"pass {_article(self.scalar)}") from None
        if self.choices is not None and out not in self.choices:
            listed = ", ".join(str(c) for c in self.choices)
            raise ArgumentError(where, f"{out!r} is not one of {listed}", "pick one of those")
        return out


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _article(tp: type) -> str:
    return {bool: "a boolean (true/false)", int: "an integer", float: "a number"}.get(tp, "a string")


def field_specs(cls: type) -> dict[str, FieldSpec]:
    """FieldSpec for every init field of the dataclass `cls`, in declaration order."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls, include_extras=False)
    specs: dict[str, FieldSpec] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _strip_optional(hints[f.name])
        is_list = typing.get_origin(tp) in (list, Sequence, tuple) or tp in (list, tuple)
        if is_list:
            args = typing.get_args(tp)
            tp, _ = _strip_optional(args[0] if args else str)
        choices = None
        if typing.get_origin(tp) is typing.Literal:
            choices = typing.get_args(tp)
            tp = type(choices[0])
        if tp not in (bool, int, float, str):
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported field type {hints[f.name]!r}")
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        specs[f.name] = FieldSpec(
            name=f.name, scalar=tp, is_list=is_list, optional=optional, choices=choices, default=default,
            help=f.metadata.get("help", ""), max_len=f.metadata.get("max_len"),
            aliases=tuple(f.metadata.get("aliases", ())),
        )
    return specs


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML (.yaml/.yml, needs PyYAML) or JSON file holding one mapping of argument names to values."""
    path = Path(path)
    if not path.is_file():
        raise ArgumentError(str(path), "config file not found", "check the path")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ModuleNotFoundError:
            raise ArgumentError(str(path), "reading YAML needs PyYAML",
                                "pip install pyyaml (or megatune-argmap[yaml]), or use a .json file") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ArgumentError(str(path), f"not valid YAML ({' '.join(str(e).split())})", "fix the file") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ArgumentError(f"{path}:{e.lineno}", f"not valid JSON ({e.msg})", "fix the file") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ArgumentError(str(path), f"expected a mapping of argument names to values, got {type(data).__name__}",
                            "write `name: value` lines")
    return data


class _RaisingParser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # argparse would print and exit(2)
        raise ArgumentError("command line", message, "see --help")


class SwiftArgParser:
    """Builds swift-style flags from the dataclass `cls`; `parse(argv)` returns a `cls` instance.

    `aliases` maps extra flag names to field names (in addition to the fields' `aliases` metadata).
    `help_notes` adds a note per field to `format_help()` (argmap uses it for the Megatron counterpart).
    `hints` maps likely wrong names to the right field, for the unknown-flag message (difflib covers typos).
    """

    def __init__(self, cls: type, *, prog: str = "", description: str = "",
                 aliases: Mapping[str, str] | None = None, help_notes: Mapping[str, str] | None = None,
                 hints: Mapping[str, str] | None = None) -> None:
        self.cls, self.prog, self.description = cls, prog or cls.__name__, description
        self.hints = dict(hints or {})
        self.specs = field_specs(cls)
        self.help_notes = dict(help_notes or {})
        self.aliases: dict[str, str] = {}
        for spec in self.specs.values():
            for alias in spec.aliases:
                self.aliases[alias] = spec.name
        for alias, target in (aliases or {}).items():
            if target not in self.specs:
                raise ValueError(f"alias {alias!r} points at unknown field {target!r}")
            self.aliases[alias] = target
        self._parser = self._build()

    def _build(self) -> argparse.ArgumentParser:
        parser = _RaisingParser(prog=self.prog, add_help=False, allow_abbrev=False)
        parser.add_argument("--config", dest="__config__", default=argparse.SUPPRESS)
        self._value_flags: set[str] = set()  # flags that take exactly one value
        names: dict[str, list[str]] = {name: [name] for name in self.specs}
        for alias, target in self.aliases.items():
            names[target].append(alias)
        for name, spec in self.specs.items():
            flags = []
            for n in names[name]:
                flags += ["--" + n] + (["--" + n.replace("_", "-")] if "_" in n else [])
            if spec.is_list:
                kwargs: dict[str, Any] = {"nargs": "*"}
            elif spec.scalar is bool:
                kwargs = {"nargs": "?", "const": "true"}
            else:
                kwargs = {}
                self._value_flags.update(flags)
            parser.add_argument(*flags, dest=name, default=argparse.SUPPRESS, **kwargs)
        return parser

    def _attach_negative_values(self, argv: list[str]) -> list[str]:
        """`--learning_rate -1e-3` -> `--learning_rate=-1e-3`: argparse reads a token such as `-1e-3` or `-inf`
        as an unknown flag ("expected one argument"), so a number after a single-value flag is attached to it."""
        out: list[str] = []
        for token in argv:
            if out and out[-1] in self._value_flags and token.startswith("-") and _is_number(token):
                out[-1] = f"{out[-1]}={token}"
            else:
                out.append(token)
        return out

    def parse_dict(self, argv: Sequence[str] | None = None) -> dict[str, Any]:
        """Only the values that were given (file, then argv on top), converted; defaults are left out."""
        argv = list(sys.argv[1:] if argv is None else argv)
        config = None
        if argv and not argv[0].startswith("-") and argv[0].lower().endswith(CONFIG_SUFFIXES):
            config, argv = argv[0], argv[1:]
        ns, extras = self._parser.parse_known_args(self._attach_negative_values(argv))
        for extra in extras:
            if extra.startswith("-"):
                name = extra.lstrip("-").split("=", 1)[0].replace("-", "_")
                raise unknown_name_error(name, self.specs, hints=self.hints)
            raise ArgumentError("command line", f"unexpected value {extra!r}",
                                "values follow their flag, e.g. --dataset a b; quote values with spaces")
        given = vars(ns)
        config = given.pop("__config__", config)
        values: dict[str, Any] = {}
        if config is not None:
            values.update(self.from_mapping(load_config_file(config), where=str(config)))
        for name, raw in given.items():
            values[name] = self.specs[name].convert(raw)
        return values

    def from_mapping(self, data: Mapping[str, Any], where: str = "") -> dict[str, Any]:
        """Check and convert a {name: value} mapping (a config file's, a checkpoint's); keys in either spelling."""
        out: dict[str, Any] = {}
        for key, raw in data.items():
            name = str(key).replace("-", "_")
            name = self.aliases.get(name, name)
            if name not in self.specs:
                raise unknown_name_error(name, self.specs, where=where, kind="key", hints=self.hints)
            out[name] = self.specs[name].convert(raw, where=f"{where}: {name}" if where else "")
        return out

    def parse(self, argv: Sequence[str] | None = None) -> Any:
        """argv -> a `cls` instance. `-h/--help` prints `format_help()` and raises SystemExit(0)."""
        argv = list(sys.argv[1:] if argv is None else argv)
        if "-h" in argv or "--help" in argv:
            print(self.format_help())
            raise SystemExit(0)
        return self.cls(**self.parse_dict(argv))

    def format_help(self) -> str:
        lines = [f"usage: {self.prog} [config.yaml|config.json] [--config FILE] [--name value ...]"]
        if self.description:
            lines += ["", self.description]
        lines += ["", "Flags take the underscore or the dash spelling; booleans take true/false;",
                  "list flags take several values; command-line flags override the config file.", ""]
        by_target: dict[str, list[str]] = {}
        for alias, target in self.aliases.items():
            by_target.setdefault(target, []).append("--" + alias)
        for name, spec in self.specs.items():
            kind = spec.scalar.__name__ + (" ..." if spec.is_list else "")
            if spec.choices is not None:
                kind = "{" + ",".join(str(c) for c in spec.choices) + "}"
            default = "required" if spec.default is dataclasses.MISSING else f"default: {spec.default!r}"
            lines.append(f"  --{name} {kind}  ({default})")
            if spec.help:
                lines.append(f"      {spec.help}")
            if by_target.get(name):
                lines.append(f"      also: {', '.join(by_target[name])}")
            if self.help_notes.get(name):
                lines.append(f"      {self.help_notes[name]}")
        return "\n".join(lines)


def parse_dataclass_args(cls: type, argv: Sequence[str] | None = None, **kwargs: Any) -> Any:
    """`SwiftArgParser(cls, **kwargs).parse(argv)` in one call."""
    return SwiftArgParser(cls, **kwargs).parse(argv)


def dataclass_from_mapping(cls: type, data: Mapping[str, Any], where: str = "",
                           aliases: Mapping[str, str] | None = None) -> Any:
    """Build `cls` from a {name: value} mapping with the same checks and conversions as the command line."""
    return cls(**SwiftArgParser(cls, aliases=aliases).from_mapping(data, where))


__all__ = [
    "FieldSpec", "SwiftArgParser", "dataclass_from_mapping", "field_specs", "load_config_file",
    "parse_bool", "parse_dataclass_args",
]
