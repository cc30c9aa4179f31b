"""The stage contract (encode/decode of one elementary transform) and the stage registry."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import numpy as np
import torch

from ._errors import CodecError

if TYPE_CHECKING:
    from ._pipeline import Codec


@dataclass
class EncodeFurther:
    """Marks a part that the later stages of the pipeline encode further.

    A stage wraps the values it keeps (top-k values, low-rank factors) in ``EncodeFurther`` so
    that, in ``topk | quantize``, the kept values are quantized. Parts returned as plain
    tensors (codes, indices, scales) are stored as they are.

    Attributes
    ----------
    tensor : torch.Tensor
        The part; it is converted to float32 before the next stage sees it, and on decode the
        stage gets it back as float32 of the same shape.
    """

    tensor: torch.Tensor


Part = EncodeFurther | torch.Tensor
"""A part of a stage's output: :class:`EncodeFurther` (encoded on by later stages) or a tensor stored as is."""


@dataclass
class Encoded:
    """What a tensor stage produces for one tensor.

    Attributes
    ----------
    parts : list[EncodeFurther | torch.Tensor]
        At most 16 parts, in the order :meth:`Stage.decode` receives them back.
    meta : bytes
        A stage-specific header of at most 4096 bytes (e.g. ``k`` and the index coding),
        handed back to :meth:`Stage.decode` unchanged (default: empty).
    decoded : torch.Tensor | None
        Optional: what :meth:`Stage.decode` returns for these parts and ``meta``, bit for bit,
        when the stage has it at hand for less than decoding costs (``quantize``'s batch). Only
        for parts that no later stage encodes further. Error feedback then takes it instead of
        decoding (default: None).
    wire : bytes | None
        Optional: ``parts`` as they go on the wire, one raw node after the other (tag 0, dtype
        code, shape, little-endian data; ``FORMAT.md``), when a stage's batch has them at hand
        for less than the encoder's walk costs (``quantize``'s: ~40 parts per LeNet-5 update).
        Only when every part is stored as is; its float parts must be finite, as the encoder
        does not check them again. The fused encoder writes it instead of ``parts`` (default: None).
    """

    parts: list[Part]
    meta: bytes = b""
    decoded: torch.Tensor | None = None
    wire: bytes | None = None


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


