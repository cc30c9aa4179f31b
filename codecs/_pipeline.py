"""The codec pipeline: encode an update into a self-describing blob and decode it safely."""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, overload

import numpy as np
import torch

from ._bits import varint_bytes
from ._errors import CodecError
from ._fused import all_finite as _all_finite
from ._fused import encode_body, overflow_error, rebuild
from ._spec import MAX_SPEC_LENGTH, parse_stages
from ._stage import ArrayNode, EncodeContext, Encoded, EncodeFurther, Stage, as_float32
from ._wire import (
    DTYPES,
    FLOAT_DTYPES,
    MAGIC,
    TAG_RAW,
    VERSION,
    WIRE_NUMPY_DTYPES,
    Reader,
    Writer,
    dtype_code,
    extent,
    itemsize,
    numel,
    raw_node_head,
    tensor_from_bytes,
    tensor_to_bytes,
)

TensorLike = torch.Tensor | np.ndarray
MAX_NAME_LENGTH = 1024
MAX_PARTS = 16
MAX_META = 4096
MAX_STAGES = 8


@dataclass(frozen=True)
class DecodeLimits:
    """Caps that :func:`decode` enforces before it allocates or computes.

    Parameters
    ----------
    max_elements : int
        Most elements over all decoded tensors together; an empty tensor counts the product of
        its non-zero dimensions (default: 2**28, 1 GiB of float32).
    max_body_bytes : int
        Most bytes the body may take once entropy coding is undone (default: 2**30).
    max_tensors : int
        Most tensors in one blob (default: 100_000).
    scratch_factor : int
        Bytes that decoding one tensor may allocate (every node, part and stage scratch of its
        encoding), as a multiple of its float32 size (default: 16).
    scratch_bytes : int
        Bytes that decoding one tensor may allocate on top of that (default: 2**20).
    work_factor : int
        Elementary operations (multiply-adds, element visits) that decoding one tensor may
        take, per element of that tensor (default: 2048).
    work_constant : int
        Operations that decoding one tensor may take on top of that (default: 2**22).
    """

    max_elements: int = 2**28
    max_body_bytes: int = 2**30
    max_tensors: int = 100_000
    scratch_factor: int = 16
    scratch_bytes: int = 2**20
    work_factor: int = 2048
    work_constant: int = 2**22


def _to_tensor(name: str, value: Any) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        value = torch.from_numpy(np.require(value, requirements="C"))  # not ascontiguousarray: it makes 0-d 1-d
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"update[{name!r}] must be a torch.Tensor or numpy.ndarray, found {type(value).__name__}")
    dtype_code(value.dtype)  # raises for unsupported dtypes
    # detach and cpu each make a new tensor object; most updates need neither
    return value if value.is_cpu and not value.requires_grad else value.detach().cpu()


def _check_pipeline(stages: tuple[Stage, ...]) -> None:
    """At most MAX_STAGES stages, each stage at most once, bytes stages last."""
    if len(stages) > MAX_STAGES:
        raise ValueError(f"a codec has at most {MAX_STAGES} stages, got {len(stages)}")
    names = [s.name for s in stages]
    for name in names:
        if names.count(name) > 1:
            raise ValueError(
                f"stage {name!r} appears {names.count(name)} times in the codec; each stage may appear once"
            )
    for s in stages[1:]:
        if s.allocates:
            raise ValueError(f"stage {s.name!r} plans the whole update and must come first in the codec")
    seen_bytes = False
    for s in stages:
        if s.kind == "bytes":
            seen_bytes = True
        elif seen_bytes:
            raise ValueError(
                f"stage {s.name!r} works on tensors but follows a bytes stage; "
                "entropy coding stages (zstd) must come last"
            )


def _check_rebuilt(records: list[tuple[str, torch.Tensor]], decoded: Mapping[str, torch.Tensor], spec: str) -> None:
    """Raise for the first float tensor of ``records`` (finite, as encode checked) that rebuilds to NaN or infinity."""
    for name, t in records:
        got = decoded[name]
        if got.is_floating_point() and not _all_finite(got):
            biggest = float(t.abs().max()) if t.numel() else 0.0
            # the stages rebuild in float32, then cast to the tensor's dtype: the narrower range holds
            limit = min((t.dtype, torch.float32), key=lambda d: torch.finfo(d).max)
            raise ValueError(
                f"update[{name!r}] ({t.dtype}, largest magnitude {biggest:.4g}) rebuilds from the blob of "
                f"{spec!r} to values beyond {limit}'s range (largest finite: {torch.finfo(limit).max:.4g}): "
                "the codec's error carries values near that limit past it; scale the update down or choose "
                "another codec"
            )


