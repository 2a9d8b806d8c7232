"""Options declared once: the command line generated from the configuration dataclasses.

Every stage's configuration (CacheConfig, TrainConfig, EvalConfig with its SweepGrid, Setting,
BakeConfig, RunOptions) is a frozen dataclass with a docstring under each field, as sparsify
writes its configs. From it, and from nothing else, come:

- `field_option(cls, name)`: a click option named after a field (`--forget-mcq` for
  `forget_mcq`), its help the field's docstring, its default the field's or, where presets set
  the field, the presets' values written into the help;
- `set_option(cls)`: `--set FIELD=VALUE`, repeatable, for every field a command does not show
  as an option; the command's help lists those fields, their types and their value per preset;
- `parse_sets(cls, items)`: the typed values, parsed from each field's annotation.

A value is parsed by its annotation: `int`, `float`, `str`, `bool` (true/false), `X | None`
("none" for None), `tuple[X, ...]` (comma-separated) and a nested dataclass's fields (reached as
`grid.multipliers` or plainly `multipliers`). A field may add `metadata={"aliases": {...}}`:
whole values with a name ("all" formats), or `"item_aliases"` for the items of a tuple ("all" for
None in a list of feature counts), or `"parse"`, a function of the text (a template's "\\n").
Ranges and choices stay in the dataclass's own checks, so the
CLI, the Python API and a config read from disk refuse the same values with the same line.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import re
import textwrap
import types
import typing
from typing import Any, Callable, Mapping, Sequence

from cache.errors import FFError

_MISSING = object()


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of dataclass `cls` (and its bases), whitespace collapsed."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):  # no source (a frozen build): fields without docs
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[stmt.target.id] = " ".join(nxt.value.value.split())
    return docs


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def default_of(cls: type, name: str) -> Any:
    f = _fields(cls)[name]
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return _MISSING


def type_name(tp: Any) -> str:
    """A short name of an annotation for help text: int, float, text, "int | none", "float,..."."""
    args, origin = typing.get_args(tp), typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return " | ".join(type_name(a) for a in inner) + (" | none" if len(inner) < len(args) else "")
    if origin is tuple:
        return f"{type_name(args[0])},..."
    if tp is bool:
        return "true|false"
    return {int: "int", float: "float", str: "text"}.get(tp, getattr(tp, "__name__", str(tp)))


def parse_value(tp: Any, text: str, aliases: Mapping[str, Any] | None = None,
                item_aliases: Mapping[str, Any] | None = None) -> Any:
    """`text` as a value of annotation `tp`; a ValueError says what was expected."""
    text = text.strip()
    if aliases and text in aliases:
        return aliases[text]
    args, origin = typing.get_args(tp), typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) < len(args) and text.lower() == "none":
            return None
        if len(inner) == 1:
            return parse_value(inner[0], text)
        for a in inner:
            try:
                return parse_value(a, text)
            except ValueError:
                pass
        raise ValueError(f"expected {type_name(tp)}")
    if origin is tuple:
        items = [t for t in text.split(",") if t.strip()]
        return tuple(item_aliases[t.strip()] if item_aliases and t.strip() in item_aliases
                     else parse_value(args[0], t) for t in items)
    if tp is bool:
        low = text.lower()
        if low in ("true", "yes", "on", "1"):
            return True
        if low in ("false", "no", "off", "0"):
            return False
        raise ValueError("expected true or false")
    if tp is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("expected an integer") from None
    if tp is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("expected a number") from None
    if tp is str:
        return text
    raise ValueError(f"cannot be set from the command line ({type_name(tp)})")


def _nested(cls: type) -> dict[str, type]:
    """Fields of `cls` that are dataclasses themselves (EvalConfig.grid)."""
    return {n: t for n, t in _hints(cls).items() if n in _fields(cls) and dataclasses.is_dataclass(t)}


def _owner(cls: type, full: str) -> tuple[type, str, str]:
    """(the class that declares a settable name, its field name, the nested field's name or "")."""
    head, _, tail = full.rpartition(".")
    return (_nested(cls)[head] if head else cls), tail, head


def settable(cls: type, exclude: Sequence[str] = ()) -> list[str]:
    """The names `--set` takes for `cls`: its fields, then "outer.inner" for nested ones."""
    out = []
    for name in _fields(cls):
        if name in exclude:
            continue
        sub = _nested(cls).get(name)
        out += [f"{name}.{n}" for n in settable(sub)] if sub else [name]
    return out


def _resolve(cls: type, key: str, exclude: Sequence[str]) -> tuple[type, str, str]:
    """(owning class, field name, full dotted name) of a `--set` key; "multipliers" finds grid.multipliers."""
    names = settable(cls, exclude)
    if key in names:
        owner, name, _ = _owner(cls, key)
        return owner, name, key
    matches = [n for n in names if n.rpartition(".")[2] == key]
    if len(matches) == 1:
        return _resolve(cls, matches[0], exclude)
    near = difflib.get_close_matches(key.replace("-", "_"), names, n=3) or names
    raise FFError(f"--set {key}: no such field here; {'did you mean' if len(near) <= 3 else 'settable:'} "
                  f"{', '.join(near)}")


def parse_field(cls: type, name: str, text: str) -> Any:
    """`text` as a value of field `name` of `cls`: its own parser, else by its annotation and aliases."""
    meta = _fields(cls)[name].metadata
    if "parse" in meta:
        return meta["parse"](text)
    return parse_value(_hints(cls)[name], text, meta.get("aliases"), meta.get("item_aliases"))


def parse_sets(cls: type, items: Sequence[str], *, exclude: Sequence[str] = (),
               error: type[Exception] = FFError) -> dict[str, Any]:
    """["steps=500", "grid.multipliers=10,30"] -> {"steps": 500, "grid": {"multipliers": (10.0, 30.0)}}.

    A key given twice keeps the last value; a malformed item or value is one `error` line."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise error(f"--set takes FIELD=VALUE, got '{item}'")
        try:
            owner, name, full = _resolve(cls, key.strip(), exclude)
        except FFError as e:
            raise error(str(e)) from None
        try:
            value = parse_field(owner, name, text)
        except ValueError as e:
            raise error(f"--set {full}={text}: {e}") from None
        head = full.rpartition(".")[0]
        (out.setdefault(head, {}) if head else out)[name] = value
    return out


def apply_sets(cfg: Any, changes: Mapping[str, Any]) -> Any:
    """`cfg` with `parse_sets`' changes applied (nested dataclasses replaced field by field),
    through the config's own `replace` where it has one (its rules hold: EvalConfig's OOD bound)."""
    flat = {k: (dataclasses.replace(getattr(cfg, k), **v) if isinstance(v, dict) else v) for k, v in changes.items()}
    return cfg.replace(**flat) if hasattr(cfg, "replace") else dataclasses.replace(cfg, **flat)


def _fmt(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return ",".join(_fmt(v) for v in value) or "(empty)"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace("\n", "\\n")


def preset_values(cls: type, name: str, presets: Mapping[str, Mapping[str, Any]] | None) -> str:
    """"paper: 10000; demo: 500" (the field's value under each preset), or its plain default."""
    owner, tail, head = _owner(cls, name)
    default = default_of(owner, tail)
    if not presets:
        return _fmt(default)

    def under(p: Mapping[str, Any]) -> Any:
        v = p.get(head, default_of(cls, head)) if head else p.get(tail, default)
        return getattr(v, tail) if head else v

    values = {k: _fmt(under(p)) for k, p in presets.items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return "; ".join(f"{k}: {v}" for k, v in values.items())


def first_sentence(doc: str) -> str:
    """Up to the first full stop that ends a sentence ("eq. 2" does not)."""
    m = re.search(r"\.\s+(?=[A-Z\"'(])", doc)
    return doc if m is None else doc[:m.start() + 1]


def field_help(cls: type, name: str, presets: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """The help of the option for field `name`: its docstring and its value per preset."""
    return f"{field_docs(cls).get(name, '')} [{preset_values(cls, name, presets)}]"


class FieldOption:
    """Marks a click option as generated from a dataclass field (checked by tests/test_options.py)."""

    def __init__(self, cls: type, name: str, presets: Mapping[str, Mapping[str, Any]] | None):
        self.cls, self.name, self.presets = cls, name, presets


def field_option(cls: type, name: str, *, presets: Mapping[str, Mapping[str, Any]] | None = None,
                 metavar: str | None = None, **click_kw: Any) -> Callable:
    """A click option `--<name>` for field `name` of `cls`. Without presets its default is the
    field's; with them, None (the preset decides) and the presets' values are in the help. The
    value arrives as text and is parsed like a `--set` value (`parse_option`)."""
    import click

    tp = _hints(cls)[name]

    def deco(command: Callable) -> Callable:
        default = None if presets else default_of(cls, name)
        opt = click.option(f"--{name.replace('_', '-')}", name, default=_fmt(default) if default is not None else None,
                           metavar=metavar or type_name(tp).upper().replace(" | ", "|"),
                           help=field_help(cls, name, presets), show_default=False, **click_kw)(command)
        opt.__click_params__[-1].ff_field = FieldOption(cls, name, presets)  # type: ignore[attr-defined]
        return opt

    return deco


def parse_option(cls: type, name: str, text: str | None, *, error: type[Exception] = FFError) -> Any:
    """A `field_option`'s text as the field's value (None stays None: the preset's value)."""
    if text is None:
        return None
    try:
        return parse_field(cls, name, text)
    except ValueError as e:
        raise error(f"--{name.replace('_', '-')} {text}: {e}") from None


def set_option(cls: type, *, presets: Mapping[str, Mapping[str, Any]] | None = None,
               exclude: Sequence[str] = ()) -> Callable:
    """`--set FIELD=VALUE` (repeatable) for the fields of `cls` not in `exclude`; the fields, their
    types and their values per preset are appended to the command's help."""
    import click

    def deco(command: Callable) -> Callable:
        command = click.option("--set", "sets", multiple=True, metavar="FIELD=VALUE",
                               help="Set a field listed below (repeatable); a nested one as grid.NAME or NAME. "
                                    "Lists take commas; none is None.")(command)
        command.ff_sets = (cls, tuple(exclude), presets)  # type: ignore[attr-defined]
        return command

    return deco


def set_listing(cls: type, *, presets: Mapping[str, Mapping[str, Any]] | None = None,
                exclude: Sequence[str] = (), width: int = 100) -> list[str]:
    """The help block of `--set`: per settable field its value (per preset), type and first sentence."""
    head = f"--set fields ({' | '.join(presets)} presets, where they differ):" if presets else "--set fields:"
    lines = [head]
    for full in settable(cls, exclude):
        owner, name, _ = _owner(cls, full)
        lines.append(f"  {full} = {preset_values(cls, full, presets)}  ({type_name(_hints(owner)[name])})")
        doc = first_sentence(field_docs(owner).get(name, ""))
        lines += textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return lines
