"""The stage contract (encode/decode of one elementary transform) and the stage registry."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
import torch

from ._errors import CodecError

if TYPE_CHECKING:
    from ._pipeline import Codec


@dataclass
class Open:
    """A float32 part that later stages of the pipeline may encode further (e.g. top-k values)."""

    tensor: torch.Tensor


Part = Open | torch.Tensor
"""A part of a stage's output: :class:`Open` (encoded on by later stages) or a tensor stored as is."""


@dataclass
class Encoded:
    """What a tensor stage produces for one tensor: a small stage-specific header and its parts."""

    parts: list[Part]
    meta: bytes = b""


@dataclass(frozen=True)
class DecodeCost:
    """What one :meth:`Stage.decode` call needs beyond its decoded parts, declared before it runs.

    Attributes
    ----------
    scratch_bytes : int
        Upper bound on the bytes the call allocates, its float32 output included.
    work : int
        Upper bound on the elementary operations (multiply-adds, element visits) it performs.
    """

    scratch_bytes: int
    work: int


def parts_size(parts: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(bytes, elements) of ``parts`` together."""
    return sum(p.numel() * p.element_size() for p in parts), sum(p.numel() for p in parts)


@dataclass
class EncodeContext:
    """Per-tensor context given to :meth:`Stage.encode`.

    Attributes
    ----------
    name : str
        The tensor's name in the update.
    state : dict[str, torch.Tensor]
        Mutable state of this stage for this tensor, kept across encodes (e.g. PowerSGD's warm
        start); saved by ``Codec.state_dict()``.
    seed : int
        A 63-bit seed, different for every (encode call, stage, tensor), for stages that draw
        random numbers.
    call : int
        How many encodes the codec made before this one.
    """

    name: str
    state: dict[str, torch.Tensor]
    seed: int
    call: int = 0

    def derive_seed(self, base: int) -> int:
        """A 63-bit seed from a stage's own ``base`` seed, this call and this tensor."""
        digest = hashlib.blake2b(f"{base}/{self.call}/{self.name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little") >> 1

    def generator(self) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(self.seed)
        return gen


@dataclass(frozen=True)
class Stage:
    """Base class of codec stages. Subclasses are frozen dataclasses whose fields are parameters.

    A *tensor* stage maps one float32 tensor to :class:`Encoded` parts (or returns ``None`` to
    leave the tensor to the next stage, e.g. when factoring would not make it smaller) and
    back. A *bytes* stage (entropy coding) maps the whole serialized body to bytes and back
    and must come after all tensor stages.
    """

    name: ClassVar[str]
    kind: ClassVar[Literal["tensor", "bytes"]] = "tensor"
    lossless: ClassVar[bool] = False
    """True when decode(encode(x)) == x exactly for float32 input."""
    passthrough: ClassVar[bool] = False
    """True for stages that never take a tensor (``identity``): values travel in their own dtype."""

    # --- tensor stages -------------------------------------------------------------------
    def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
        raise NotImplementedError

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild a float32 tensor of ``shape`` from decoded parts; raise CodecError if inconsistent."""
        raise NotImplementedError

    def decode_cost(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> DecodeCost:
        """Bound the memory and work of :meth:`decode` on these inputs, before it runs.

        The decoder charges the result against :class:`DecodeLimits` and refuses the blob when it
        does not fit, so that hostile parts cannot make ``decode`` allocate or compute without
        bound. The default fits stages that touch each element a few times: twice the bytes of
        the output and the parts, and one operation per element. Stages whose decode does more
        (matrix products, large index arrays) override it; a bound that is too low is a bug.
        Raise :class:`CodecError` here for parts whose sizes are inconsistent with ``shape``.
        """
        part_bytes, part_elements = parts_size(parts)
        n = math.prod(shape)
        return DecodeCost(scratch_bytes=2 * (4 * n + part_bytes), work=n + part_elements)

    def check_state(self, entry: str, value: torch.Tensor) -> None:
        """Validate one entry of this stage's per-tensor state before it is loaded.

        Stages without state (the default) accept none. Raise ``ValueError`` naming the entry,
        what was expected and what was found.
        """
        raise ValueError(f"stage {self.name!r} keeps no state, found an entry {entry!r}")

    # --- bytes stages ----------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> bytes:
        raise NotImplementedError

    def decode_bytes(self, data: bytes | memoryview, max_size: int) -> bytes:
        raise NotImplementedError

    # --- composition ---------------------------------------------------------------------
    def __or__(self, other: Stage | Codec) -> Codec:
        from ._pipeline import Codec

        return Codec([self]) | other

    @property
    def spec(self) -> str:
        """This stage as spec text; parameters left at their default are omitted."""
        args = []
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.default is not dataclasses.MISSING and value == f.default and type(value) is type(f.default):
                continue
            args.append(f"{f.name}={format_value(value)}")
        return f"{self.name}({','.join(args)})" if args else self.name


def format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value + '"'
    if isinstance(value, tuple):
        return "(" + ",".join(format_value(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# ------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------
_REGISTRY: dict[str, type[Stage]] = {}
S = TypeVar("S", bound=type[Stage])


def register_stage(cls: S) -> S:
    """Class decorator that makes a stage available to ``parse`` and ``decode`` by its ``name``.

    A new stage is one file: a frozen dataclass subclassing :class:`Stage`, decorated with
    ``@register_stage``, imported once (e.g. from the package ``__init__``). The contract tests
    run over every registered stage.
    """
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"stage class {cls.__name__} needs a lowercase identifier `name`, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name] is not cls:
        raise ValueError(f"a stage named {name!r} is already registered ({_REGISTRY[name].__name__})")
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"stage class {cls.__name__} must be a dataclass")
    _REGISTRY[name] = cls
    return cls


def registered_stages() -> dict[str, type[Stage]]:
    """A copy of the registry: stage name -> stage class."""
    return dict(_REGISTRY)


def stage_class(name: str) -> type[Stage]:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown stage {name!r}; known stages: {', '.join(sorted(_REGISTRY))}") from None


# ------------------------------------------------------------------------------------------
# Helpers for stage authors
# ------------------------------------------------------------------------------------------
def param_error(stage: str, param: str, allowed: str, got: Any) -> ValueError:
    """The uniform error for a bad stage parameter."""
    return ValueError(f"stage {stage!r}: parameter {param!r} must be {allowed}, got {got!r}")


def check_param(ok: bool, stage: str, param: str, allowed: str, got: Any) -> None:
    if not ok:
        raise param_error(stage, param, allowed, got)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def expect(ok: bool, stage: str, what: str) -> None:
    """Raise CodecError for an inconsistent encoded tensor when ``ok`` is false."""
    if not ok:
        raise CodecError(f"stage {stage!r}: {what}")


def expect_parts(stage: str, parts: Sequence[torch.Tensor], count: int) -> None:
    expect(len(parts) == count, stage, f"expected {count} parts, found {len(parts)}")


def expect_part(
    stage: str,
    part: torch.Tensor,
    what: str,
    *,
    dtype: torch.dtype | None = None,
    shape: tuple[int, ...] | None = None,
    numel: int | None = None,
) -> None:
    if dtype is not None:
        expect(part.dtype == dtype, stage, f"{what} must be {dtype}, found {part.dtype}")
    if shape is not None:
        expect(tuple(part.shape) == shape, stage, f"{what} must have shape {shape}, found {tuple(part.shape)}")
    if numel is not None:
        expect(part.numel() == numel, stage, f"{what} must have {numel} elements, found {part.numel()}")


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.detach().contiguous().numpy()