@functools.lru_cache(maxsize=16)
def _hashed_prefix(prefix: str) -> hashlib.blake2b:
    """blake2b (8 bytes) fed with ``prefix``, to be copied: the seeds of one encode call share it, and
    hashing it once halves their cost."""
    return hashlib.blake2b(prefix.encode(), digest_size=8)


class Codec:
    """A pipeline of stages. Build it from a spec string or from stage objects; both are equal.

    Parameters
    ----------
    stages : str | Sequence[Stage]
        ``"topk(ratio=0.01) | quantize(bits=8) | zstd"`` or ``[TopK(ratio=0.01), Quantize(bits=8), Zstd()]``.
    seed : int | None
        Seed of the random numbers drawn by stochastic stages; ``None`` draws fresh entropy
        (default: None).

    Examples
    --------
    >>> codec = parse("topk(ratio=0.01) | quantize(bits=8) | zstd")
    >>> blob = codec.encode({"w": torch.randn(1000, 100)})
    >>> decode(blob)["w"].shape
    torch.Size([1000, 100])
    """

    def __init__(self, stages: str | Sequence[Stage], *, seed: int | None = None) -> None:
        if not isinstance(stages, (str, Sequence)):
            raise TypeError(f"a codec is built from a spec string or a sequence of stages, got {type(stages).__name__}")
        stages = tuple(parse_stages(stages) if isinstance(stages, str) else stages)
        for s in stages:
            if not isinstance(s, Stage):
                raise TypeError(f"codec stages must be Stage objects, found {type(s).__name__}")
        _check_pipeline(stages)
        self.stages: tuple[Stage, ...] = stages
        self._tensor_stages = [s for s in stages if s.kind == "tensor"]
        self._bytes_stages = [s for s in stages if s.kind == "bytes"]
        self.seed = seed
        self._calls = 0
        self._state: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self._prefix: bytes | None = None
        if len(self.spec) > MAX_SPEC_LENGTH:
            raise ValueError(
                f"codec spec is {len(self.spec)} characters; at most {MAX_SPEC_LENGTH} fit the wire format"
            )

    # ------------------------------------------------------------------ description
    @property
    def spec(self) -> str:
        """Canonical spec text; ``parse(codec.spec) == codec``."""
        return " | ".join(s.spec for s in self.stages) if self.stages else "identity"

    @property
    def tensor_stages(self) -> tuple[Stage, ...]:
        """The tensor stages, in spec order (their index is the one the wire format's tags name)."""
        return tuple(self._tensor_stages)

    @property
    def lossless(self) -> bool:
        """True when every stage is lossless (float32 tensors come back bit-exact)."""
        return all(s.lossless for s in self.stages)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Codec) and other.stages == self.stages

    def __hash__(self) -> int:
        return hash(self.stages)

    def __repr__(self) -> str:
        return f"Codec({self.spec!r})"

    def __or__(self, other: Stage | Codec) -> Codec:
        more = other.stages if isinstance(other, Codec) else (other,)
        return Codec(self.stages + tuple(more), seed=self.seed)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat state of the stateful stages (e.g. PowerSGD warm starts) and the call counter."""
        out: dict[str, torch.Tensor] = {"calls": torch.tensor(self._calls, dtype=torch.int64)}
        for index, per_tensor in self._state.items():
            for tensor_name, entries in per_tensor.items():
                for key, value in entries.items():
                    out[f"stage{index}/{key}/{tensor_name}"] = value.clone()
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned.

        Raises
        ------
        ValueError
            For a key that names no stage of this codec, a call counter that is not a
            non-negative integer scalar, or an entry its stage refuses (wrong dtype, shape or
            non-finite values; see :meth:`Stage.check_state`).
        TypeError
            For a value that is not a tensor. Nothing is loaded when anything is raised.
        """
        loaded: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        calls = 0
        for key, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise TypeError(f"codec state {key!r} must be a torch.Tensor, found {type(value).__name__}")
            if key == "calls":
                if value.numel() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool or int(value) < 0:
                    raise ValueError(f"codec state 'calls' must be a non-negative integer scalar, found {value!r}")
                calls = int(value)
                continue
            index, entry, tensor_name = self._state_key(key)
            self._tensor_stages[index].check_state(entry, value)
            loaded.setdefault(index, {}).setdefault(tensor_name, {})[entry] = value.clone()
        self._state, self._calls = loaded, calls

    def _state_key(self, key: str) -> tuple[int, str, str]:
        head, _, rest = key.partition("/")
        entry, _, tensor_name = rest.partition("/")
        if not head.startswith("stage") or not head[5:].isdigit() or not entry or not tensor_name:
            raise ValueError(f"unexpected codec state key {key!r}; expected 'stage<i>/<entry>/<tensor name>'")
        index = int(head[5:])
        if index >= len(self._tensor_stages):
            raise ValueError(
                f"codec state key {key!r} names tensor stage {index}, but the codec has {len(self._tensor_stages)}"
            )
        return index, entry, tensor_name

    # ------------------------------------------------------------------ encode
    def _seed(self, stage_index: int, name: str) -> int:
        """The seed of (this encode call, stage, tensor): blake2b of "{base}/{call}/{stage}/{name}"."""
        base = self.seed if self.seed is not None else int.from_bytes(os.urandom(8), "little")
        h = _hashed_prefix(f"{base}/{self._calls}/").copy()
        h.update(f"{stage_index}/{name}".encode())
        return int.from_bytes(h.digest(), "little") >> 1

    def stage_seed(self, stage: Stage, index: int, name: str) -> int:
        """The seed handed to tensor stage ``index`` for tensor ``name``: :meth:`_seed`, or 0 if it draws nothing."""
        return self._seed(index, name) if stage.draws_random else 0

    def encode(self, update: Mapping[str, TensorLike], *, fused: bool = True) -> bytes:
        """Encode ``update`` (names -> tensors or arrays) into a self-describing blob.

        Float tensors go through the tensor stages as float32 and come back in their own
        dtype; other dtypes (e.g. BatchNorm counters) are sent losslessly. The blob never holds
        NaN or infinity: what a stage cannot represent is refused. Its reconstruction is not
        checked: values near float32's largest (or float16's) can decode past it, to infinity;
        :meth:`encode_rebuilt` refuses those.

        ``fused=True`` hands each stage all tensors at once (see ``_fused``); ``fused=False``
        encodes tensor by tensor. Both give the same blob bit for bit.

        Raises
        ------
        ValueError
            For NaN or infinite values, float64 values beyond float32's range (unless no stage
            takes the tensor, as with ``identity``), a stage whose output would overflow
            float32, an empty tensor whose shape :func:`decode` would refuse, bad names or
            unsupported dtypes.
        """
        return self.encode_rebuilt(update, fused=fused, rebuilt=False)[0]

    @overload
    def encode_rebuilt(
        self, update: Mapping[str, TensorLike], *, fused: bool = True, rebuilt: Literal[True] = True
    ) -> tuple[bytes, dict[str, torch.Tensor]]: ...

    @overload
    def encode_rebuilt(
        self, update: Mapping[str, TensorLike], *, fused: bool = True, rebuilt: bool
    ) -> tuple[bytes, dict[str, torch.Tensor] | None]: ...

    def encode_rebuilt(
        self, update: Mapping[str, TensorLike], *, fused: bool = True, rebuilt: bool = True
    ) -> tuple[bytes, dict[str, torch.Tensor] | None]:
        """:meth:`encode`, and with ``rebuilt`` what :func:`decode` will return for the blob, bit for bit.

        The second item is built from the encoder's own parts without reading the blob (see
        ``_fused.rebuild``); where that is not available (the per-tensor path, an allocating first
        stage such as ``budget``) the blob is decoded. It is ``None`` only with ``rebuilt=False``.
        Raw tensors in it may be the update's own tensors, not copies.

        Raises
        ------
        ValueError
            As :meth:`encode`; and with ``rebuilt``, for a finite tensor whose reconstruction is
            not finite: values near the limit of float32 (or of the tensor's own dtype, e.g.
            float16's 65,504) that the codec's error carries past it, such as a ``quantize``
            range wider than float32's. :meth:`encode` does not decode what it wrote and
            returns such a blob; its receiver's finiteness check refuses it.
        """
        records = self._records(update)
        first = self._tensor_stages[0] if self._tensor_stages else None
        decoded = None
        if first is not None and first.allocates:
            blob = first.encode_update(self, records)  # e.g. `budget`: plans every tensor, then encodes
        elif fused:
            pieces, tops, starts = encode_body(self, records)
            blob = self._finish_pieces(pieces, starts)
            if rebuilt:
                decoded = rebuild(self, records, tops)
        else:
            body = Writer()
            body.varint(len(records))
            starts = []
            for name, t in records:
                starts.append(body.size)
                body.extend(self.record(name, t, self._encode_tensor(name, t)))
            blob = self.finish(body, starts)
        self._calls += 1
        if rebuilt:
            decoded = decoded if decoded is not None else decode(blob)
            _check_rebuilt(records, decoded, self.spec)
        return blob, decoded

    def _finish_pieces(self, pieces: list[bytes | memoryview], starts: Sequence[int]) -> bytes:
        """:meth:`finish` for a body given as pieces: one join, then the bytes stages."""
        body = b"".join(pieces)
        return b"".join((self._head_prefix(), varint_bytes(len(body)), self._bytes_coded(body, starts)))

    def _bytes_coded(self, body: bytes, starts: Sequence[int]) -> bytes:
        """The body through the bytes stages; the first is told where the records start."""
        payload = body
        for i, stage in enumerate(self._bytes_stages):
            payload = stage.encode_bytes_split(payload, starts) if i == 0 else stage.encode_bytes(payload)
        return payload

    def _head_prefix(self) -> bytes:
        """Magic, version and spec: the header before the body length (the stages never change)."""
        if self._prefix is None:
            head = Writer()
            head.raw(MAGIC)
            head.u8(VERSION)
            head.blob(self.spec.encode())
            self._prefix = head.getvalue()
        return self._prefix

    def _records(self, update: Mapping[str, TensorLike]) -> list[tuple[str, torch.Tensor]]:
        """The update as checked (name, CPU tensor) pairs, in order."""
        if not isinstance(update, Mapping):
            raise TypeError(f"update must be a mapping of names to tensors, found {type(update).__name__}")
        records = []
        for name, value in update.items():
            if not isinstance(name, str) or not name or len(name.encode()) > MAX_NAME_LENGTH:
                raise ValueError(
                    f"tensor names must be non-empty strings of at most {MAX_NAME_LENGTH} bytes, got {name!r}"
                )
            records.append((name, _to_tensor(name, value)))
        return records

    @staticmethod
    def record(name: str, t: torch.Tensor, node: Writer) -> Writer:
        """One body record: the name, the tensor's dtype code and its node."""
        out = Writer()
        out.blob(name.encode())
        out.u8(dtype_code(t.dtype))
        out.extend(node)
        return out

    def finish(self, body: Writer, starts: Sequence[int] = ()) -> bytes:
        """The blob: header, then the body after the bytes stages (``starts``: where its records begin)."""
        body_len = body.size
        payload = self._bytes_coded(body.getvalue(), starts) if self._bytes_stages else b""
        out = Writer()
        out.raw(MAGIC)
        out.u8(VERSION)
        out.blob(self.spec.encode())
        out.varint(body_len)
        if self._bytes_stages:
            out.raw(payload)
        else:
            out.extend(body)  # no copy of the body before the final join
        return out.getvalue()

    def header_size(self, body_len: int) -> int:
        """Bytes of the blob header (magic, version, spec, body length) for a body of ``body_len`` bytes."""
        head = Writer()
        head.raw(MAGIC)
        head.u8(VERSION)
        head.blob(self.spec.encode())
        head.varint(body_len)
        return head.size

    def _encode_tensor(self, name: str, t: torch.Tensor) -> Writer:
        """The node of one tensor: staged if a stage takes it and that pays, else raw."""
        x = self.staged_input(name, t)
        if x is None:
            return self.raw_node(t)
        node = self._encode_node(x, name, 0, fallback=t)
        raw_size = 2 + 5 * t.dim() + t.numel() * t.element_size()
        if node.size > raw_size:  # compression would not pay: send as it is
            node = self.raw_node(t)
        return node

    def staged_input(self, name: str, t: torch.Tensor) -> torch.Tensor | None:
        """``t`` as contiguous float32 for the tensor stages, or ``None`` when it is sent raw.

        Raises ``ValueError`` for NaN or infinity, values beyond float32 that a stage would
        compute on, and empty shapes that :func:`decode` would refuse.
        """
        if t.numel() == 0:
            if extent(tuple(t.shape)) > DecodeLimits().max_elements:
                raise ValueError(
                    f"update[{name!r}] is empty but its shape {tuple(t.shape)} spans {extent(tuple(t.shape))} "
                    f"positions, more than decode accepts by default (DecodeLimits.max_elements = "
                    f"{DecodeLimits().max_elements}); drop the tensor or give it a smaller shape"
                )
            return None
        if t.dtype not in FLOAT_DTYPES:
            return None
        if not _all_finite(t):
            raise ValueError(f"update[{name!r}] contains NaN or infinite values; expected finite numbers")
        x = as_float32(t)
        if t.dtype != torch.float32 and not _all_finite(x):  # float64 beyond float32's range
            if all(s.passthrough for s in self._tensor_stages):
                return None  # no stage computes in float32: send the float64 values as they are
            biggest = float(t.abs().max())
            raise ValueError(
                f"update[{name!r}] holds values up to {biggest:.3g} in magnitude, beyond float32's range "
                f"(about 3.4e38); the codec's stages compute in float32. Scale the update down, or send it "
                "with the lossless 'identity' codec"
            )
        return x

    @staticmethod
    def raw_node(t: torch.Tensor, made_by: str = "") -> Writer:
        """A raw node; ``made_by`` names the stage whose part ``t`` is, for the finiteness check."""
        if made_by and t.dtype in FLOAT_DTYPES and not _all_finite(t):
            raise overflow_error(made_by)
        node = Writer()
        node.raw(raw_node_head(dtype_code(t.dtype), tuple(t.shape)))
        node.raw(tensor_to_bytes(t))
        return node

    def _encode_node(
        self,
        x: torch.Tensor,
        name: str,
        start: int,
        made_by: str = "",
        fallback: torch.Tensor | None = None,
        stages: Sequence[Stage | None] | None = None,
    ) -> Writer:
        """Encode float32 ``x`` with the first tensor stage at or after ``start`` that takes it.

        If no stage takes it, ``fallback`` (the tensor in its own dtype) or ``x`` is sent as it is.
        ``stages`` replaces the codec's tensor stages for this tensor (same length; ``None``
        skips a stage), as an allocating stage such as ``budget`` sets them per tensor.
        """
        raw = x if fallback is None else fallback
        if x.numel() == 0:
            return self.raw_node(raw, made_by)
        stages = self._tensor_stages if stages is None else stages
        for index in range(start, len(stages)):
            stage = stages[index]
            if stage is None:
                continue
            state = self._state.setdefault(index, {}).setdefault(name, {})
            encoded = stage.encode(
                x, EncodeContext(name=name, state=state, seed=self.stage_seed(stage, index, name), call=self._calls)
            )
            if not state:
                self._state[index].pop(name)
            if encoded is None:
                continue
            return self.stage_node(index, encoded, tuple(x.shape), name, stages)
        return self.raw_node(raw, made_by)

    def stage_node(
        self,
        index: int,
        encoded: Encoded,
        shape: tuple[int, ...],
        name: str,
        stages: Sequence[Stage | None] | None = None,
    ) -> Writer:
        """The node of tensor stage ``index``: its header, then each part (open parts go to later stages)."""
        made_by = f"encoding update[{name!r}] with stage {self._tensor_stages[index].name!r}"
        node = Writer()
        node.u8(index + 1)
        node.shape(shape)
        node.blob(encoded.meta)
        node.u8(len(encoded.parts))
        for part in encoded.parts:
            if isinstance(part, EncodeFurther):
                x = part.tensor.to(torch.float32).contiguous()
                if not _all_finite(x):  # later stages must not see NaN or infinity (see check_further)
                    raise overflow_error(made_by)
                child = self._encode_node(x, name, index + 1, made_by, stages=stages)
            else:
                child = self.raw_node(part, made_by)
            node.extend(child)
        return node


