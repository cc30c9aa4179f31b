"""Bad specs and hostile blobs: clear ValueErrors for specs, CodecError (only) for blobs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import CodecError, DecodeLimits, blob_spec, decode, parse


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread while these tests run (the machine is shared), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SPECS = [
    "identity",
    "fp16",
    "topk(ratio=0.1) | quantize(bits=8) | zstd",
    "topk(ratio=0.2) | ternary",
    "randomk(ratio=0.1, seed=1) | quantize(bits=4)",
    "svd(rank=2) | quantize(bits=2, granularity=8)",
    "powersgd(rank=1) | sign",
    "tucker(ranks=2) | bf16 | zstd",
    "cp(rank=2, iters=3)",
    "threshold(value=0.5) | quantize(bits=1, stochastic=true)",
]
UPDATE = {
    "conv": torch.randn(8, 4, 3, 3, generator=torch.Generator().manual_seed(0)),
    "fc": torch.randn(20, 30, generator=torch.Generator().manual_seed(1)),
    "bias": torch.randn(20, generator=torch.Generator().manual_seed(2)),
    "steps": torch.tensor([3], dtype=torch.int64),
}
BLOBS = [parse(spec, seed=0).encode(UPDATE) for spec in SPECS]
SMALL = DecodeLimits(max_elements=10**6, max_body_bytes=10**7)


def decode_or_codec_error(blob: bytes) -> None:
    """Decoding either succeeds with tensors or raises CodecError; nothing else."""
    try:
        out = decode(blob, limits=SMALL)
    except CodecError as exc:
        assert str(exc)
        return
    assert all(isinstance(v, torch.Tensor) for v in out.values())


# --------------------------------------------------------------------------- specs
@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("topk(ratio=2)", ["topk", "ratio", "(0, 1]"]),
        ("quantize(bits=3)", ["quantize", "bits", "1, 2, 4, 8"]),
        ("quantize(granularity=row)", ["quantize", "granularity", "channel"]),
        ("quantize(bitz=4)", ["quantize", "bitz", "allowed", "bits"]),
        ("nosuch", ["unknown stage", "nosuch", "topk"]),
        ("topk(0.1)", ["topk", "key=value"]),
        ("topk(ratio=__import__('os'))", ["topk", "ratio", "literal"]),
        ("zstd | topk", ["topk", "zstd", "last"]),
        ("topk ||  zstd", ["empty stage"]),
        ("svd(rank=0)", ["svd", "rank"]),
        ("zstd(level=99)", ["zstd", "level", "1..22"]),
        ("topk(ratio=0.1, ratio=0.2)", ["twice"]),
        ("x" * 2000, ["characters"]),
    ],
)
def test_bad_specs_name_stage_parameter_and_what_is_allowed(spec: str, words: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        parse(spec)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_spec_values_are_literals_not_code() -> None:
    # a function call inside a parameter is rejected, never evaluated
    with pytest.raises(ValueError, match="literal"):
        parse("quantize(bits=int('4'))")
    assert parse("quantize(bits=4, granularity=channel)") == parse('quantize(bits=4, granularity="channel")')
    assert parse("quantize(stochastic=true)").stages[0].stochastic is True


# --------------------------------------------------------------------------- blobs
@pytest.mark.parametrize("blob", BLOBS, ids=SPECS)
def test_every_truncation_raises_codec_error(blob: bytes) -> None:
    decode(blob)  # the whole blob is fine
    for cut in range(len(blob)):
        with pytest.raises(CodecError):
            decode(blob[:cut])


def test_trailing_bytes_are_rejected() -> None:
    with pytest.raises(CodecError, match="trailing|header says"):
        decode(BLOBS[0] + b"\x00")


def test_wrong_magic_version_and_type() -> None:
    with pytest.raises(CodecError, match="magic"):
        decode(b"PK\x03\x04" + BLOBS[0][4:])
    with pytest.raises(CodecError, match="version"):
        decode(BLOBS[0][:4] + b"\x63" + BLOBS[0][5:])
    with pytest.raises(CodecError, match="bytes"):
        decode("not bytes")  # type: ignore[arg-type]
    assert isinstance(CodecError("x"), ValueError)


def _blob(spec: str, body: bytes) -> bytes:
    def varint(n: int) -> bytes:
        out = bytearray()
        while True:
            out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
            n >>= 7
            if not n:
                return bytes(out)

    return b"FSQZ\x01" + varint(len(spec)) + spec.encode() + varint(len(body)) + body


def test_hostile_shapes_are_refused_before_allocating() -> None:
    # one raw float32 tensor claiming 2**40 elements
    body = b"\x01" + b"\x01w" + b"\x01" + b"\x00\x01\x02" + b"\x80\x80\x80\x80\x80\x20"
    with pytest.raises(CodecError, match="limit"):
        decode(_blob("identity", body))
    # a topk node that claims a huge dense output with a tiny payload
    body = b"\x01\x01w\x01" + b"\x01\x01" + b"\xff\xff\xff\xff\x0f"
    with pytest.raises(CodecError, match="limit"):
        decode(_blob("topk", body))


def test_zstd_bomb_is_refused() -> None:
    bomb = zstandard.ZstdCompressor().compress(b"\x00" * 50_000_000)
    blob = _blob("zstd", b"")[:-1] + b"\x80\xe1\xeb\x17" + bomb  # body length 50e6
    with pytest.raises(CodecError, match="limit"):
        decode(blob, limits=DecodeLimits(max_body_bytes=10**6))


def test_bad_spec_in_header_is_a_codec_error() -> None:
    with pytest.raises(CodecError, match="spec"):
        decode(_blob("quantize(bits=3)", b"\x00"))
    with pytest.raises(CodecError, match="spec"):
        decode(_blob("evil(x=1)", b"\x00"))
    assert blob_spec(BLOBS[2]) == parse(SPECS[2]).spec


def test_non_finite_and_unsupported_updates_are_rejected_at_encode() -> None:
    with pytest.raises(ValueError, match="non-finite|NaN"):
        parse("identity").encode({"x": torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="dtype"):
        parse("identity").encode({"x": torch.zeros(2, dtype=torch.complex64)})
    with pytest.raises(TypeError, match="torch.Tensor"):
        parse("identity").encode({"x": [1.0, 2.0]})  # type: ignore[dict-item]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_random_bytes(data: bytes) -> None:
    decode_or_codec_error(data)
    decode_or_codec_error(b"FSQZ\x01" + data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BLOBS), st.data())
def test_bit_flipped_blobs(blob: bytes, data: st.DataObject) -> None:
    flips = data.draw(st.lists(st.integers(0, len(blob) * 8 - 1), min_size=1, max_size=4))
    corrupted = bytearray(blob)
    for bit in flips:
        corrupted[bit // 8] ^= 1 << (bit % 8)
    decode_or_codec_error(bytes(corrupted))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(BLOBS), st.data())
def test_spliced_and_overwritten_blobs(blob: bytes, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, len(blob)))
    junk = data.draw(st.binary(max_size=32))
    end = data.draw(st.integers(start, len(blob)))
    decode_or_codec_error(blob[:start] + junk + blob[end:])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(SPECS),
    st.lists(st.integers(1, 40), min_size=1, max_size=4),
    st.floats(-1e6, 1e6, allow_nan=False, width=32),
)
def test_random_updates_round_trip_shapes(spec: str, shape: list[int], scale: float) -> None:
    x = torch.randn(*shape) * scale
    out = decode(parse(spec, seed=0).encode({"x": x}))
    assert out["x"].shape == x.shape
    assert bool(torch.isfinite(out["x"]).all())
    if parse(spec).lossless:
        assert torch.equal(out["x"], x)
