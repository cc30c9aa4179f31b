"""The fused encoder (every stage sees all tensors at once) against the per-tensor encoder: same blobs, bit for bit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedsqueeze.codecs import Codec, EncodeContext, ErrorFeedback, decode, parse, registered_stages
from fedsqueeze.codecs._sparse import SAMPLE, topk_indices
from fedsqueeze.codecs._spec import parse_stages
from fedsqueeze.codecs._wire import tensor_to_bytes
from fedsqueeze.codecs.stage_api import EncodeFurther
from fedsqueeze.simulation.fuzz_codecs import PIPELINES

SPECS = sorted(registered_stages()) + PIPELINES


def model_update(seed: int = 0) -> dict[str, torch.Tensor]:
    """LeNet-5's layout, plus tensors the stages treat specially (non-float, empty, half, ties)."""
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "conv1.weight": (6, 1, 5, 5),
        "conv1.bias": (6,),
        "conv2.weight": (16, 6, 5, 5),
        "fc1.weight": (120, 400),
        "fc1.bias": (120,),
        "fc2.weight": (84, 120),
        "tall": (90, 7),
    }
    update = {name: torch.randn(shape, generator=g) * 1e-3 for name, shape in shapes.items()}
    update["ties"] = torch.tensor([0.5, -0.5, 0.5, 0.0, -0.0, 0.25] * 5)
    update["zeros"] = torch.zeros(40)
    update["half"] = torch.randn(12, 9, generator=g).half()
    update["counter"] = torch.tensor(3, dtype=torch.int64)
    update["empty"] = torch.zeros(0, 3)
    return update


def assert_same_blobs(spec: str, updates: list[dict[str, torch.Tensor]]) -> None:
    fused, per_tensor = parse(spec, seed=7), parse(spec, seed=7)
    for i, update in enumerate(updates):
        blob = fused.encode(update)
        assert blob == per_tensor.encode(update, fused=False), f"{spec}: encode {i} differs"
        out = decode(blob)  # the decoder reads it (equal blobs decode equally)
        assert list(out) == list(update)
    assert fused.state_dict().keys() == per_tensor.state_dict().keys()
    for key, value in fused.state_dict().items():
        assert torch.equal(value, per_tensor.state_dict()[key]), key


@pytest.mark.parametrize("spec", SPECS)
def test_fused_blobs_equal_per_tensor_blobs(spec: str) -> None:
    # two encodes: stateful stages (powersgd's warm start) must see the same history
    assert_same_blobs(spec, [model_update(0), model_update(1)])


@pytest.mark.parametrize("name", sorted(registered_stages()))
def test_encode_batch_equals_encode_for_every_stage(name: str) -> None:
    stage = parse_stages(name)[0]
    if stage.kind != "tensor" or stage.allocates:
        return  # bytes stages and `budget` never see a batch; the blob tests above cover them
    g = torch.Generator().manual_seed(3)
    xs = [torch.randn(s, generator=g) for s in [(5,), (12, 10), (3, 4, 5), (70_000,), (1,), (30, 2)]]

    def contexts() -> list[EncodeContext]:
        return [EncodeContext(name=f"t{i}", state={}, seed=11 + i) for i in range(len(xs))]

    batch = stage.encode_batch(xs, contexts())
    single = [stage.encode(x, ctx) for x, ctx in zip(xs, contexts(), strict=True)]
    assert len(batch) == len(single)
    for got, want in zip(batch, single, strict=True):
        assert (got is None) == (want is None)
        if got is None or want is None:
            continue
        assert got.meta == want.meta and len(got.parts) == len(want.parts)
        for a, b in zip(got.parts, want.parts, strict=True):
            assert isinstance(a, EncodeFurther) == isinstance(b, EncodeFurther)
            ta = a.tensor if isinstance(a, EncodeFurther) else a
            tb = b.tensor if isinstance(b, EncodeFurther) else b
            assert ta.dtype == tb.dtype and ta.shape == tb.shape
            assert bytes(tensor_to_bytes(ta)) == bytes(tensor_to_bytes(tb)), name
        if got.wire is not None:  # the parts as raw nodes, as the per-tensor encoder writes them
            assert not any(isinstance(part, EncodeFurther) for part in got.parts)
            written = b"".join(Codec.raw_node(part).getvalue() for part in got.parts)  # type: ignore[arg-type]
            assert got.wire == written, name


finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False, width=32)
few_values = st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 1e-30, 3.0])
shapes = st.lists(st.integers(0, 9), min_size=0, max_size=3).map(tuple)


@st.composite
def updates(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(draw(st.integers(1, 6))):
        shape = draw(shapes)
        n = math.prod(shape)
        values = draw(st.lists(st.one_of(finite, few_values), min_size=n, max_size=n))
        out[f"t{i}"] = torch.tensor(values, dtype=torch.float32).reshape(shape)
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    update=updates(),
    spec=st.sampled_from(
        [
            "topk(ratio=0.2) | quantize(bits=8) | zstd",
            "topk(ratio=0.5) | quantize(bits=1)",
            "svd(rank=2) | quantize(bits=4) | zstd",
            "svd(rank=0.5) | quantize",
            "quantize(bits=2)",
            "threshold(value=0.5) | quantize(bits=8, granularity=8)",
            "randomk(ratio=0.3) | quantize(stochastic=true)",
        ]
    ),
)
def test_fused_blobs_equal_per_tensor_blobs_on_random_updates(update: dict[str, torch.Tensor], spec: str) -> None:
    assert_same_blobs(spec, [update])


def assert_rebuilt_is_decoded(spec: str, updates_: list[dict[str, torch.Tensor]]) -> None:
    """``encode_rebuilt`` gives encode's blob, and the tensors decode returns for it, bit for bit."""
    plain, rebuilding = parse(spec, seed=5), parse(spec, seed=5)
    for update in updates_:
        blob, rebuilt = rebuilding.encode_rebuilt(update)
        assert blob == plain.encode(update), spec
        assert rebuilt is not None, spec  # `budget`, which encodes through its own planner: decoded
        decoded = decode(blob)
        assert list(rebuilt) == list(decoded), spec
        for name, t in decoded.items():
            got = rebuilt[name]
            assert (got.dtype, got.shape) == (t.dtype, t.shape), (spec, name)
            assert bytes(tensor_to_bytes(got)) == bytes(tensor_to_bytes(t)), (spec, name)  # -0.0 too


@pytest.mark.parametrize("spec", SPECS)
def test_rebuilt_update_is_what_decode_returns(spec: str) -> None:
    # error feedback takes its residual from this instead of decoding its own blob
    assert_rebuilt_is_decoded(spec, [model_update(0), model_update(1)])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(update=updates(), spec=st.sampled_from(PIPELINES))
def test_rebuilt_update_is_what_decode_returns_on_random_updates(update: dict[str, torch.Tensor], spec: str) -> None:
    assert_rebuilt_is_decoded(spec, [update])


def test_rebuilt_is_decoded_where_the_encoder_keeps_no_parts() -> None:
    update = model_update(0)
    for spec, fused in (("topk(ratio=0.1) | zstd", False), ("budget(bpp=1) | topk | zstd", True)):
        blob, rebuilt = parse(spec, seed=2).encode_rebuilt(update, fused=fused)
        assert rebuilt is not None, spec
        assert all(torch.equal(rebuilt[n], t) for n, t in decode(blob).items()), spec
    assert parse("topk(ratio=0.1) | zstd").encode_rebuilt(update, rebuilt=False)[1] is None


def test_error_feedback_conserves_the_update_and_matches_the_per_tensor_path() -> None:
    spec = "topk(ratio=0.05) | quantize(bits=4) | zstd"
    fused = ErrorFeedback(parse(spec, seed=1))
    sent = torch.zeros(120, 400, dtype=torch.float64)
    given_total = torch.zeros(120, 400, dtype=torch.float64)
    reference = parse(spec, seed=1)
    residual = {name: torch.zeros_like(t) for name, t in model_update(0).items() if t.dtype == torch.float32}
    for round_ in range(4):
        update = {k: v for k, v in model_update(round_).items() if v.dtype == torch.float32}
        blob = fused.encode(update)
        # the per-tensor path with the same residual gives the same blob
        corrected = {k: v + residual[k] for k, v in update.items()}
        assert blob == reference.encode(corrected, fused=False)
        decoded = decode(blob)
        residual = {k: corrected[k] - decoded[k].float() for k in corrected}
        sent += decoded["fc1.weight"].double()
        given_total += update["fc1.weight"].double()
    assert torch.allclose(sent + fused.residual["fc1.weight"].double(), given_total, atol=1e-6)


