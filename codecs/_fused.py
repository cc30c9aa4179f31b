"""The fused encoder: each tensor stage sees every tensor of an update in one batch.

The per-tensor encoder (``Codec.encode(update, fused=False)``) walks one tensor through all
stages before it starts the next, and writes the blob a few bytes at a time; on a small model
that fixed cost per tensor, stage and node dominates. Here stage ``i`` gets, in one
:meth:`Stage.encode_batch` call, every tensor and part that reaches it (in the order the
per-tensor walk reaches them, so stateful stages see the same sequence per tensor), and the
body is built as a list of byte strings joined once (a batch may hand over its parts already in
wire form, checked: ``Encoded.wire``). The blob is bit-identical to the per-tensor path's: the
format, the choice of raw nodes and the checks are the same.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from ._bits import varint_bytes as varint
from ._stage import ArrayNode, EncodeContext, Encoded, EncodeFurther, as_float32, as_numpy, flat
from ._wire import DTYPE_CODES, FLOAT_DTYPES, dtype_code, raw_node_head, shape_bytes, tensor_to_bytes

if TYPE_CHECKING:
    from ._pipeline import Codec


@dataclass(slots=True)
class _Raw:
    """A tensor sent as it is; ``made_by`` (a stage's output) asks for the finiteness check."""

    t: torch.Tensor
    made_by: str = ""


@dataclass(slots=True)
class _Staged:
    """A node of tensor stage ``index``."""

    index: int
    shape: tuple[int, ...]
    meta: bytes
    children: list[_Pending | _Raw]
    decoded: torch.Tensor | None = None  # the stage's own Encoded.decoded
    wire: bytes | None = None  # its Encoded.wire: the children as they are written


@dataclass(slots=True)
class _Pending:
    """A float32 tensor on its way through the stages; ``node`` is set once one takes it (or none does)."""

    name: str
    x: torch.Tensor
    raw: torch.Tensor
    made_by: str = ""
    node: _Raw | _Staged | None = field(default=None)


def run_stages(codec: Codec, pending: list[_Pending]) -> list[_Raw]:
    """Send ``pending`` through the codec's tensor stages, a batch per stage; set every ``node``.

    Returns the raw parts the stages made (for the finiteness check), in the order made.
    """
    waiting = pending
    made: list[_Raw] = []
    for index, stage in enumerate(codec.tensor_stages):
        if not waiting:
            return made
        states = codec._state.setdefault(index, {})
        seeded = stage.draws_random  # as Codec.stage_seed, asked once per stage
        ctxs = [
            EncodeContext(
                name=p.name,
                state=states.setdefault(p.name, {}),
                seed=codec._seed(index, p.name) if seeded else 0,
                call=codec._calls,
            )
            for p in waiting
        ]
        results = stage.encode_batch([p.x for p in waiting], ctxs)
        if len(results) != len(waiting):
            raise RuntimeError(f"stage {stage.name!r}: encode_batch returned {len(results)} results for {len(waiting)}")
        for p in waiting:
            if not states.get(p.name, True):
                del states[p.name]
        later: list[_Pending] = []
        further: list[_Pending] = []
        made_by_stage = f"with stage {stage.name!r}"
        for p, encoded in zip(waiting, results, strict=True):
            if encoded is None:
                later.append(p)
                continue
            if encoded.wire is not None:
                p.node = _wired(index, p, encoded, stage.name)
                continue
            made_by = f"encoding update[{p.name!r}] {made_by_stage}"
            children: list[_Pending | _Raw] = []
            for part in encoded.parts:
                if not isinstance(part, EncodeFurther):
                    raw = _Raw(part, made_by)
                    children.append(raw)
                    made.append(raw)
                    continue
                x = as_float32(part.tensor)
                child = _Pending(p.name, x, x, made_by)
                if x.numel() == 0:
                    child.node = _Raw(x, made_by)
                else:
                    later.append(child)
                    further.append(child)
                children.append(child)
            decoded = encoded.decoded if all(isinstance(c, _Raw) for c in children) else None
            p.node = _Staged(index, tuple(p.x.shape), encoded.meta, children, decoded)
        check_further(further)
        waiting = later
    for p in waiting:
        p.node = _Raw(p.raw, p.made_by)
        if p.made_by:
            made.append(p.node)
    return made


def _wired(index: int, p: _Pending, encoded: Encoded, stage: str) -> _Staged:
    """The node of a stage output that comes with its wire form: its parts are raw and already checked."""
    children: list[_Pending | _Raw] = []
    for part in encoded.parts:
        if isinstance(part, EncodeFurther):
            raise RuntimeError(f"stage {stage!r} gave the wire form of parts that later stages encode further")
        children.append(_Raw(part))
    return _Staged(index, tuple(p.x.shape), encoded.meta, children, encoded.decoded, encoded.wire)


def overflow_error(made_by: str) -> ValueError:
    """The error for a stage output that holds NaN or infinity; ``made_by`` names the tensor and stage."""
    return ValueError(
        f"{made_by} overflows float32 (its output holds NaN or infinite values); scale the update "
        "down or choose another codec"
    )


def check_further(children: list[_Pending]) -> None:
    """Raise for the first part that a stage hands on to later stages and that holds NaN or infinity.

    A later stage must not see them: an eigensolver fails on them with its own exception, and top-k
    keeps no index of a NaN. One sum over all parts; only when it is not finite are they checked apart.
    """
    if not children or math.isfinite(float(torch.sum(torch.cat([flat(c.x) for c in children])))):
        return
    for child in children:
        if not all_finite(child.x):
            raise overflow_error(child.made_by)


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN and no infinity."""
    # NaN and inf always reach the sum; only a sum that overflowed needs the exact check
    return math.isfinite(float(torch.sum(t))) or bool(torch.isfinite(t).all())


def check_finite(made: list[_Raw], nodes: list[_Pending | _Raw]) -> None:
    """Raise for the first raw node made by a stage (depth first in ``nodes``) that holds NaN or infinity.

    ``made`` lists every raw node a stage made. Their float32 parts are checked together by one
    sum over their concatenation; only when that sum is not finite is the tree walked, to name
    the culprit.
    """
    floats = [r.t for r in made if r.t.dtype in FLOAT_DTYPES]
    if all(t.dtype == torch.float32 for t in floats):
        if not floats or math.isfinite(float(torch.sum(torch.cat([flat(t) for t in floats])))):
            return
    raws: list[_Raw] = []
    stack = list(reversed(nodes))
    while stack:
        node = stack.pop()
        resolved = node.node if isinstance(node, _Pending) else node
        if isinstance(resolved, _Staged):
            stack.extend(reversed(resolved.children))
        elif resolved is not None and resolved.made_by and resolved.t.dtype in FLOAT_DTYPES:
            raws.append(resolved)
    for r in raws:
        if not all_finite(r.t):
            raise overflow_error(r.made_by)


@functools.lru_cache(maxsize=4096)
def raw_head(dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """Tag, dtype code and shape of a raw node."""
    return raw_node_head(dtype_code(dtype), shape)


@functools.lru_cache(maxsize=4096)
def staged_head(index: int, shape: tuple[int, ...], meta: bytes, nparts: int) -> bytes:
    """Tag, shape, header and part count of a node of tensor stage ``index``."""
    return bytes((index + 1,)) + shape_bytes(shape) + varint(len(meta)) + meta + bytes((nparts,))


def node_pieces(node: _Pending | _Raw, out: list[bytes | memoryview]) -> int:
    """Append the wire form of ``node`` (depth first, iteratively) to ``out``; return its size in bytes."""
    size = 0
    stack: list[_Pending | _Raw | _Staged | None] = [node]
    while stack:
        resolved = stack.pop()
        if isinstance(resolved, _Pending):
            resolved = resolved.node
        if isinstance(resolved, _Raw):
            t = resolved.t
            head = raw_head(t.dtype, tuple(t.shape))
            data = tensor_to_bytes(t)
            out.append(head)
            out.append(data)
            size += len(head) + len(data)
        elif resolved is None:
            raise RuntimeError("a pending node left unresolved by run_stages")
        else:
            head = staged_head(resolved.index, resolved.shape, resolved.meta, len(resolved.children))
            out.append(head)
            size += len(head)
            if resolved.wire is None:
                stack.extend(reversed(resolved.children))
            else:
                out.append(resolved.wire)
                size += len(resolved.wire)
    return size


def record_head(name: str, t: torch.Tensor) -> bytes:
    """Name and dtype code of one body record."""
    encoded = name.encode()
    return varint(len(encoded)) + encoded + bytes((dtype_code(t.dtype),))


def encode_body(
    codec: Codec, records: list[tuple[str, torch.Tensor]]
) -> tuple[list[bytes | memoryview], list[_Pending | _Raw], list[int]]:
    """The body of the blob (tensor count, then the records) as pieces to join, each record's top node as sent,
    and the offset in the body where each record begins."""
    tops: list[_Pending | _Raw] = []
    pending = []
    for name, t in records:
        x = codec.staged_input(name, t)
        if x is None:
            tops.append(_Raw(t))
        else:
            pending.append(_Pending(name, x, t))
            tops.append(pending[-1])
    check_finite(run_stages(codec, pending), tops)
    out: list[bytes | memoryview] = [varint(len(records))]
    starts, offset = [], len(out[0])
    for i, ((name, t), top) in enumerate(zip(records, tops, strict=True)):
        starts.append(offset)
        head = record_head(name, t)
        out.append(head)
        mark = len(out)
        size = node_pieces(top, out)
        if isinstance(top, _Pending) and size > 2 + 5 * t.dim() + t.numel() * t.element_size():
            del out[mark:]  # compression would not pay: send as it is
            tops[i] = _Raw(t)
            size = node_pieces(tops[i], out)
        offset += len(head) + size
    return out, tops, starts


def rebuild(
    codec: Codec, records: list[tuple[str, torch.Tensor]], tops: list[_Pending | _Raw]
) -> dict[str, torch.Tensor]:
    """What :func:`decode` returns for the blob of ``tops``, bit for bit, without reading the blob.

    Each stage node is decoded by its stage from its parts as they are in memory: a raw part
    reads back from the wire as the same dtype, shape and values, and a stage's decode is a
    function of its parts. Raw tensors are returned as they are (not copied). Error feedback
    uses this for its residual instead of parsing its own blob.
    """
    out = {}
    for (name, t), top in zip(records, tops, strict=True):
        decoded = _rebuild_node(codec, top)
        out[name] = decoded if decoded.dtype == t.dtype else decoded.to(t.dtype)  # as decode's record
    return out


def _rebuild_node(codec: Codec, node: _Pending | _Raw) -> torch.Tensor:
    resolved = node.node if isinstance(node, _Pending) else node
    if isinstance(resolved, _Raw):
        return resolved.t
    if resolved is None:
        raise RuntimeError("a pending node left unresolved by run_stages")
    if resolved.decoded is not None:
        return resolved.decoded.reshape(resolved.shape)
    stage = codec.tensor_stages[resolved.index]
    array_node = stage.array_node(resolved.meta, resolved.shape)
    arrays = None if array_node is None else _raw_arrays(array_node, resolved.children)
    if array_node is not None and arrays is not None:  # the decoder's fast path, the same function
        return torch.from_numpy(array_node.decode(arrays)).reshape(resolved.shape)
    parts = [_aligned(_rebuild_node(codec, child)) for child in resolved.children]
    return stage.decode(parts, resolved.meta, resolved.shape)


DECODE_ALIGNMENT = 16
"""Bytes to which the decoder's parts are aligned (malloc's, at least): the parts a stage's decode sees."""


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t``, or a copy of it at an address aligned as the decoder's parts are.

    MKL's matrix product rounds differently when an operand starts 4, 8 or 12 bytes past a 16-byte
    boundary; a child's rebuilt values may be a view at any offset of a batch's buffer (quantize's
    ``decoded``), while decoding hands a stage fresh arrays. Found by the encoder fuzzer: a factor at
    such an offset rebuilt its product 1 ulp away from what decode returns.
    """
    return t if t.data_ptr() % DECODE_ALIGNMENT == 0 else t.clone()


def _raw_arrays(node: ArrayNode, children: list[_Pending | _Raw]) -> list[np.ndarray] | None:
    """Flat numpy views of ``children`` if they are raw parts of the layout ``node`` declares, else None."""
    if len(children) != len(node.parts):
        return None
    arrays = []
    for child, (code, count) in zip(children, node.parts, strict=True):
        raw = child.node if isinstance(child, _Pending) else child
        if not isinstance(raw, _Raw) or raw.t.numel() != count or DTYPE_CODES.get(raw.t.dtype) != code:
            return None
        arrays.append(as_numpy(raw.t).reshape(-1))
    return arrays