# ---------------------------------------------------------------------- decode
NODE_BYTES = 512
"""Bytes charged per node for the Python and torch objects it creates."""
NODE_WORK = 10_000
"""Operations charged per node for its fixed interpreter overhead."""


class _Budget:
    """Memory and work allowed for decoding one tensor, charged before anything is allocated."""

    def __init__(self, limits: DecodeLimits) -> None:
        self.limits = limits
        self.output_elements = 0  # over the whole blob
        self.bytes_left = 0
        self.work_left = 0

    def start_tensor(self, shape: tuple[int, ...], what: str) -> None:
        n = numel(shape)
        self.output_elements += max(n, extent(shape))
        if self.output_elements > self.limits.max_elements:
            raise CodecError(
                f"{what} brings the decoded size to {self.output_elements} elements, over the limit of "
                f"{self.limits.max_elements} (DecodeLimits.max_elements)"
            )
        self.bytes_left = self.limits.scratch_factor * 4 * n + self.limits.scratch_bytes
        self.work_left = self.limits.work_factor * n + self.limits.work_constant

    def charge(self, nbytes: int, work: int, what: str, stage: str | None = None) -> None:
        """Spend ``nbytes`` and ``work``; raise naming ``what`` (and ``stage``) when over the limits."""
        self.bytes_left -= nbytes
        self.work_left -= work
        if self.bytes_left >= 0 and self.work_left >= 0:
            return
        if stage is not None:  # formatted only when raised: decoding charges every node
            what = f"{what}: stage {stage!r}"
        if self.bytes_left < 0:
            raise CodecError(
                f"{what}: decoding needs more than DecodeLimits.scratch_factor ({self.limits.scratch_factor}) x "
                f"the tensor's float32 size + scratch_bytes ({self.limits.scratch_bytes}) of memory"
            )
        if self.work_left < 0:
            raise CodecError(
                f"{what}: decoding needs more than DecodeLimits.work_factor ({self.limits.work_factor}) x "
                f"the tensor's elements + work_constant ({self.limits.work_constant}) operations"
            )


