"""Safe parsing of codec spec strings such as ``"topk(ratio=0.01) | quantize(bits=4) | zstd"``.

The grammar is small enough for a hand-written, non-recursive scanner, so that no input (a
spec typed by a user or read from a hostile blob header) can exhaust the stack or run code::

    spec   := stage ("|" stage)*
    stage  := NAME [ "(" [ param ("," param)* [","] ] ")" ]
    param  := NAME "=" value
    value  := scalar | "(" [ scalar ("," scalar)* [","] ] ")"     (also with [ ])
    scalar := NUMBER | "string" | 'string' | NAME                  (true/false are booleans)
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from typing import Any

from ._stage import Stage, stage_class

MAX_SPEC_LENGTH = 1000
"""Most characters in a spec (user text or blob header)."""

_TOKEN_RE = re.compile(
    r"""\s*(?:
        (?P<number>[+-]?(?:\d+\.?\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?))
      | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<string>"[^"\\]*"|'[^'\\]*')
      | (?P<punct>[|(),=\[\]])
    )""",
    re.VERBOSE,
)
_BARE_WORDS = {"true": True, "false": False, "True": True, "False": False}
_CLOSING = {"(": ")", "[": "]"}
Token = tuple[str, str, int]  # (kind, text, offset)


def _show(spec: str) -> str:
    """The spec for an error message, shortened so that a hostile one cannot flood a log."""
    return repr(spec) if len(spec) <= 80 else repr(spec[:77] + "...")


def tokenize(spec: str) -> list[Token]:
    """Split ``spec`` into (kind, text, offset) tokens; ``ValueError`` at the first bad character."""
    tokens: list[Token] = []
    pos = 0
    end = len(spec.rstrip())
    while pos < end:
        match = _TOKEN_RE.match(spec, pos)
        if not match or match.end() == pos:
            bad = spec[pos:].lstrip()[:1]
            raise ValueError(
                f"codec spec {_show(spec)}: unexpected character {bad!r} at offset "
                f"{len(spec) - len(spec[pos:].lstrip())}; "
                "expected a stage name, key=value, a number, a word or a quoted string"
            )
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind), match.start(kind)))
        pos = match.end()
    return tokens


class _Cursor:
    """A position in a token list with helpers that raise ``ValueError`` naming what was expected."""

    def __init__(self, spec: str, tokens: list[Token]) -> None:
        self.spec = spec
        self.tokens = tokens
        self.i = 0

    def peek(self) -> Token | None:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def next(self, expected: str) -> Token:
        token = self.peek()
        if token is None:
            raise ValueError(f"codec spec {_show(self.spec)} ends early: expected {expected}")
        self.i += 1
        return token

    def fail(self, token: Token, expected: str) -> ValueError:
        return ValueError(
            f"codec spec {_show(self.spec)}: expected {expected} at offset {token[2]}, found {token[1]!r}"
        )

    def punct(self, text: str, expected: str) -> None:
        token = self.next(expected)
        if token[:2] != ("punct", text):
            raise self.fail(token, expected)


def _scalar(token: Token, cursor: _Cursor) -> Any:
    kind, text, _ = token
    if kind == "number":
        if re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        return float(text)
    if kind == "string":
        return text[1:-1]
    if kind == "name":
        return _BARE_WORDS.get(text, text)
    raise cursor.fail(token, "a literal (number, true/false, word or quoted string)")


def _value(cursor: _Cursor) -> Any:
    """A scalar, or a flat tuple of scalars in ( ) or [ ]; nothing nests deeper."""
    token = cursor.next("a value")
    if token[:2] not in (("punct", "("), ("punct", "[")):
        return _scalar(token, cursor)
    closing = _CLOSING[token[1]]
    items: list[Any] = []
    while True:
        item = cursor.next(f"a value or {closing!r}")
        if item[:2] == ("punct", closing):
            return tuple(items)
        items.append(_scalar(item, cursor))
        sep = cursor.next(f"',' or {closing!r}")
        if sep[:2] == ("punct", closing):
            return tuple(items)
        if sep[:2] != ("punct", ","):
            raise cursor.fail(sep, f"',' or {closing!r}")


def _params(cursor: _Cursor, name: str) -> list[tuple[str, Any]]:
    """``key=value, ...`` up to and including the closing parenthesis."""
    params: list[tuple[str, Any]] = []
    while True:
        key = cursor.next("a parameter name or ')'")
        if key[:2] == ("punct", ")"):
            return params
        if key[0] != "name":
            raise ValueError(
                f"stage {name!r}: parameters must be given as key=value, found {key[1]!r} at offset {key[2]}"
            )
        eq = cursor.next("'='")
        if eq[:2] != ("punct", "="):
            raise ValueError(f"stage {name!r}: parameters must be given as key=value, found {eq[1]!r} after {key[1]!r}")
        params.append((key[1], _value(cursor)))
        sep = cursor.next("',' or ')'")
        if sep[:2] == ("punct", ")"):
            return params
        if sep[:2] != ("punct", ","):
            raise ValueError(
                f"stage {name!r}, parameter {key[1]!r}: expected ',' or ')' after its value at offset {sep[2]}, "
                f"found {sep[1]!r}; values are literals (number, true/false, word, quoted string or tuple)"
            )


def _coerce(value: Any, annotation: Any) -> Any:
    """Light coercion toward a field's annotation: int -> float where a float is declared."""
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def build_stage(name: str, params: list[tuple[str, Any]]) -> Stage:
    """Instantiate the stage registered as ``name`` from parsed ``key=value`` pairs."""
    cls = stage_class(name)
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in params:
        if key not in fields:
            allowed = ", ".join(sorted(fields)) or "none"
            raise ValueError(f"stage {name!r}: unknown parameter {key!r}; allowed: {allowed}")
        if key in kwargs:
            raise ValueError(f"stage {name!r}: parameter {key!r} given twice")
        kwargs[key] = _coerce(value, hints.get(key))
    return cls(**kwargs)


