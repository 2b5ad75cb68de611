"""Typed options for plugins and models: ``NAME:key=value,...`` strings and TOML tables to dataclasses.

A plugin declares its options as a dataclass (``class Options``); this module turns what a user wrote into an
instance of it, converting strings to the annotated types and naming the plugin, the option and the fix on
any mistake. Lists are written with commas, e.g. ``lora:targets=q,v,rank=8`` (a token without ``=`` continues
the list of the key before it).
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import io
import math
import textwrap
import tokenize
import types
import typing
from typing import Any, Callable

from tuneforge.errors import ConfigError

__all__ = ["parse_spec", "build_options", "describe_options", "option_rows", "field_help", "needs_message", "suggest",
           "OptionError", "check_range"]


class OptionError(ValueError):
    """One option's value is out of range. Raised by an options dataclass's ``__post_init__`` (see
    :func:`check_range`) so :func:`build_options` can name the option as the user wrote it (``--lr``, ``rank``)."""

    def __init__(self, option: str, problem: str):
        self.option, self.problem = option, problem
        super().__init__(f"{option} {problem}")


def _bound(text: str) -> float:
    return math.inf if text.strip() in ("inf", "+inf") else -math.inf if text.strip() == "-inf" else float(text)


def check_range(options, name: str, interval: str, hint: str = "") -> None:
    """Raise :class:`OptionError` unless ``options.name`` is a finite number within ``interval``, written as in
    mathematics: ``"[0, 1)"`` (0 included, 1 not), ``"(0, inf)"`` (positive), ``"[0, inf)"``. None passes
    (an unset optional option). ``hint`` says what the option means, for the message."""
    value = getattr(options, name)
    if value is None:
        return
    low, high = (_bound(b) for b in interval[1:-1].split(","))
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    above = number and (low < value if interval[0] == "(" else low <= value)
    if not (above and (value < high if interval[-1] == ")" else value <= high)):
        if high == math.inf:
            want = f"{'>' if interval[0] == '(' else '>='} {low:g}"
        else:
            want = f"within {interval}"
        raise OptionError(name, f"must be a finite number {want}{hint}, got {value!r}")


def suggest(word: str, choices) -> str:
    """' (did you mean X?)' when a close match exists, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def parse_spec(text: str) -> tuple[str, dict[str, Any]]:
    """Split ``"lora:rank=8,targets=q,v"`` into ``("lora", {"rank": "8", "targets": ["q", "v"]})``.

    Values stay strings (lists of strings for continued keys); :func:`build_options` converts them.
    """
    name, _, rest = text.partition(":")
    name = name.strip()
    if not name:
        raise ConfigError(f"'{text}': expected NAME or NAME:key=value,... (e.g. 'lora:rank=8,targets=q,v')")
    values: dict[str, Any] = {}
    last = None
    for token in filter(None, (t.strip() for t in rest.split(","))):
        if "=" in token:
            key, _, value = token.partition("=")
            key = key.strip().replace("-", "_")
            if not key:
                raise ConfigError(f"'{text}': empty option name before '={value}'")
            values[key] = value.strip()
            last = key
        elif last is None:
            raise ConfigError(f"'{text}': '{token}' is not key=value (write {name}:{token}=VALUE)")
        else:  # a continuation: "targets=q,v" -> ["q", "v"]
            prev = values[last]
            values[last] = (prev if isinstance(prev, list) else [prev]) + [token]
    return name, values