@dataclass(frozen=True)
class ArrayNode:
    """A node whose parts are all raw 1-D arrays, decoded without a torch tensor per part.

    The decoder's fast path for built-in stages (:meth:`Stage.array_node`): when the parts in the
    blob are exactly ``parts``, it reads them as numpy views of the body, charges ``cost`` and
    calls ``decode``. Anything else (another layout, a hostile one) takes the general path, which
    checks each part and says what was wrong.

    Attributes
    ----------
    parts : tuple[tuple[int, int], ...]
        (wire dtype code, element count) of each part, as :meth:`Stage.encode` writes them.
    cost : DecodeCost
        What :meth:`Stage.decode_cost` charges for such a node.
    decode : Callable[[list[np.ndarray]], np.ndarray]
        The float32 values of the node, flat, from read-only views of the parts.
    """

    parts: tuple[tuple[int, int], ...]
    cost: DecodeCost
    decode: Callable[[list[np.ndarray]], np.ndarray]


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
        random numbers; 0 for a stage whose :attr:`Stage.draws_random` is False.
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
        """A CPU generator seeded with :attr:`seed`."""
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
        """Encode one tensor, or decline it.

        Parameters
        ----------
        x : torch.Tensor
            A contiguous float32 tensor with at least one element, all finite.
        ctx : EncodeContext
            The tensor's name, this stage's state for it, and a seed for random draws.

        Returns
        -------
        Encoded | None
            The parts and header, or ``None`` to leave ``x`` to the next stage (or to be sent
            raw), e.g. when factoring would not make it smaller. Float parts must be finite;
            the codec refuses the update with a ``ValueError`` otherwise.
        """
        raise NotImplementedError

    @property
    def draws_random(self) -> bool:
        """Whether :meth:`encode` uses ``ctx.seed`` (or ``ctx.generator()``), e.g. for a random projection.

        When False the encoder hands the stage seed 0 instead of hashing one per tensor (~1.5 us each,
        ~2 % of a LeNet-5 encode for ``quantize``). The default, True, fits any stage; the contract
        tests check that a stage saying False encodes the same with any seed.
        """
        return True

    def encode_batch(self, xs: Sequence[torch.Tensor], ctxs: Sequence[EncodeContext]) -> list[Encoded | None]:
        """Encode several tensors at once, as the fused encoder hands a stage every tensor that reaches it.

        The result must equal ``[self.encode(x, ctx) for x, ctx in zip(xs, ctxs)]`` bit for bit
        (the tests check it for every registered stage); the default is that loop. A stage
        overrides it where one pass over many small tensors is cheaper than a call per tensor.
        Contexts of tensors with the same name share one ``state`` dict, as in the loop.
        """
        return [self.encode(x, ctx) for x, ctx in zip(xs, ctxs, strict=True)]

    def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
        """Rebuild the tensor from its decoded parts.

        Parameters
        ----------
        parts : list[torch.Tensor]
            The parts as read from the blob: :class:`EncodeFurther` parts come back as float32
            of the shape they were encoded with, plain ones in their own dtype and shape. They
            come from untrusted input: check their count, dtypes and shapes (see
            :func:`expect_parts`, :func:`expect_part`).
        meta : bytes
            The header :meth:`encode` wrote, unchecked.
        shape : tuple[int, ...]
            The shape to rebuild; it has at least one element.

        Returns
        -------
        torch.Tensor
            A float32 tensor of ``shape``.

        Raises
        ------
        CodecError
            For parts or a header that this stage cannot have written. Nothing else may
            escape: the decoder does not catch other exceptions.
        """
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

    def array_node(self, meta: bytes, shape: tuple[int, ...]) -> ArrayNode | None:
        """How a node of this stage with ``meta`` and ``shape`` decodes from raw 1-D parts, or None.

        An optional fast path for stages whose parts are small raw arrays (``quantize``): a
        LeNet-5 blob has ~40 such parts, and a torch tensor per part costs more than the
        arithmetic. The result must decode exactly as :meth:`decode` does. Return None for
        a ``meta`` or ``shape`` this stage cannot have written (the general path then raises).
        The default, None, always takes :meth:`decode`.
        """
        return None

    def check_state(self, entry: str, value: torch.Tensor) -> None:
        """Validate one entry of this stage's per-tensor state before it is loaded.

        Stages without state (the default) accept none. Raise ``ValueError`` naming the entry,
        what was expected and what was found.
        """
        raise ValueError(f"stage {self.name!r} keeps no state, found an entry {entry!r}")

    # --- rate allocation (see the ``budget`` stage) ------------------------------------------
    allocates: ClassVar[bool] = False
    """True for a leading stage that plans the whole update (``budget``): ``Codec.encode`` calls
    :meth:`encode_update` instead of encoding tensor by tensor."""

    def encode_update(self, codec: Codec, records: list[tuple[str, torch.Tensor]]) -> bytes:
        """Encode a whole update as the first stage of ``codec`` (allocating stages only)."""
        raise NotImplementedError

    def stages_for_parts(self, meta: bytes, stages: Sequence[Stage | None], index: int) -> Sequence[Stage | None]:
        """The tensor stages that decode the parts of this stage's node (``index`` is its position).

        The default keeps them. An allocating stage returns them with the per-tensor settings its
        ``meta`` records; raise :class:`CodecError` for a ``meta`` it cannot have written.
        """
        return stages

    def budget_code(self) -> int:
        """One byte (1..255) that, with the spec, lets :meth:`with_budget_code` rebuild this stage's
        decoding parameters, when a ``budget`` stage has set them for one tensor (default: 1, none)."""
        return 1

    def with_budget_code(self, code: int) -> Stage:
        """This stage with the decoding parameters that :meth:`budget_code` wrote as ``code``.

        Raises :class:`CodecError` for a code this stage cannot have written.
        """
        if code != 1:
            raise CodecError(f"stage {self.name!r}: budget code must be 1, found {code}")
        return self

    # --- bytes stages ----------------------------------------------------------------------
    def encode_bytes(self, data: bytes) -> bytes:
        """Encode the whole serialized body (bytes stages only, e.g. entropy coding).

        Parameters
        ----------
        data : bytes
            The body, or the output of the previous bytes stage.

        Returns
        -------
        bytes
            What :meth:`decode_bytes` turns back into ``data`` exactly.
        """
        raise NotImplementedError

    def encode_bytes_split(self, data: bytes, starts: Sequence[int]) -> bytes:
        """:meth:`encode_bytes`, told where the body's tensor records begin (ascending offsets into ``data``).

        A stage may code records of different statistics apart (``zstd`` starts a new block
        around each large one); the output must still be what :meth:`decode_bytes` reads. The
        default ignores ``starts``. Only the first bytes stage is told.
        """
        return self.encode_bytes(data)

    def decode_bytes(self, data: bytes | memoryview, max_size: int) -> bytes:
        """Undo :meth:`encode_bytes` on untrusted input without exceeding ``max_size``.

        Parameters
        ----------
        data : bytes | memoryview
            Everything after the blob header; trailing bytes are an error.
        max_size : int
            The most bytes the result may have (``DecodeLimits.max_body_bytes``); check it
            before decompressing.

        Returns
        -------
        bytes
            The decoded body.

        Raises
        ------
        CodecError
            For corrupt, truncated or over-long input, or a result over ``max_size``. Nothing
            else may escape.
        """
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
    """Raise ``ValueError`` "stage S: parameter P must be <allowed>, got <got>" unless ``ok``.

    Call it from a stage's ``__post_init__`` for every parameter, so that ``parse`` reports bad
    specs (and blob headers) clearly.
    """
    if not ok:
        raise param_error(stage, param, allowed, got)


