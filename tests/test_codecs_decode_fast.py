"""The decoder's fast path (raw parts read as numpy views, ``Stage.array_node``) against its general path."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_codecs_fused import SPECS, model_update, updates

from fedsqueeze.codecs import CodecError, DecodeLimits, decode, parse, registered_stages
from fedsqueeze.codecs._bits import SMALL_UNPACK, pack_bits, unpack_float32, varint_bytes
from fedsqueeze.codecs._pipeline import read_header
from fedsqueeze.codecs._quant import Quantize
from fedsqueeze.codecs._wire import DTYPE_CODES, tensor_to_bytes

QUANTIZE_DECODE = Quantize.decode

BUDGETED = [
    "budget(bpp=0.5) | svd | quantize(bits=4) | zstd",
    "budget(bpp=0.2) | topk | quantize(bits=4) | zstd",
    "budget(bpp=1) | powersgd(rank=8) | quantize | zstd",
]


@pytest.fixture
def general_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every stage without a fast path: the decoder reads each part as a tensor and calls ``Stage.decode``."""
    for cls in registered_stages().values():
        monkeypatch.setattr(cls, "array_node", lambda self, meta, shape: None)
    yield


def decode_both(blob: bytes, limits: DecodeLimits | None = None) -> tuple[object, object]:
    """(what the fast path returns or raises, what the general path returns or raises)."""
    outcomes: list[object] = []
    for patch in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if patch:
                for cls in registered_stages().values():
                    mp.setattr(cls, "array_node", lambda self, meta, shape: None)
            try:
                outcomes.append(decode(blob, limits=limits))
            except CodecError as err:
                outcomes.append(str(err))
    return outcomes[0], outcomes[1]


def assert_same(fast: object, general: object) -> None:
    if isinstance(general, str):
        assert fast == general
        return
    assert isinstance(fast, dict) and isinstance(general, dict)
    assert list(fast) == list(general)
    for name, t in general.items():
        assert (fast[name].dtype, fast[name].shape) == (t.dtype, t.shape), name
        assert bytes(tensor_to_bytes(fast[name])) == bytes(tensor_to_bytes(t)), name  # -0.0 and NaN bits too


def test_the_general_path_alone_decodes_the_default_codec(general_path: None) -> None:
    # with the fast path switched off the same blob must still decode (the general path is whole)
    blob = parse("svd(rank=6) | quantize(bits=4) | zstd", seed=0).encode(model_update(0))
    assert list(decode(blob)) == list(model_update(0))


