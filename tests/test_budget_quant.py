"""Quantization at <= 4 bits is safe on heavy-tailed tensors by default (per-block ranges), old behaviour on request."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedsqueeze.codecs import CodecError, Quantize, decode, parse
from fedsqueeze.codecs._pipeline import read_header


def heavy_tailed(n: int = 20_000, seed: int = 0) -> torch.Tensor:
    """Student-t (2.5 degrees of freedom) values: a few outliers set a tensor-wide range."""
    return torch.from_numpy(np.random.default_rng(seed).standard_t(2.5, size=n).astype(np.float32))


def rel_error(x: torch.Tensor, spec: str) -> float:
    y = decode(parse(spec).encode({"x": x}))["x"]
    return float((y - x).norm() / x.norm())


@pytest.mark.parametrize("bits", [2, 4])
def test_small_widths_use_blocks_by_default_and_cut_the_error(bits: int) -> None:
    x = heavy_tailed()
    blocked = rel_error(x, f"quantize(bits={bits})")
    single = rel_error(x, f"quantize(bits={bits}, outlier_block=0)")
    assert blocked < single / 2, (blocked, single)


def test_outlier_block_zero_is_the_single_range_quantizer() -> None:
    x = heavy_tailed(5000, seed=1)
    y = decode(parse("quantize(bits=4, outlier_block=0)").encode({"x": x}))["x"]
    lo, hi = float(x.min()), float(x.max())
    step = np.float32((np.float64(hi) - np.float64(lo)) / 15)
    expected = torch.clamp(torch.round((x - lo) * (1 / step)), 0, 15) * step + lo
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)


def test_eight_bits_and_other_granularities_are_unchanged() -> None:
    x = heavy_tailed(3000, seed=2)
    for spec in ("quantize(bits=8)", "quantize(bits=4, granularity=channel)", "quantize(bits=4, granularity=64)"):
        old = parse(spec.replace(")", ", outlier_block=0)"))
        assert old.encode({"x": x})[len(old.spec) + 7 :] == parse(spec).encode({"x": x})[len(parse(spec).spec) + 7 :]


def test_small_tensors_keep_one_range() -> None:
    x = heavy_tailed(200, seed=3)  # fewer values than one block
    assert rel_error(x, "quantize(bits=4)") == rel_error(x, "quantize(bits=4, outlier_block=0)")


def test_spec_round_trips_and_checks_the_block() -> None:
    codec = parse("quantize(bits=4, outlier_block=0) | zstd")
    assert parse(codec.spec) == codec and "outlier_block=0" in codec.spec
    assert parse("quantize(bits=4)").spec == "quantize(bits=4)"
    with pytest.raises(ValueError, match="outlier_block"):
        Quantize(outlier_block=4)


def _header_offset(body: bytes) -> int:
    """Offset of the quantize node's header length in the body of a one-tensor blob named "x" of 1-D shape."""
    at = body.index(b"x") + 2  # name, dtype code
    assert body[at] == 1  # tag of stage 0
    at += 2  # tag, ndim
    while body[at] & 0x80:
        at += 1
    return at + 1


def test_hostile_block_headers_are_refused() -> None:
    blob = parse("quantize(bits=4)").encode({"x": heavy_tailed(1000)})
    start = read_header(blob)[2].pos
    body = bytearray(blob[start:])
    at = _header_offset(bytes(body))
    assert body[at] == 3 and body[at + 1] == 1  # header: kind 1, block 256 as a two-byte varint
    for kind, block, match in (
        (2, b"\x80\x02", "unknown header"),
        (1, b"\xe8\x07", "block size"),
        (1, b"\x04\x00", "trailing"),
    ):
        bad = bytearray(body)
        bad[at + 1] = kind
        bad[at + 2 : at + 4] = block
        with pytest.raises(CodecError, match=match):
            decode(blob[:start] + bytes(bad))


@pytest.mark.parametrize(
    "spec", ["quantize", "quantize(granularity=64)", "quantize(outlier_block=0)", "quantize(granularity='channel')"]
)
def test_group_bytes_many_matches_group_bytes(spec: str) -> None:
    # the planner's vectorized range bytes must price a top-k run exactly as the scalar rule does
    from fedsqueeze.codecs._budget import group_bytes, group_bytes_many

    stage = parse(f"{spec} | zstd").stages[0]
    counts = np.array([1, 7, 8, 63, 64, 65, 255, 256, 257, 1000, 5000])
    for bits in (0, 2, 4, 8):
        expected = [group_bytes(stage, bits, int(c), (int(c),)) for c in counts]
        assert group_bytes_many(stage, bits, counts).tolist() == expected


def test_code_entropy_of_every_width_from_one_8_bit_pass() -> None:
    # the planner derives the 2- and 4-bit code runs from the 8-bit ones; check against a direct histogram
    from fedsqueeze.codecs._allocate import _code_bits
    from fedsqueeze.codecs._budget import k_grid

    x = np.random.default_rng(5).standard_t(3, 3000)
    mags = np.sort(np.abs(x))[::-1].copy()
    spread = float(x.max() - x.min())
    ks = k_grid(x.size)
    got = _code_bits(mags, spread, (2, 4, 8), ks)
    for bits in (2, 4, 8):
        levels = (1 << bits) - 1
        codes = np.minimum(mags / (spread / levels), levels).astype(np.int64)
        for j, k in enumerate(ks.tolist()):
            p = np.bincount(codes[:k]) / k
            p = p[p > 0]
            assert got[bits][j] == pytest.approx(min(bits, 1.0 - float((p * np.log2(p)).sum())), abs=1e-9)


@pytest.mark.parametrize(
    "spec", ["quantize(bits={})", "quantize(bits={}, granularity=64)", "quantize(bits={}, granularity='channel')"]
)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_planner_rounding_error_matches_the_quantizer(spec: str, bits: int) -> None:
    # the dense widths are priced by the planner's own rounding, not by trial encodes: it must match the stage
    from fedsqueeze.codecs._allocate import _rounding
    from fedsqueeze.codecs._stage import EncodeContext

    x = torch.from_numpy(np.random.default_rng(bits).standard_t(3, (30, 70)).astype(np.float32))
    stage = parse(spec.format(bits)).stages[0]
    assert isinstance(stage, Quantize)
    encoded = stage.encode(x, EncodeContext("w", {}, 0))
    assert encoded is not None
    parts = [p for p in encoded.parts if isinstance(p, torch.Tensor)]
    restored = stage.decode(parts, encoded.meta, tuple(x.shape))
    expected = float((restored.double() - x.double()).pow(2).sum())
    values = x.reshape(-1).double().numpy()
    err, counts = _rounding(values, tuple(x.shape), stage, [bits])[bits]
    assert err == pytest.approx(expected, rel=1e-3)
    assert counts.sum() == x.numel() and counts.size == (1 << bits)