def _strip_optional(tp):
    """Optional[X] / X | None -> (X, True)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp) -> str:
    tp, optional = _strip_optional(tp)
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        name = "|".join(str(a) for a in typing.get_args(tp))
    elif origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        name = f"list of {_type_name(inner)}"
    else:
        name = getattr(tp, "__name__", str(tp))
    return name + (" or none" if optional else "")


def _convert(value: Any, tp, where: str):
    tp, optional = _strip_optional(tp)
    if optional and (value is None or (isinstance(value, str) and value.lower() in ("none", "null", ""))):
        return None
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        choices = typing.get_args(tp)
        for choice in choices:
            if value == choice or str(value) == str(choice):
                return choice
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
    if origin in (list, tuple):
        (inner, *_) = typing.get_args(tp) or (str,)
        items = value if isinstance(value, (list, tuple)) else [value]
        out = [_convert(v, inner, where) for v in items]
        return tuple(out) if origin is tuple else out
    if tp is bool:
        if isinstance(value, bool):
            return value
        text = str(value).lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}")
        try:
            if tp is int and isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            number = tp(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected {tp.__name__}, got {value!r}") from None
        # float("nan") and float("inf") parse, but no option means them: a NaN learning rate trains NaN weights
        if not math.isfinite(number):
            raise ConfigError(f"{where}: {value!r} is not a finite number; give a finite one")
        return number
    if tp is str:
        if isinstance(value, (list, dict)):
            raise ConfigError(f"{where}: expected a single value, got {value!r}")
        return str(value)
    return value  # an annotation we do not convert (e.g. Any): pass through


def build_options(cls, values: dict[str, Any] | None, *, owner: str, spell=None, subject: str | None = None,
                  how: Callable[[list[str]], str] | None = None):
    """Build the dataclass ``cls`` from ``values`` (strings from the command line or typed TOML values).

    :param owner: who the options belong to, for error messages (e.g. ``"mechanism 'lora'"``).
    :param spell: how the user writes an option, for messages (e.g. ``lambda k: "--" + k`` for command line flags);
        default its name.
    :param subject, how: for a required option (a field without a default) left out: who needs it (default
        ``owner``) and how to give the missing options (see :func:`needs_message`).
    :raises ConfigError: unknown option (with the closest name and the list of options), a required one missing, or
        a bad value.
    """
    values = dict(values or {})
    if cls is None:
        if values:
            raise ConfigError(f"{owner} takes no options, got: {', '.join(values)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"{owner} has no option '{key}'{suggest(key, fields)}. Its options: {describe_options(cls)}"
            )
        name = f"'{key}' ({spell(key)})" if spell else f"'{key}'"
        kwargs[key] = _convert(value, hints[key], f"option {name} of {owner} ({_field_text(fields[key], hints[key])})")
    missing = [f for f in fields.values() if f.init and _default(f) is dataclasses.MISSING and f.name not in kwargs]
    if missing:
        raise ConfigError(needs_message(cls, subject or owner, [f.name for f in missing], how))
    try:
        return cls(**kwargs)
    except OptionError as exc:  # one option out of range: name it as written, and its default
        default = fields[exc.option].default if exc.option in fields else dataclasses.MISSING
        was = f" (default {default!r})" if default is not dataclasses.MISSING and default is not None else ""
        name = spell(exc.option) if spell else exc.option
        raise ConfigError(f"{owner}: {name} {exc.problem}{was}") from None
    except (TypeError, ValueError) as exc:  # a required option missing, or __post_init__ validation
        raise ConfigError(f"{owner}: {exc}. Its options: {describe_options(cls)}") from None


def describe_options(cls) -> str:
    """'rank (int, default 8), targets (list of str, default [...])' for help text and errors."""
    if cls is None:
        return "none"
    hints = typing.get_type_hints(cls)
    return ", ".join(f"{f.name} ({_field_text(f, hints[f.name])})" for f in dataclasses.fields(cls)) or "none"


def _default(f: dataclasses.Field):
    """A field's default value (its factory called), or ``dataclasses.MISSING`` for a required one."""
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _field_text(f: dataclasses.Field, hint) -> str:
    """'int, default 8' or 'str, required'."""
    default = _default(f)
    return f"{_type_name(hint)}, {'required' if default is dataclasses.MISSING else f'default {default!r}'}"


def needs_message(cls, subject: str, missing: list[str], how: Callable[[list[str]], str] | None = None) -> str:
    """'lora needs rank (int): the update's rank; pass -m lora:rank=...': each required option left out, with its
    type and help, then ``how(missing)`` (how to give them; default: the list of options)."""
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    said = ", and ".join(f"{o} ({_type_name(hints[o])})" + (f": {helps[o]}" if helps.get(o) else "") for o in missing)
    return f"{subject} needs {said}; " + (how(missing) if how else f"give {'it' if len(missing) == 1 else 'them'}. "
                                          f"Its options: {describe_options(cls)}")


def option_rows(cls) -> list[dict[str, Any]]:
    """One row per option of the dataclass ``cls`` (None: no options), for ``tuneforge plugins NAME`` and its JSON:
    ``name``, ``type`` (as users write it), ``required``, ``default`` (None when required) and ``help``."""
    if cls is None:
        return []
    hints, helps = typing.get_type_hints(cls), field_help(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = _default(f)
        required = default is dataclasses.MISSING
        rows.append({"name": f.name, "type": _type_name(hints[f.name]), "required": required,
                     "default": None if required else default, "help": helps.get(f.name, "")})
    return rows


def field_help(cls) -> dict[str, str]:
    """Each option's help: ``metadata={"help": ...}`` where a field declares it, else the trailing ``# comment`` on
    the line that declares the field (in whichever class of ``cls``'s bases declares it); '' when neither.

    The comment is the project's way (every built-in ``Options``, the scaffold's template): help written once, where a
    reader of the source looks. Metadata is for fields whose source is not shipped or whose help is computed.
    """
    comments: dict[type, dict[str, str]] = {}
    out = {}
    for f in dataclasses.fields(cls):
        text = f.metadata.get("help") if f.metadata else None
        if text is None:
            owner = next((c for c in cls.__mro__ if f.name in c.__dict__.get("__annotations__", {})), None)
            if owner is not None and owner not in comments:
                comments[owner] = _declaration_comments(owner)
            text = comments.get(owner, {}).get(f.name, "")
        out[f.name] = str(text)
    return out


def _declaration_comments(cls) -> dict[str, str]:
    """name -> the comment on the lines of its annotated declaration in ``cls``'s own body ({} without source)."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
        body = ast.parse(source).body[0].body
        tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    except (OSError, TypeError, SyntaxError, IndexError, AttributeError, tokenize.TokenError):
        return {}  # defined in a string, a notebook cell or a shipped .pyc: no help but metadata's
    by_line: dict[int, str] = {}
    alone: set[int] = set()  # lines that hold nothing but a comment
    for tok in tokens:
        if tok.type == tokenize.COMMENT:
            by_line[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                alone.add(tok.start[0])
    found = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            lines = [n for n in range(node.lineno, (node.end_lineno or node.lineno) + 1) if n in by_line]
            above = node.lineno - 1
            while not lines and above in alone:  # else the comment block right above the declaration
                above -= 1
            lines = lines or list(range(above + 1, node.lineno))
            found[node.target.id] = " ".join(by_line[n] for n in lines)
    return found
