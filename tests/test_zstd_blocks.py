"""zstd codes large records in blocks of their own: each gets its own literal tables."""

from __future__ import annotations

import pytest
import torch
import zstandard

from fedsqueeze.codecs import decode, parse
from fedsqueeze.codecs._basic import SPLIT_RECORD_BYTES, Zstd, _block_cuts


def mixed_update() -> dict[str, torch.Tensor]:
    """Two large tensors whose 8-bit codes have very different histograms, and two small ones."""
    g = torch.Generator().manual_seed(0)
    return {
        "narrow": torch.randn(40_000, generator=g) * torch.rand(40_000, generator=g).pow(8),  # codes near the middle
        "small.a": torch.randn(30, generator=g),
        "wide": torch.rand(40_000, generator=g),  # codes spread evenly
        "small.b": torch.randn(20, generator=g),
    }


def test_cuts_surround_only_the_large_records() -> None:
    starts = [1, 100, 100 + SPLIT_RECORD_BYTES, 200 + SPLIT_RECORD_BYTES]
    size = 300 + 2 * SPLIT_RECORD_BYTES
    # record 1 [100, 100+S) and record 3 [200+S, size) are large; size itself is not a cut
    assert _block_cuts(size, starts) == [100, 100 + SPLIT_RECORD_BYTES, 200 + SPLIT_RECORD_BYTES]
    assert _block_cuts(size, [1, 50, 90]) == [90]  # the last record runs to the end of the body
    assert _block_cuts(500, [1, 50, 90]) == []


def test_split_blocks_make_a_mixed_body_smaller_and_decode_the_same() -> None:
    update = mixed_update()
    codec = parse("quantize(bits=8) | zstd")
    blob = codec.encode(update)
    assert blob == codec.encode(update, fused=False)  # both paths split at the same records
    decoded = decode(blob)
    assert all(torch.equal(decoded[k], decode(codec.encode({k: update[k]}))[k]) for k in update)
    body = zstandard.ZstdDecompressor().decompress(blob[_payload_start(blob) :])
    one_block = Zstd().encode_bytes(body)
    assert len(blob) - _payload_start(blob) < 0.97 * len(one_block)


def test_bodies_of_small_records_are_coded_as_one_block() -> None:
    update = {f"t{i}": torch.randn(300) for i in range(5)}  # 300 one-byte codes per record: no cut
    codec = parse("quantize(bits=8) | zstd")
    blob = codec.encode(update)
    body = zstandard.ZstdDecompressor().decompress(blob[_payload_start(blob) :])
    assert blob[_payload_start(blob) :] == Zstd().encode_bytes(body)


def _payload_start(blob: bytes) -> int:
    from fedsqueeze.codecs._pipeline import read_header

    return read_header(blob)[2].pos


def test_bodies_over_the_split_limit_use_the_one_shot_call(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsqueeze.codecs import _basic

    monkeypatch.setattr(_basic, "SPLIT_MAX_BODY", 1000)  # the mixed update's body is ~80 kB
    codec = parse("quantize(bits=8) | zstd")
    blob = codec.encode(mixed_update())
    body = zstandard.ZstdDecompressor().decompress(blob[_payload_start(blob) :])
    assert blob[_payload_start(blob) :] == Zstd().encode_bytes(body)
