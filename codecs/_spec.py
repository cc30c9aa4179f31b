"""Safe parsing of codec spec strings such as ``"topk(ratio=0.01) | quantize(bits=4) | zstd"``."""

from __future__ import annotations

import ast
import dataclasses
import re
import typing
from typing import Any

from ._stage import Stage, stage_class

MAX_SPEC_LENGTH = 1000
_STAGE_RE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.DOTALL)
_BARE_WORDS = {"true": True, "false": False, "True": True, "False": False}


def split_spec(spec: str) -> list[str]:
    """Split on ``|`` outside parentheses and quotes."""
    parts, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(spec):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "|" and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    parts.append(spec[start:])
    return parts


def _literal(node: ast.expr, where: str) -> Any:
    """Turn an AST node into a literal value without evaluating anything."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float, str, bool)):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _literal(node.operand, where)
        if isinstance(inner, (int, float)) and not isinstance(inner, bool):
            return -inner if isinstance(node.op, ast.USub) else inner
    if isinstance(node, ast.Name):  # bare words: true/false, or a string such as channel
        return _BARE_WORDS.get(node.id, node.id)
    if isinstance(node, (ast.Tuple, ast.List)):
        return tuple(_literal(elt, where) for elt in node.elts)
    raise ValueError(f"{where}: expected a literal (number, true/false, word or string, tuple), found {ast.unparse(node)!r}")


def _coerce(value: Any, annotation: Any) -> Any:
    """Light coercion toward a field's annotation: int -> float where a float is declared."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def parse_stage(text: str) -> Stage:
    """Parse one ``name`` or ``name(key=value, ...)`` into a stage object."""
    match = _STAGE_RE.match(text)
    if not match:
        raise ValueError(f"bad stage {text.strip()!r}: expected `name` or `name(key=value, ...)`")
    name, args = match.group(1), match.group(2)
    cls = stage_class(name)
    kwargs: dict[str, Any] = {}
    if args and args.strip():
        try:
            call = ast.parse(f"f({args})", mode="eval").body
        except (SyntaxError, RecursionError, MemoryError, ValueError):
            raise ValueError(f"stage {name!r}: cannot parse parameters {args!r}; expected key=value, ...") from None
        assert isinstance(call, ast.Call)
        if call.args:
            raise ValueError(f"stage {name!r}: parameters must be given as key=value, found {args!r}")
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls)}
        for kw in call.keywords:
            if kw.arg is None or kw.arg not in fields:
                allowed = ", ".join(sorted(fields)) or "none"
                raise ValueError(f"stage {name!r}: unknown parameter {kw.arg!r}; allowed: {allowed}")
            if kw.arg in kwargs:
                raise ValueError(f"stage {name!r}: parameter {kw.arg!r} given twice")
            kwargs[kw.arg] = _coerce(_literal(kw.value, f"stage {name!r}, parameter {kw.arg!r}"), hints.get(kw.arg))
    return cls(**kwargs)


def parse_stages(spec: str) -> list[Stage]:
    """Parse a full spec into stage objects; ``ValueError`` names the stage and parameter at fault."""
    if not isinstance(spec, str):
        raise ValueError(f"a codec spec must be a string, got {type(spec).__name__}")
    if len(spec) > MAX_SPEC_LENGTH:
        raise ValueError(f"codec spec is {len(spec)} characters long; at most {MAX_SPEC_LENGTH} are allowed")
    texts = split_spec(spec)
    if any(not t.strip() for t in texts):
        raise ValueError(f"empty stage in codec spec {spec!r}: stages are separated by a single '|'")
    return [parse_stage(t) for t in texts]