def _stage(cursor: _Cursor) -> Stage:
    token = cursor.next("a stage name")
    if token[:2] == ("punct", "|"):
        raise ValueError(f"empty stage in codec spec {_show(cursor.spec)}: stages are separated by a single '|'")
    if token[0] != "name":
        raise cursor.fail(token, "a stage name")
    params: list[tuple[str, Any]] = []
    following = cursor.peek()
    if following is not None and following[:2] == ("punct", "("):
        cursor.i += 1
        params = _params(cursor, token[1])
    return build_stage(token[1], params)


def parse_stages(spec: str) -> list[Stage]:
    """Parse a full spec into stage objects; ``ValueError`` names the stage and parameter at fault.

    Stages are immutable, so the result of a spec is kept (256 specs at most): a node parses
    the same uplink spec every round, and resolving the stages' type hints costs more than an
    encode of a small model.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a codec spec must be a string such as 'topk | zstd', got {type(spec).__name__}")
    return list(_parse_stages(spec))


@functools.lru_cache(maxsize=256)
def _parse_stages(spec: str) -> tuple[Stage, ...]:
    if len(spec) > MAX_SPEC_LENGTH:
        raise ValueError(f"codec spec is {len(spec)} characters long; at most {MAX_SPEC_LENGTH} are allowed")
    cursor = _Cursor(spec, tokenize(spec))
    if not cursor.tokens:
        raise ValueError("empty codec spec; expected stages such as 'topk(ratio=0.01) | zstd' (or 'identity')")
    stages = [_stage(cursor)]
    while (token := cursor.peek()) is not None:
        if token[:2] != ("punct", "|"):
            raise cursor.fail(token, "'|' between stages or the end of the spec")
        cursor.i += 1
        if cursor.peek() is None:
            raise ValueError(f"empty stage in codec spec {_show(spec)}: stages are separated by a single '|'")
        stages.append(_stage(cursor))
    return tuple(stages)