def is_int(value: Any) -> bool:
    """True for an ``int`` that is not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """True for a finite ``int`` or ``float`` that is not a ``bool``."""
    return (is_int(value) or isinstance(value, float)) and math.isfinite(value)


def expect(ok: bool, stage: str, what: str) -> None:
    """Raise CodecError for an inconsistent encoded tensor when ``ok`` is false."""
    if not ok:
        raise CodecError(f"stage {stage!r}: {what}")


def expect_parts(stage: str, parts: Sequence[torch.Tensor], count: int) -> None:
    """Raise CodecError unless there are exactly ``count`` parts."""
    if len(parts) != count:  # the message is formatted only when it is raised: decoding calls this per node
        expect(False, stage, f"expected {count} parts, found {len(parts)}")


def expect_part(
    stage: str,
    part: torch.Tensor,
    what: str,
    *,
    dtype: torch.dtype | None = None,
    shape: tuple[int, ...] | None = None,
    numel: int | None = None,
) -> None:
    """Raise CodecError unless ``part`` has the given dtype, shape and element count (each if given)."""
    # each message is formatted only when it is raised: decoding checks every part of every node
    if dtype is not None and part.dtype != dtype:
        expect(False, stage, f"{what} must be {dtype}, found {part.dtype}")
    if shape is not None and part.shape != shape:
        expect(False, stage, f"{what} must have shape {shape}, found {tuple(part.shape)}")
    if numel is not None and part.numel() != numel:
        expect(False, stage, f"{what} must have {numel} elements, found {part.numel()}")


def flat(t: torch.Tensor) -> torch.Tensor:
    """``t.reshape(-1)``, without the call for a tensor already 1-D (a torch call costs ~1 us; encodes make dozens)."""
    return t if t.dim() == 1 else t.reshape(-1)


def as_float32(t: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous float32: ``t`` itself when it already is, without a torch call."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.to(torch.float32).contiguous()


def as_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy view of a CPU tensor (a copy only if it is not contiguous)."""
    return t.numpy() if t.is_contiguous() and not t.requires_grad else t.detach().contiguous().numpy()