class _Decoder:
    def __init__(self, stages: list[Stage], limits: DecodeLimits) -> None:
        self.stages = stages
        self.limits = limits
        self.budget = _Budget(limits)

    def _shape(self, r: Reader, what: str, depth: int) -> tuple[int, ...]:
        shape = r.plain_shape(self.limits.max_elements)
        if shape is None:
            shape = r.shape(what, self.limits.max_elements)
        if depth == 0:
            self.budget.start_tensor(shape, what)
        return shape

    def node(
        self, r: Reader, first_stage: int, what: str, depth: int = 0, stages: Sequence[Stage | None] | None = None
    ) -> torch.Tensor:
        """Decode one node; ``stages`` are the tensor stages in force (set per tensor by ``budget``)."""
        stages = self.stages if stages is None else stages
        # the fast reads below return -1 / None where the checked read would raise: it then runs,
        # with its message (formatting messages up front cost more than reading a small node)
        tag = r.next_u8()
        if tag < 0:
            r.u8(f"tag of {what}")
        if tag == TAG_RAW:
            return self._raw(r, what, depth)
        index = tag - 1
        if not first_stage <= index < len(stages):
            raise CodecError(
                f"{what}: tag {tag} names tensor stage {index}, expected raw (0) or a stage in "
                f"{first_stage}..{len(stages) - 1}"
            )
        stage = stages[index]
        if stage is None:
            raise CodecError(f"{what}: tag {tag} names tensor stage {index}, which this tensor's plan skips")
        shape = self._shape(r, what, depth)
        n = numel(shape)
        if n == 0:
            raise CodecError(
                f"{what}: stage {stage.name!r} node of shape {shape} has no elements; empty tensors are raw"
            )
        self.budget.charge(NODE_BYTES + 4 * n, NODE_WORK, what)
        meta = r.empty_blob()
        if meta is None:
            meta = bytes(r.blob(f"header of {what}", MAX_META))
        nparts = r.next_u8()
        if nparts < 0:
            r.u8(f"part count of {what}")
        if nparts > MAX_PARTS:
            raise CodecError(f"{what}: {nparts} parts, at most {MAX_PARTS} are allowed")
        stages = stage.stages_for_parts(meta, stages, index)
        array_node = stage.array_node(meta, shape)
        if array_node is not None and len(array_node.parts) == nparts:
            arrays = self._raw_arrays(r, array_node)
            if arrays is not None:
                return torch.from_numpy(array_node.decode(arrays)).reshape(shape)
        # children belong to later stages only, so the recursion is at most one level per stage
        parts = [self.node(r, index + 1, f"{what}/{stage.name}[{i}]", depth + 1, stages) for i in range(nparts)]
        cost = stage.decode_cost(parts, meta, shape)
        self.budget.charge(cost.scratch_bytes, cost.work, what, stage.name)
        out = stage.decode(parts, meta, shape)
        if tuple(out.shape) != shape or out.dtype != torch.float32:
            raise CodecError(
                f"{what}: stage {stage.name!r} produced {tuple(out.shape)} {out.dtype}, expected {shape} float32"
            )
        return out

    def _raw_arrays(self, r: Reader, node: ArrayNode) -> list[np.ndarray] | None:
        """Read-only views of the raw 1-D parts ``node`` expects, charged as :meth:`_raw` charges them.

        None, with nothing read or charged, where the blob holds anything else or the charges go
        over the limits: the general path then reads the same bytes and raises, naming the part.
        """
        start, budget = r.pos, self.budget
        nbytes, work = node.cost.scratch_bytes, node.cost.work
        arrays = []
        for head, wire, count in _part_layout(node.parts):
            # the head as the encoder writes it (a varint written longer than it must be, which
            # the general path reads as the same shape, goes there)
            data = r.take_after(head, count * wire.itemsize) if count <= self.limits.max_elements else None
            if data is None:
                r.pos = start
                return None
            arrays.append(np.frombuffer(data, wire))
            nbytes += NODE_BYTES + count * wire.itemsize
            work += NODE_WORK + count
        if nbytes > budget.bytes_left or work > budget.work_left:
            r.pos = start
            return None
        budget.bytes_left -= nbytes
        budget.work_left -= work
        return arrays

    def _raw(self, r: Reader, what: str, depth: int) -> torch.Tensor:
        code = r.next_u8()
        if code < 0:
            r.u8(f"dtype of {what}")
        dtype = DTYPES.get(code)
        if dtype is None:
            raise CodecError(f"{what}: unknown dtype code {code}; expected one of {sorted(DTYPES)}")
        shape = self._shape(r, what, depth)
        n = numel(shape)
        size = itemsize(dtype)
        self.budget.charge(NODE_BYTES + n * size, NODE_WORK + n, what)
        data = r.take_or_none(n * size)
        if data is None:
            data = r.take(n * size, f"data of {what}")  # raises, with the message
        if dtype == torch.bool and n and int(np.frombuffer(data, np.uint8).max()) > 1:
            raise CodecError(f"{what}: bool data holds a byte other than 0 or 1")
        return tensor_from_bytes(data, dtype, shape)


