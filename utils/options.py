"""Typed, validated JSON option files.

Option files are JSON with ``//`` and ``/* */`` comments (the field's habit). They are loaded into nested
dataclasses; every key is checked (unknown, missing, wrong type, out of range) *before* any work starts, and
a problem is reported as one line naming the file, the key path and what was expected. Any key can be
overridden from the command line with ``--set key.path=value`` (the value is parsed as JSON, and taken as a
plain string when it is not valid JSON).

Beyond each field's own range, every value is checked for what would break later instead of here: numbers must
be finite (NaN and Infinity, which Python's JSON reader accepts, are refused unless a field allows them with
``option(finite=False)``), integers must fit a signed 64-bit integer (what torch and numpy take), and a file or
an override may nest at most :data:`MAX_DEPTH` levels deep.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

from utils.errors import OptionsError

T = TypeVar("T")

MAX_DEPTH = 32  # objects and lists inside each other; option files use a handful of levels
INT_MIN, INT_MAX = -(2**63), 2**63 - 1  # every integer option must fit an int64 (torch tensors, numpy seeds)


def option(
    default: Any = dataclasses.MISSING,
    *,
    help: str = "",
    choices: Sequence[Any] | None = None,
    min: float | None = None,
    max: float | None = None,
    min_exclusive: bool = False,
    finite: bool = True,
    default_factory: Callable[[], Any] | Any = dataclasses.MISSING,
) -> Any:
    """A dataclass field with the metadata the validator checks (choices, numeric range, help text).

    ``finite=False`` lets a number field take NaN and +-Infinity (refused everywhere else).
    """
    meta = {"help": help, "choices": choices, "min": min, "max": max, "min_exclusive": min_exclusive, "finite": finite}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def required(*, help: str = "", **kwargs: Any) -> Any:
    """A field that every option file must set."""
    return option(help=help, **kwargs)


# --------------------------------------------------------------------------------------------- parsing


def strip_json_comments(text: str) -> str:
    """Remove ``//`` line comments and ``/* */`` block comments outside JSON strings.

    Line structure is kept (comments become spaces) so that JSON error positions still point at the right line.
    """
    out: list[str] = []
    i, n = 0, len(text)
    in_string = False
    while i < n:
        c = text[i]
        if in_string:
            out.append(c)
            if c == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if c == '"':
                in_string = False
            i += 1
        elif c == '"':
            in_string = True
            out.append(c)
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            end = n if end < 0 else end
            out.append(" " * (end - i))
            i = end
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            if end < 0:
                raise json.JSONDecodeError("unterminated /* comment", text, i)
            block = text[i : end + 2]
            out.append("".join("\n" if ch == "\n" else " " for ch in block))
            i = end + 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def read_json_with_comments(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read an option file into a plain dict, with a one-line error for a missing or malformed file."""
    path = Path(path)
    if not path.is_file():
        raise OptionsError(f"{path}: option file not found")
    try:
        raw = parse_json(strip_json_comments(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as err:
        raise OptionsError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError:
        raise OptionsError(f"{path}: not a UTF-8 text file") from None
    except ValueError as err:  # too deeply nested, or an integer too long to read
        raise OptionsError(f"{path}: {err}") from None
    if not isinstance(raw, dict):
        raise OptionsError(f"{path}: the top level must be a JSON object {{...}}, got {type(raw).__name__}")
    return raw


def parse_json(text: str) -> Any:
    """``json.loads`` whose every failure is a ``ValueError`` with a one-line message.

    Python's reader fails on deep nesting with ``RecursionError`` (a file of 30,000 ``[`` is enough) and on
    integers of more than 4,300 digits with a long ``ValueError``; both become short ``ValueError`` here, and
    anything nested deeper than :data:`MAX_DEPTH` levels is refused too. ``json.JSONDecodeError`` passes as it is.
    """
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep") from None
    except json.JSONDecodeError:
        raise
    except ValueError as err:
        if "digits" in str(err):
            raise ValueError("an integer of more than 4300 digits") from None
        raise
    path = too_deep(value)
    if path is not None:
        raise ValueError(f"nested more than {MAX_DEPTH} levels deep (at {_short(path)})")
    return value


def too_deep(value: Any) -> str | None:
    """The key path of an object or list nested more than :data:`MAX_DEPTH` levels deep in ``value``, or None.

    Walked without recursion, so any depth is safe to check.
    """
    stack: list[tuple[Any, int, str]] = [(value, 0, "")]
    while stack:
        node, level, path = stack.pop()
        if isinstance(node, dict):
            children = [(child, _join(path, str(k))) for k, child in node.items()]
        elif isinstance(node, list):
            children = [(child, f"{path}[{i}]") for i, child in enumerate(node)]
        else:
            continue
        if level >= MAX_DEPTH:
            return path or "(top level)"
        stack.extend((child, level + 1, child_path) for child, child_path in children)
    return None


def apply_override(raw: dict[str, Any], assignment: str) -> str:
    """Apply one ``key.path=value`` override to ``raw`` in place and return the key path."""
    if "=" not in assignment:
        raise OptionsError(f"--set {assignment!r}: expected KEY.PATH=VALUE, e.g. --set train.learning_rate=1e-4")
    key_path, text = assignment.split("=", 1)
    key_path = key_path.strip()
    if not key_path or any(not part for part in key_path.split(".")):
        raise OptionsError(f"--set {assignment!r}: empty key in key path {key_path!r}")
    parts = key_path.split(".")
    if len(parts) > MAX_DEPTH:
        raise OptionsError(f"--set {_short(key_path)}: key path nested more than {MAX_DEPTH} levels deep")
    try:
        value = parse_json(text)
    except json.JSONDecodeError:
        value = text
    except ValueError as err:
        raise OptionsError(f"--set {key_path}: invalid value: {err}") from None
    node = raw
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            where = ".".join(parts[: depth + 1])
            raise OptionsError(f"--set {key_path}: {where} is a value, not a section")
        node = child
    node[parts[-1]] = value
    return key_path


# ------------------------------------------------------------------------------------------ validation


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (list, Sequence):
        (item,) = typing.get_args(tp) or (Any,)
        return f"list of {_type_name(item)}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) or origin is dict:
        return "object"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _convert(value: Any, tp: Any, key: str, meta: dict[str, Any]) -> Any:
    """Check ``value`` against the annotation ``tp`` and return it converted (lists, nested dataclasses)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key, meta)
            except OptionsError as err:
                errors.append(err)
        if len(errors) == 1:
            raise errors[0]
        raise OptionsError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
    if origin is dict:
        if not isinstance(value, dict):
            raise OptionsError(f"{key}: expected an object {{...}}, got {_show(value)}")
        return dict(value)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise OptionsError(f"{key}: expected {_type_name(tp)}, got {_show(value)}")
        return [_convert(v, item_tp, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise OptionsError(f"{key}: expected an object {{...}}, got {_show(value)}")
        return _build(tp, value, key)
    if tp is bool:
        if not isinstance(value, bool):
            raise OptionsError(f"{key}: expected true or false, got {_show(value)}")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise OptionsError(f"{key}: expected an integer, got {_show(value)}")
        _check_range(value, key, meta)  # a field's own range first: its message is the more precise one
        if not INT_MIN <= value <= INT_MAX:
            raise OptionsError(
                f"{key}: expected an integer that fits 64 bits ({INT_MIN}..{INT_MAX}), got {_show(value)}"
            )
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise OptionsError(f"{key}: expected a number, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:
            raise OptionsError(f"{key}: expected a finite number, got {_show(value)}") from None
        if meta.get("finite", True) and not math.isfinite(value):
            raise OptionsError(f"{key}: expected a finite number, got {_show(value)}")
    elif tp is str:
        if not isinstance(value, str):
            raise OptionsError(f"{key}: expected a string, got {_show(value)}")
    elif tp is not Any:
        raise TypeError(f"unsupported option type {tp!r} for {key}")
    _check_range(value, key, meta)
    return value


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _show(value: Any, limit: int = 60) -> str:
    """A value as JSON for a one-line message, shortened when long (huge numbers, deeply nested lists)."""
    try:
        text = json.dumps(value)
    except (RecursionError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


def _check_range(value: Any, key: str, meta: dict[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise OptionsError(f"{key}: expected one of {', '.join(json.dumps(c) for c in choices)}, got {_show(value)}")
    lo, hi = meta.get("min"), meta.get("max")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if lo is not None and (value < lo or (meta.get("min_exclusive") and value == lo)):
            op = ">" if meta.get("min_exclusive") else ">="
            raise OptionsError(f"{key}: expected a value {op} {lo}, got {value}")
        if hi is not None and value > hi:
            raise OptionsError(f"{key}: expected a value <= {hi}, got {value}")


def _build(cls: type[T], raw: dict[str, Any], prefix: str = "") -> T:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"section {prefix!r}" if prefix else "the top level"
        raise OptionsError(
            f"{_join(prefix, unknown[0])}: unknown key in {where}; known keys: {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, f in fields.items():
        key = _join(prefix, name)
        if name in raw:
            kwargs[name] = _convert(raw[name], hints[name], key, dict(f.metadata))
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                kwargs[name] = _build(hints[name], {}, key)
            else:
                raise OptionsError(f"{key}: required key is missing ({f.metadata.get('help') or _type_name(hints[name])})")
    obj = cls(**kwargs)
    check = getattr(obj, "check", None)
    if callable(check):
        problem = check()
        if problem:
            sub_key, message = problem
            raise OptionsError(f"{_join(prefix, sub_key)}: {message}")
    return obj


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _check_depth(raw: dict[str, Any]) -> None:
    """Refuse a tree nested more than :data:`MAX_DEPTH` levels deep (it would exhaust Python's recursion)."""
    path = too_deep(raw)
    if path is not None:
        raise OptionsError(f"{_short(path)}: nested more than {MAX_DEPTH} levels deep")


def build_options(cls: type[T], raw: dict[str, Any], source: str = "<options>") -> T:
    """Validate a plain dict against the dataclass ``cls``; errors name ``source`` and the key path."""
    try:
        _check_depth(raw)
        return _build(cls, raw)
    except OptionsError as err:
        raise OptionsError(f"{source}: {err}") from None


def load_options(cls: type[T], path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> T:
    """Load an option file (or only defaults when ``path`` is None), apply ``--set`` overrides, validate."""
    raw = read_json_with_comments(path) if path is not None else {}
    overridden = [apply_override(raw, a) for a in overrides]
    source = str(path) if path is not None else "<defaults>"
    try:
        _check_depth(raw)
        return _build(cls, raw)
    except OptionsError as err:
        message = str(err)
        key = message.split(":", 1)[0]
        if any(key == k or key.startswith((k + ".", k + "[")) or k.startswith(key + ".") for k in overridden):
            source += " (with --set)"
        raise OptionsError(f"{source}: {message}") from None


def options_to_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def save_options(options: Any, path: str | os.PathLike[str]) -> Path:
    """Write the resolved options as JSON (atomically), so a result can be reproduced from its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(options_to_dict(options), indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


# --------------------------------------------------------------------------------------------- command line


def add_option_arguments(
    parser: argparse.ArgumentParser, default_opt: str | None = None, checkout: str | os.PathLike[str] | None = None
) -> None:
    """The ``--opt FILE`` / ``--set key=value`` pair shared by every entry point.

    ``default_opt`` is a path relative to the working directory; when no such file is there but ``checkout`` (the
    entry script's folder) holds it, the shipped file is used, so a command works from any folder.
    """
    if default_opt and checkout is not None and not Path(default_opt).is_file() and (Path(checkout) / default_opt).is_file():
        default_opt = str(Path(checkout) / default_opt)
    parser.add_argument("--opt", default=default_opt, metavar="FILE", help="JSON option file (// comments allowed)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override one option, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )


def options_from_args(cls: type[T], args: argparse.Namespace) -> T:
    return load_options(cls, args.opt, args.overrides)
