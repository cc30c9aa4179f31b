"""Composable codecs for model updates: low rank, sparsification, quantization, zstd, error feedback.

Build a codec from a spec string or from stage objects, encode an update (names -> tensors)
into a self-describing blob, decode it anywhere with :func:`decode`::

    from fedsqueeze.codecs import parse, decode, ErrorFeedback
    codec = parse("topk(ratio=0.01) | quantize(bits=8) | zstd")
    blob = ErrorFeedback(codec).encode(update)
    restored = decode(blob)

New stages are one file in this folder (see :mod:`fedsqueeze.codecs.stage_api`): every module
here is imported below, which registers the stages it defines.

This package imports only the standard library, numpy, torch and zstandard.
"""

import importlib
import pkgutil

from ._basic import BF16, FP16, Identity, Zstd
from ._budget import Budget, BudgetMissWarning
from ._errors import CodecError
from ._feedback import ErrorFeedback
from ._lowrank import CP, SVD, PowerSGD, Tucker
from ._pipeline import Codec, CompressionStats, DecodeLimits, blob_spec, compression_stats, decode, parse
from ._quant import Quantize, Sign, Ternary
from ._sparse import RandomK, Threshold, TopK
from .stage_api import (
    DecodeCost,
    EncodeContext,
    Encoded,
    EncodeFurther,
    Stage,
    check_param,
    expect,
    expect_part,
    expect_parts,
    is_int,
    is_number,
    register_stage,
    registered_stages,
)

# Last, once every name above exists (a module may import them back): every module in this
# folder, so that a stage file dropped here registers itself without an edit to this list.
for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "BF16",
    "CP",
    "FP16",
    "SVD",
    "Budget",
    "BudgetMissWarning",
    "Codec",
    "CodecError",
    "CompressionStats",
    "DecodeCost",
    "DecodeLimits",
    "EncodeContext",
    "EncodeFurther",
    "Encoded",
    "ErrorFeedback",
    "Identity",
    "PowerSGD",
    "Quantize",
    "RandomK",
    "Sign",
    "Stage",
    "Ternary",
    "Threshold",
    "TopK",
    "Tucker",
    "Zstd",
    "blob_spec",
    "check_param",
    "compression_stats",
    "decode",
    "expect",
    "expect_part",
    "expect_parts",
    "is_int",
    "is_number",
    "parse",
    "register_stage",
    "registered_stages",
]