@functools.lru_cache(maxsize=1024)
def _part_layout(parts: tuple[tuple[int, int], ...]) -> tuple[tuple[bytes, np.dtype[Any], int], ...]:
    """(raw node head, numpy dtype, count) of each part of an :class:`ArrayNode` layout."""
    return tuple((raw_node_head(code, (count,)), WIRE_NUMPY_DTYPES[code], count) for code, count in parts)


def read_header(blob: bytes | bytearray | memoryview) -> tuple[str, int, Reader]:
    """Check magic and version; return (spec, body length, reader positioned at the payload)."""
    if not isinstance(blob, (bytes, bytearray, memoryview)):
        raise CodecError(f"a blob must be bytes, found {type(blob).__name__}")
    r = Reader(blob)
    magic = bytes(r.take(len(MAGIC), "magic"))
    if magic != MAGIC:
        raise CodecError(f"not a fedsqueeze blob: magic is {magic!r}, expected {MAGIC!r}")
    version = r.u8("version")
    if version != VERSION:
        raise CodecError(f"unsupported wire format version {version}; this fedsqueeze reads version {VERSION}")
    try:
        spec = bytes(r.blob("codec spec", MAX_SPEC_LENGTH)).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError("codec spec in the header is not valid UTF-8") from None
    body_len = r.varint("body length")
    return spec, body_len, r


