"""Composable codecs for model updates: low rank, sparsification, quantization, zstd, error feedback.

Build a codec from a spec string or from stage objects, encode an update (names -> tensors)
into a self-describing blob, decode it anywhere with :func:`decode`::

    from fedsqueeze.codecs import parse, decode, ErrorFeedback
    codec = parse("topk(ratio=0.01) | quantize(bits=8) | zstd(level=3)")
    blob = ErrorFeedback(codec).encode(update)
    restored = decode(blob)

This package imports only the standard library, numpy, torch and zstandard.
"""

from ._basic import BF16, FP16, Identity, Zstd
from ._errors import CodecError
from ._feedback import ErrorFeedback
from ._lowrank import CP, SVD, PowerSGD, Tucker
from ._pipeline import Codec, CompressionStats, DecodeLimits, blob_spec, compression_stats, decode, parse
from ._quant import Quantize, Sign, Ternary
from ._sparse import RandomK, Threshold, TopK
from ._stage import EncodeContext, Encoded, Open, Stage, register_stage, registered_stages

__all__ = [
    "BF16",
    "CP",
    "SVD",
    "Codec",
    "CodecError",
    "CompressionStats",
    "DecodeLimits",
    "EncodeContext",
    "Encoded",
    "ErrorFeedback",
    "FP16",
    "Identity",
    "Open",
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
    "compression_stats",
    "decode",
    "parse",
    "register_stage",
    "registered_stages",
]