def reference_topk(mag: np.ndarray, k: int) -> np.ndarray:
    """The k largest, ties to the lower index: a stable sort by decreasing magnitude."""
    return np.sort(np.argsort(-mag, kind="stable")[:k])


@pytest.mark.parametrize("n, k", [(10, 3), (1000, 7), (4 * SAMPLE + 1000, 300), (4 * SAMPLE + 1000, 5000)])
def test_topk_indices_take_the_largest_and_break_ties_toward_lower_indices(n: int, k: int) -> None:
    rng = np.random.default_rng(n + k)
    mag = np.abs(rng.standard_normal(n)).astype(np.float32)
    assert np.array_equal(topk_indices(mag, k), reference_topk(mag, k))
    coarse = np.round(mag * 4).astype(np.float32) / 4  # many ties at the k-th value
    assert np.array_equal(topk_indices(coarse, k), reference_topk(coarse, k))


def test_quantize_sends_a_positive_zero_minimum_whichever_zero_comes_first() -> None:
    for values in ([-0.0, 0.0, 0.0], [0.0, -0.0, -0.0], [-0.0, -0.0]):
        x = {"x": torch.tensor(values * 20)}  # long enough that quantizing pays
        blob = parse("quantize").encode(x)
        assert blob == parse("quantize").encode(x, fused=False)
        assert b"\x00\x00\x00\x80" not in blob  # no float32 -0.0 among the range values


def test_low_rank_of_rank_deficient_and_tall_matrices_is_finite_and_exact() -> None:
    g = torch.Generator().manual_seed(2)
    rank1 = torch.randn(30, 1, generator=g) @ torch.randn(1, 50, generator=g)
    sketched = torch.randn(100, 1, generator=g) @ torch.randn(1, 300, generator=g)  # >= 65 a side
    update = {"wide": rank1, "tall": rank1.T.contiguous(), "zero": torch.zeros(20, 40)}
    update |= {
        "sketched-wide": sketched,
        "sketched-tall": sketched.T.contiguous(),
        "sketched-zero": torch.zeros(100, 300),
    }
    out = decode(parse("svd(rank=4)").encode(update))
    for name, x in update.items():
        assert bool(torch.isfinite(out[name]).all())
        assert float((out[name] - x).norm()) <= 1e-5 * max(float(x.norm()), 1.0), name


def test_parse_stages_hands_out_a_fresh_list_from_its_cache() -> None:
    first = parse_stages("topk | quantize | zstd")
    first.pop()
    assert [s.name for s in parse_stages("topk | quantize | zstd")] == ["topk", "quantize", "zstd"]
    assert isinstance(Codec(parse_stages("topk | zstd")), Codec)


def test_randomized_svd_of_a_large_matrix_is_seeded_so_both_paths_agree() -> None:
    g = torch.Generator().manual_seed(6)
    update = {"big": torch.randn(1100, 1030, generator=g), "bias": torch.randn(1100, generator=g)}
    before = torch.random.get_rng_state()
    assert_same_blobs("svd(rank=2) | quantize | zstd", [update])
    assert torch.equal(torch.random.get_rng_state(), before)  # the global generator is left alone


@pytest.mark.parametrize("spec", ["powersgd(rank=4, iters=3) | quantize(granularity=64)", "svd(rank=3) | quantize"])
@pytest.mark.parametrize("lead", range(1, 9))
def test_rebuilt_factors_at_any_offset_of_the_batch_multiply_as_decode_does(spec: str, lead: int) -> None:
    # found by the encoder fuzzer: quantize's batch rebuilds the factors as views of one buffer, and a
    # factor 4, 8 or 12 bytes past a 16-byte boundary (here after `lead` values) made MKL's product
    # round 1 ulp away from decode's, which multiplies fresh arrays; the server's downlink reference and
    # the error-feedback residual take that product as what the receiver decodes
    g = torch.Generator().manual_seed(lead)
    update = {"lead": torch.randn(lead, generator=g), "w": torch.randn(24, 8, generator=g), "v": torch.randn(40, 30)}
    assert_rebuilt_is_decoded(spec, [update])