@functools.lru_cache(maxsize=256)
def _header_stages(spec: str) -> tuple[tuple[Stage, ...], tuple[Stage, ...]]:
    """(tensor stages, bytes stages) of a header's spec; parsed once per spec (stages are immutable)."""
    try:
        codec = Codec(parse_stages(spec))
    except ValueError as exc:  # parse errors; CodecError is a ValueError too
        raise CodecError(f"bad codec spec in the blob header ({spec[:100]!r}): {exc}") from None
    return codec.tensor_stages, tuple(codec._bytes_stages)


def _read_record(body: Reader, decoder: _Decoder, i: int, seen: Mapping[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
    try:
        name = bytes(body.blob(f"name of tensor {i}", MAX_NAME_LENGTH)).decode("utf-8")
    except UnicodeDecodeError:
        raise CodecError(f"name of tensor {i} is not valid UTF-8") from None
    if not name or name in seen:
        raise CodecError(f"tensor {i}: name {name!r} is empty or repeated")
    code = body.u8(f"dtype of {name!r}")
    if code not in DTYPES:
        raise CodecError(f"tensor {name!r}: unknown dtype code {code}; expected one of {sorted(DTYPES)}")
    dtype = DTYPES[code]
    t = decoder.node(body, 0, repr(name))
    if t.dtype != dtype:
        if t.dtype != torch.float32 or dtype not in FLOAT_DTYPES:
            raise CodecError(f"tensor {name!r}: record says {dtype} but carries {t.dtype}")
        decoder.budget.charge(t.numel() * itemsize(dtype), t.numel(), repr(name))
        t = t.to(dtype)
    return name, t


def decode(blob: bytes | bytearray | memoryview, *, limits: DecodeLimits | None = None) -> dict[str, torch.Tensor]:
    """Decode a blob made by :meth:`Codec.encode`; it describes its own codec.

    Memory and work are charged against ``limits`` before they are spent (see FORMAT.md,
    "Errors and limits"): the peak memory of a decode is bounded by a small multiple of the
    decoded tensors' size plus a constant, whatever the blob holds.

    Raises
    ------
    CodecError
        For any malformed, truncated, hostile or over-limit input, with a message saying what
        was wrong. No other exception type escapes for bad input.
    """
    limits = limits or DecodeLimits()
    spec, body_len, r = read_header(blob)
    tensor_stages, bytes_stages = _header_stages(spec)
    if body_len > limits.max_body_bytes:
        raise CodecError(
            f"body declares {body_len} bytes, over the limit of {limits.max_body_bytes} (DecodeLimits.max_body_bytes)"
        )
    payload: bytes | memoryview = r.take(r.remaining, "payload")
    for stage in reversed(bytes_stages):
        payload = stage.decode_bytes(payload, limits.max_body_bytes)
    if len(payload) != body_len:
        raise CodecError(f"body is {len(payload)} bytes, the header says {body_len}")
    body = Reader(payload, "body")
    count = body.varint("tensor count", limits.max_tensors)
    decoder = _Decoder(list(tensor_stages), limits)
    out: dict[str, torch.Tensor] = {}
    for i in range(count):
        name, t = _read_record(body, decoder, i, out)
        out[name] = t
    body.expect_end()
    return out


def parse(spec: str, *, seed: int | None = None) -> Codec:
    """Build a :class:`Codec` from spec text such as ``"topk(ratio=0.01) | quantize(bits=4) | zstd"``.

    Raises ``ValueError`` naming the stage, the parameter and what is allowed, and
    ``TypeError`` when ``spec`` is not a string.
    """
    if not isinstance(spec, str):
        raise TypeError(f"a codec spec must be a string such as 'topk | zstd', got {type(spec).__name__}")
    return Codec(spec, seed=seed)


def blob_spec(blob: bytes | bytearray | memoryview) -> str:
    """The codec spec a blob declares in its header (checks magic and version only)."""
    return read_header(blob)[0]


@dataclass(frozen=True)
class CompressionStats:
    """Size of a blob against the same tensors sent as raw FP32."""

    num_params: int
    blob_bytes: int
    fp32_bytes: int

    @property
    def ratio(self) -> float:
        """How many times smaller than FP32."""
        return self.fp32_bytes / self.blob_bytes

    @property
    def bits_per_param(self) -> float:
        return 8 * self.blob_bytes / max(self.num_params, 1)


def compression_stats(update: Mapping[str, TensorLike], blob: bytes) -> CompressionStats:
    """Ratio and bits per parameter of ``blob`` against ``update`` in FP32 (4 bytes per element)."""
    n = sum(int(np.prod(v.shape)) for v in update.values())
    return CompressionStats(num_params=n, blob_bytes=len(blob), fp32_bytes=4 * n)