def test_quantize_declares_its_parts_for_the_fast_path() -> None:
    stage = parse("quantize(bits=4)").tensor_stages[0]
    uint8, float32 = DTYPE_CODES[torch.uint8], DTYPE_CODES[torch.float32]
    whole, blocks = stage.array_node(b"", (120, 400)), stage.array_node(b"\x01\x80\x02", (120, 400))
    assert whole is not None and blocks is not None
    # packed 4-bit codes, then a minimum and a step for the tensor, or per 256-value block (the header says)
    assert whole.parts == ((uint8, 120 * 400 // 2), (float32, 1), (float32, 1))
    assert blocks.parts == ((uint8, 120 * 400 // 2), (float32, 188), (float32, 188))
    assert stage.array_node(b"\x07", (10,)) is None  # a header quantize cannot have written


@pytest.mark.filterwarnings("ignore::fedsqueeze.codecs.BudgetMissWarning")  # `budget` alone on tiny tensors
@pytest.mark.parametrize("spec", SPECS + BUDGETED)
def test_fast_path_decodes_bit_for_bit_as_the_general_path(spec: str) -> None:
    codec = parse(spec, seed=3)
    for seed in (0, 1):
        fast, general = decode_both(codec.encode(model_update(seed)))
        assert not isinstance(general, str), general
        assert_same(fast, general)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    update=updates(),
    spec=st.sampled_from(
        ["quantize(bits=1)", "quantize(bits=2, granularity=8)", "svd(rank=2) | quantize(bits=4) | zstd"]
        + ["topk(ratio=0.3) | quantize(bits=8, granularity=channel)", "quantize(bits=4, outlier_block=8)"]
    ),
)
def test_fast_path_decodes_random_updates_as_the_general_path(update: dict[str, torch.Tensor], spec: str) -> None:
    fast, general = decode_both(parse(spec, seed=1).encode(update))
    assert_same(fast, general)


@pytest.mark.parametrize(
    "limits",
    [
        DecodeLimits(scratch_factor=1, scratch_bytes=0),
        DecodeLimits(work_factor=1, work_constant=0),
        DecodeLimits(scratch_factor=4, scratch_bytes=2_000),
        DecodeLimits(work_factor=2, work_constant=50_000),
    ],
)
def test_fast_path_charges_the_limits_as_the_general_path(limits: DecodeLimits) -> None:
    # the same blob is refused (with the same message) or decoded the same way by both paths
    blob = parse("svd(rank=6) | quantize(bits=4) | zstd", seed=0).encode(model_update(0))
    fast, general = decode_both(blob, limits)
    assert_same(fast, general)


def test_a_fast_path_node_with_a_wrong_part_is_refused_by_the_general_path_message() -> None:
    # quantize(bits=8) of one tensor: its three raw parts are codes (uint8), minima and steps (float32);
    # turn the minima's dtype code into float16: the fast path declines and the general path names the part
    blob = bytearray(parse("quantize(bits=8)", seed=0).encode({"w": torch.arange(6.0)}))
    codes_end = blob.index(bytes(range(0, 256, 51))) + 6  # the codes of 0..5 quantized over 0..5 at 8 bits
    assert blob[codes_end : codes_end + 2] == b"\x00\x01"  # raw tag, float32
    blob[codes_end + 1] = DTYPE_CODES[torch.float16]
    fast, general = decode_both(bytes(blob))
    assert isinstance(general, str) and "'w'/quantize[" in general, general
    assert fast == general


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_codes_unpack_to_float32_on_both_sides_of_the_table_lookups_limit(bits: int) -> None:
    rng = np.random.default_rng(bits)
    for count in (1, 2, 7, 8, 9, 150, SMALL_UNPACK - 1, SMALL_UNPACK, SMALL_UNPACK + 1, 3 * SMALL_UNPACK + 5):
        codes = rng.integers(0, 1 << bits, count).astype(np.uint8)
        packed = pack_bits(codes, bits)
        values = unpack_float32(packed, bits, count)
        assert values.dtype == np.float32 and values.shape == (count,)
        assert np.array_equal(values, codes.astype(np.float32))
        values *= 2  # the decoder scales them in place: a fresh array, not a view of the table
        assert np.array_equal(unpack_float32(packed, bits, count), codes.astype(np.float32))
        with pytest.raises(CodecError, match="packed codes hold"):
            unpack_float32(np.concatenate([packed, packed[:1]]), bits, count)


def test_a_part_whose_count_is_written_longer_than_it_must_be_decodes_as_the_general_path_reads_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the fast path matches each part's head byte for byte as the encoder writes it; a count written
    # as a two-byte varint (6 as 0x86 0x00) is left to the general path, and both read the same
    blob = parse("quantize(bits=8)", seed=0).encode({"w": torch.arange(6.0)})
    _, body_len, reader = read_header(blob)
    body = blob[reader.pos :]
    assert len(body) == body_len
    codes = body.index(bytes(range(0, 256, 51)))
    assert body[codes - 4 : codes] == bytes((0, DTYPE_CODES[torch.uint8], 1, 6))  # raw, uint8, 1 dim of 6
    longer = body[: codes - 1] + b"\x86\x00" + body[codes:]
    head = blob[: reader.pos - len(varint_bytes(body_len))]
    fast, general = decode_both(head + varint_bytes(len(longer)) + longer)
    assert_same(fast, general)
    assert isinstance(fast, dict) and torch.equal(fast["w"], decode(blob)["w"])
    general_calls = []
    monkeypatch.setattr(Quantize, "decode", lambda self, *args: general_calls.append(1) or QUANTIZE_DECODE(self, *args))
    decode(blob)
    assert not general_calls  # the head as written: the fast path
    decode(head + varint_bytes(len(longer)) + longer)
    assert general_calls == [1]  # the longer count: the general path
