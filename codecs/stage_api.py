"""Everything a stage author needs, in one public module.

A new stage is one file in ``fedsqueeze/codecs/``: a frozen dataclass subclassing
:class:`Stage`, decorated with :func:`register_stage`. The package imports every module in its
folder, so the stage is then known to ``parse`` and ``decode`` and covered by the contract
tests. Sketch::

    from dataclasses import dataclass
    from typing import ClassVar

    import torch

    from fedsqueeze.codecs.stage_api import (
        EncodeContext, Encoded, EncodeFurther, Stage, check_param, expect_part, expect_parts, register_stage,
    )

    @register_stage
    @dataclass(frozen=True)
    class Scale(Stage):
        '''Math: ... Cost: ... Pays: ...'''

        name: ClassVar[str] = "scale"
        factor: float = 2.0

        def __post_init__(self) -> None:
            check_param(self.factor > 0, self.name, "factor", "a number > 0", self.factor)

        def encode(self, x: torch.Tensor, ctx: EncodeContext) -> Encoded | None:
            return Encoded([EncodeFurther(x / self.factor)])

        def decode(self, parts: list[torch.Tensor], meta: bytes, shape: tuple[int, ...]) -> torch.Tensor:
            expect_parts(self.name, parts, 1)
            expect_part(self.name, parts[0], "the values", dtype=torch.float32, shape=shape)
            return parts[0] * self.factor

Override :meth:`Stage.decode_cost` when decoding needs more than a few passes over the output
and parts, :meth:`Stage.check_state` when ``encode`` keeps state in ``ctx.state``, and
:meth:`Stage.encode_batch` when one pass over many small tensors beats a call per tensor (its
result must equal ``encode``'s bit for bit; ``tests/test_codecs_fused.py`` checks it), and
:meth:`Stage.array_node` when a node's parts are a few small raw arrays that numpy decodes
faster than one torch tensor each (its result must equal ``decode``'s bit for bit;
``tests/test_codecs_decode_fast.py`` checks it). A batch may also hand over its parts already
written as raw nodes (``Encoded.wire``), and a stage whose ``encode`` draws no random numbers
says so with :attr:`Stage.draws_random` (it is then handed seed 0); the contract tests check both.
"""

from ._errors import CodecError
from ._stage import (
    ArrayNode,
    DecodeCost,
    EncodeContext,
    Encoded,
    EncodeFurther,
    Part,
    Stage,
    as_numpy,
    check_param,
    expect,
    expect_part,
    expect_parts,
    is_int,
    is_number,
    param_error,
    parts_size,
    register_stage,
    registered_stages,
)

__all__ = [
    "ArrayNode",
    "CodecError",
    "DecodeCost",
    "EncodeContext",
    "EncodeFurther",
    "Encoded",
    "Part",
    "Stage",
    "as_numpy",
    "check_param",
    "expect",
    "expect_part",
    "expect_parts",
    "is_int",
    "is_number",
    "param_error",
    "parts_size",
    "register_stage",
    "registered_stages",
]
