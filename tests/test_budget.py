"""The ``budget`` stage: byte targets met, lower error than uniform settings at equal bytes, self-describing blobs."""

from __future__ import annotations

import functools
import pathlib
import tempfile
import warnings

import numpy as np
import pytest
import torch

from fedsqueeze.codecs import Budget, CodecError, ErrorFeedback, blob_spec, decode, parse
from fedsqueeze.codecs._pipeline import read_header
from fedsqueeze.simulation.codec_bench import relative_l2_error, synthetic_update

MNIST = pathlib.Path("/work/shared/datasets")
Update = dict[str, torch.Tensor]


@functools.cache
def trained_delta(model_name: str, steps: int = 200) -> Update:
    """Weight delta of a model after ``steps`` SGD steps (batch 32) on MNIST, from a seeded start.

    Kept in the temporary folder between runs (as npz, no pickle): training is deterministic.
    """
    cache = pathlib.Path(tempfile.gettempdir()) / f"fedsqueeze-delta-{model_name}-{steps}.npz"
    if cache.exists():
        with np.load(cache, allow_pickle=False) as stored:
            return {k: torch.from_numpy(stored[k]) for k in stored.files}
    delta = _train_delta(model_name, steps)
    np.savez(cache, **{k: v.numpy() for k, v in delta.items()})
    return delta


def _train_delta(model_name: str, steps: int) -> Update:
    from fedsqueeze.data import load_dataset
    from fedsqueeze.models import build_model
    from fedsqueeze.training import get_weights, train

    data = load_dataset("mnist", str(MNIST) if MNIST.is_dir() else None)
    torch.manual_seed(0)
    model = build_model(model_name, "mnist")
    before = get_weights(model)
    train(model, data.x_train[: 32 * steps], data.y_train[: 32 * steps], epochs=1, seed=0)
    after = get_weights(model)
    return {k: after[k] - before[k] for k in before if before[k].is_floating_point()}


def update_of(model: str) -> Update:
    if model == "synthetic":
        return synthetic_update(300_000, seed=1)  # heavy-tailed (Student-t), model-shaped
    return trained_delta(model)


def payload_bytes(blob: bytes) -> int:
    """Blob bytes after the header (magic, version, spec, body length)."""
    return len(blob) - read_header(blob)[2].pos


def num_params(update: Update) -> int:
    return sum(t.numel() for t in update.values())


PIPELINES = ["topk | quantize | zstd", "topk | quantize(bits=4) | zstd", "topk | zstd"]


@pytest.mark.parametrize("model", ["synthetic", "lenet5", "mcmahan-cnn"])
@pytest.mark.parametrize("bpp", [0.01, 0.05, 0.2, 1.0, 2.0])
def test_budget_is_hit_within_3_percent(model: str, bpp: float) -> None:
    update = update_of(model)
    target = bpp * num_params(update) / 8
    for tail in PIPELINES:
        codec = parse(f"budget(bpp={bpp}) | {tail}")
        blob = codec.encode(update)
        decoded = decode(blob)
        dropped_all = all(not bool(decoded[k].any()) for k in update)
        if dropped_all and payload_bytes(blob) > target:
            # the target is below the smallest blob (names and shapes only): LeNet-5 at 0.01 bpp
            assert model == "lenet5" and bpp == 0.01, f"{tail}: floor {payload_bytes(blob)} > target {target:.0f}"
            continue
        assert payload_bytes(blob) == pytest.approx(target, rel=0.03), f"{model} {bpp} {tail}"


def rank_tolerance(target: float) -> float:
    """A rank or a width moves a blob of under 2 kB by tens of bytes: 10 % there, else 3 %."""
    return 0.03 if target >= 2048 else 0.10


@pytest.mark.parametrize("model", ["synthetic", "lenet5", "mcmahan-cnn"])
@pytest.mark.parametrize("bpp", [0.01, 0.05, 0.2, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("tail", ["svd | quantize | zstd", "svd | quantize(bits=4) | zstd"])
def test_budget_over_svd_is_hit(model: str, bpp: float, tail: str) -> None:
    # ranks and widths are coarse steps: before the plan spent its leftover bytes on whole menu
    # points and rescaled its menus to the measured bytes, LeNet-5 at 0.2 bpp got 0.53 of its target
    update = update_of(model)
    target = bpp * num_params(update) / 8
    blob = parse(f"budget(bpp={bpp}) | {tail}", seed=0).encode(update)
    if model == "lenet5" and bpp == 0.01:
        assert not any(bool(t.any()) for t in decode(blob).values())  # below the smallest blob: all dropped
        return
    assert payload_bytes(blob) == pytest.approx(target, rel=rank_tolerance(target))


@pytest.mark.parametrize("model", ["synthetic", "lenet5", "mcmahan-cnn"])
@pytest.mark.parametrize("bpp", [0.05, 0.2, 0.5, 1.0, 2.0])
def test_budget_over_powersgd_is_hit(model: str, bpp: float) -> None:
    # PowerSGD's ranks stop at its own (its warm start's width): rank 32 reaches up to ~0.5 bpp
    # by ranks alone; past it (on the McMahan CNN: 0.61 of the target at 1 bpp, 0.68 at 2 on one
    # machine's delta) other widths and ranks of single tensors fill the gap
    update = update_of(model)
    target = bpp * num_params(update) / 8
    blob = parse(f"budget(bpp={bpp}) | powersgd(rank=32) | quantize | zstd", seed=0).encode(update)
    assert payload_bytes(blob) == pytest.approx(target, rel=rank_tolerance(target))


def equal_bytes_uniform(update: Update, nbytes: int, tail: str) -> tuple[int, float]:
    """Bytes and error of the uniform `topk(ratio=r) | tail` with the fewest bytes >= ``nbytes``."""
    lo, hi = 1e-5, 1.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        if len(parse(f"topk(ratio={mid}) | {tail}").encode(update)) >= nbytes:
            hi = mid
        else:
            lo = mid
    blob = parse(f"topk(ratio={hi}) | {tail}").encode(update)
    return len(blob), relative_l2_error(update, decode(blob))


@pytest.mark.parametrize("model", ["synthetic", "lenet5", "mcmahan-cnn"])
@pytest.mark.parametrize("bpp", [0.1, 0.5])
def test_budget_beats_uniform_at_equal_bytes(model: str, bpp: float) -> None:
    update = update_of(model)
    for bits in (4, 8):
        tail = f"quantize(bits={bits}) | zstd"
        blob = parse(f"budget(bpp={bpp}) | topk | {tail}").encode(update)
        error = relative_l2_error(update, decode(blob))
        uniform_bytes, uniform_error = equal_bytes_uniform(update, len(blob), tail)
        assert uniform_bytes >= len(blob)
        assert error < uniform_error, f"{model} {bpp} bits={bits}: budget {error:.4f} vs uniform {uniform_error:.4f}"


def test_spec_round_trips_and_blob_declares_it() -> None:
    codec = parse("budget(bpp=0.25, passes=4) | topk | quantize(bits=4) | zstd(level=5)")
    assert parse(codec.spec) == codec
    assert codec.stages[0] == Budget(bpp=0.25, passes=4)
    assert parse("budget | zstd").spec == "budget | zstd"
    blob = codec.encode(update_of("synthetic"))
    assert blob_spec(blob) == codec.spec


def test_decode_needs_only_the_blob_and_settings_vary_per_tensor() -> None:
    update = trained_delta("lenet5")
    blob = parse("budget(bpp=0.5) | topk | quantize | zstd").encode(update)
    decoded = decode(blob)
    assert list(decoded) == list(update)
    assert all(decoded[k].shape == update[k].shape for k in update)
    kept = {k: int(decoded[k].count_nonzero()) / update[k].numel() for k in update}
    assert max(kept.values()) > 4 * min(v for v in kept.values() if v > 0)  # not one ratio for every tensor


def test_error_feedback_conserves_the_sum() -> None:
    ef = ErrorFeedback(parse("budget(bpp=0.2) | topk | quantize(bits=4) | zstd"))
    total_in: Update = {}
    total_out: Update = {}
    for seed in range(3):
        update = synthetic_update(50_000, seed=seed)
        out = decode(ef.encode(update))
        for k, v in update.items():
            total_in[k] = total_in.get(k, torch.zeros_like(v)) + v
            total_out[k] = total_out.get(k, torch.zeros_like(v)) + out[k]
    for k in total_in:
        torch.testing.assert_close(total_out[k] + ef.residual[k], total_in[k], rtol=0, atol=1e-6)


def test_budget_must_lead_and_checks_its_parameters() -> None:
    with pytest.raises(ValueError, match="must come first"):
        parse("topk | budget | zstd")
    with pytest.raises(ValueError, match="bpp"):
        parse("budget(bpp=0) | topk")
    with pytest.raises(ValueError, match="passes"):
        parse("budget(bpp=1, passes=0) | topk")


def _budget_node_meta_offset(body: bytes, name: bytes) -> int:
    """Offset in ``body`` of the settings bytes of the budget node of tensor ``name``."""
    at = body.index(name) + len(name) + 1  # dtype code
    assert body[at] == 1  # tag of stage 0, the budget
    ndim = body[at + 1]
    at += 2
    for _ in range(ndim):
        while body[at] & 0x80:
            at += 1
        at += 1
    return at + 1  # past the header length (one byte here)


def test_hostile_settings_are_refused() -> None:
    update = {"w": torch.randn(64, 64, generator=torch.Generator().manual_seed(0))}
    blob = parse("budget(bpp=4) | topk | quantize").encode(update)
    header_end = read_header(blob)[2].pos
    body = bytearray(blob[header_end:])
    meta = _budget_node_meta_offset(bytes(body), b"w")
    assert body[meta - 1] == 2 and body[meta + 1] in (2, 4, 8)  # two settings: top-k used, a width
    for bad in (3, 16, 255):
        body[meta + 1] = bad
        with pytest.raises(CodecError, match="bit width"):
            decode(blob[:header_end] + bytes(body))
    body[meta - 1] = 1  # one setting where the pipeline has two later stages
    with pytest.raises(CodecError):
        decode(blob[:header_end] + bytes(body))


def test_fill_prices_kept_values_at_their_coding() -> None:
    # regression: the greedy fill priced every kept value at 32 bits, so after `topk | ternary`
    # (1 bit a value) it under-spent the leftover bytes and the correction passes ran out
    from fedsqueeze.codecs import _allocate

    update = synthetic_update(50_000, seed=3)
    codec = parse("budget(bpp=0.5) | topk | ternary | zstd")
    name, t = next(iter(update.items()))
    x = t.float().contiguous()
    item = _allocate.Tensor(name, t, x, [], torch.sort(x.reshape(-1).abs(), descending=True).values.numpy())
    item.menu = _allocate.build_menu(codec, codec.stages[0], item)
    assert {c.value_bits for c in item.menu if c.kind == "topk"} == {1.0}
    blob = codec.encode(update)
    assert payload_bytes(blob) == pytest.approx(0.5 * num_params(update) / 8, rel=0.03)


def test_menu_leaves_off_only_dense_widths_no_plan_can_afford() -> None:
    # the planner skips pricing a dense width whose codes alone exceed the most bytes a plan may spend
    from fedsqueeze.codecs import _allocate

    update = synthetic_update(50_000, seed=4)
    codec = parse("budget(bpp=0.3) | topk | quantize | zstd")
    name, t = max(update.items(), key=lambda kv: kv[1].numel())
    x = t.float().contiguous()
    item = _allocate.Tensor(name, t, x, [], _allocate._descending_magnitudes(x))
    full = _allocate.build_menu(codec, codec.stages[0], item)
    dense = {c.bits: c for c in full if c.kind == "dense"}
    assert sorted(dense) == [2, 4, 8]
    limit = 2 * 0.3 * x.numel() / 8
    kept = {c.bits for c in _allocate.build_menu(codec, codec.stages[0], item, limit) if c.kind == "dense"}
    assert kept != set(dense)  # at 0.3 bpp a whole large tensor at 8 bits is out of reach
    assert all(dense[b].est_bytes > limit for b in set(dense) - kept)


def test_menu_hull_keeps_exactly_the_points_some_price_can_pick() -> None:
    # the menus are pruned to their lower convex hull; check it against the definition, brute force
    from fedsqueeze.codecs._allocate import _lower_hull

    rng = np.random.default_rng(7)
    for trial in range(300):
        n = int(rng.integers(1, 25))
        sizes = rng.integers(0, 12, n).astype(float) if trial % 2 else rng.random(n)
        errors = 1.0 / (sizes + 0.5) + rng.random(n) * (trial % 3)
        expected = []
        for i in range(n):
            dominated = any(
                (sizes[j] <= sizes[i] and errors[j] <= errors[i])
                and (sizes[j], errors[j], j) < (sizes[i], errors[i], i)
                for j in range(n)
            )
            above_chord = any(
                sizes[j] < sizes[i] < sizes[k]
                and errors[i] * (sizes[k] - sizes[j])
                >= errors[j] * (sizes[k] - sizes[i]) + errors[k] * (sizes[i] - sizes[j])
                for j in range(n)
                for k in range(n)
            )
            if not dominated and not above_chord:
                expected.append(i)
        assert sorted(_lower_hull(sizes, errors).tolist()) == expected


def _planned_payloads(monkeypatch: pytest.MonkeyPatch, spec: str, update: Update) -> tuple[list[int], bytes]:
    """Payload bytes of every whole-update encode one ``encode`` call made (counted at the planner), and its blob."""
    from fedsqueeze.codecs import _allocate

    payloads: list[int] = []
    real = _allocate._encode_plan

    def counted(*args: object, **kwargs: object) -> tuple[bytes, int]:
        blob, payload = real(*args, **kwargs)  # type: ignore[arg-type]
        payloads.append(payload)
        return blob, payload

    monkeypatch.setattr(_allocate, "_encode_plan", counted)
    return payloads, parse(spec, seed=0).encode(update)


def _encodes_and_first_payload(monkeypatch: pytest.MonkeyPatch, spec: str, update: Update) -> tuple[int, int]:
    """(whole-update encodes one ``encode`` call made, payload bytes of the first)."""
    payloads, _ = _planned_payloads(monkeypatch, spec, update)
    return len(payloads), payloads[0]


@pytest.mark.parametrize("tail", ["topk | quantize | zstd", "svd | quantize | zstd"])
def test_a_plan_met_again_is_not_encoded_again(monkeypatch: pytest.MonkeyPatch, tail: str) -> None:
    # 0.01 bpp of LeNet-5 is less than its names and shapes take: every plan drops every tensor,
    # and before the fix the same blob was encoded three times
    encodes, _ = _encodes_and_first_payload(monkeypatch, f"budget(bpp=0.01) | {tail}", update_of("lenet5"))
    assert encodes == 1


@pytest.mark.parametrize("model", ["synthetic", "lenet5", "mcmahan-cnn"])
def test_rank_plans_stop_at_the_first_payload_within_tolerance(monkeypatch: pytest.MonkeyPatch, model: str) -> None:
    from fedsqueeze.codecs._budget import TOLERANCE

    update = update_of(model)
    target = 0.2 * num_params(update) / 8
    payloads, blob = _planned_payloads(monkeypatch, "budget(bpp=0.2, passes=6) | svd | quantize | zstd", update)
    assert len(payloads) <= 6
    within = [abs(p - target) <= TOLERANCE * target for p in payloads]
    if any(within):
        assert within.index(True) == len(within) - 1, payloads  # no encode after the first hit
        assert payload_bytes(blob) == payloads[-1]
    else:  # the closest of the plans
        assert payload_bytes(blob) == min(payloads, key=lambda p: abs(p - target))


def test_top_k_menu_prices_codes_with_the_outlier_blocks() -> None:
    # quantize at <= 4 bits ranges each block of 256 kept values on its own, which spreads the codes;
    # priced on the tensor's one range, the first plan overshot LeNet-5's 1 bpp target by 16 %
    from fedsqueeze.codecs import _allocate
    from fedsqueeze.codecs._quant import Quantize

    codec = parse("budget(bpp=1) | topk | quantize | zstd")
    x = update_of("lenet5")["fc1.weight"].contiguous()
    mags = _allocate._descending_magnitudes(x)
    item = _allocate.Tensor("fc1.weight", x, x, [], mags)
    menu = _allocate.build_menu(codec, codec.tensor_stages[0], item)
    points = [c for c in menu if c.kind == "topk" and c.bits == 4 and 1024 < c.size < x.numel() // 2]
    assert points, "no 4-bit top-k point past a few blocks on the menu"
    errors = []
    for c in points:
        flat = x.reshape(-1)
        kept = flat[torch.sort(flat.abs(), descending=True, stable=True).indices[: c.size].sort().values]
        codes = Quantize(bits=4).encode(kept, None).parts[0].numpy()  # type: ignore[arg-type]
        nibbles = np.concatenate([codes & 15, codes >> 4])[: c.size]
        p = np.bincount(nibbles, minlength=16) / c.size
        measured = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        errors.append(abs(c.value_bits - measured) / measured)
    # one range: 2.48 bits for 3.20 at k = 1224, a mean error of about 25 %; scaled by the measured blocks: 9 %
    # on the delta trained on one CPU, 13 % on another's (training rounds by the CPU's kernels)
    assert float(np.mean(errors)) <= 0.16, [f"{e:.3f}" for e in errors]


def test_rank_menu_energies_match_the_svd_and_survive_an_eigensolver_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsqueeze.codecs._allocate import _squared_singular_values

    m = torch.randn(30, 70, generator=torch.Generator().manual_seed(0))
    exact = torch.linalg.svdvals(m.double()).pow(2)
    for matrix in (m, m.T):  # the smaller Gram matrix of a wide and of a tall matrix
        assert torch.allclose(_squared_singular_values(matrix), exact, rtol=1e-4, atol=1e-3)

    def fail(_: torch.Tensor) -> torch.Tensor:
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "eigvalsh", fail)
    assert torch.allclose(_squared_singular_values(m), exact, rtol=1e-4, atol=1e-3)


def test_a_missed_target_warns_once_per_codec(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedsqueeze.codecs import BudgetMissWarning, _allocate

    monkeypatch.setattr(_allocate, "_WARNED", set())
    update = update_of("lenet5")
    with pytest.warns(BudgetMissWarning, match=r"payload is 1\d\d bytes for a target of 77") as caught:
        for _ in range(2):  # 0.01 bpp of LeNet-5 is below its smallest blob (names and shapes)
            parse("budget(bpp=0.01) | topk | quantize | zstd").encode(update)
    assert len([w for w in caught if w.category is BudgetMissWarning]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", BudgetMissWarning)
        parse("budget(bpp=0.2) | topk | quantize | zstd").encode(update)  # within 3 %: silent


def _low_rank_like(g: torch.Generator, rows: int, cols: int, decay: float) -> torch.Tensor:
    """A matrix whose singular values fall by ``decay`` per rank, plus a little noise."""
    u, v = torch.randn(rows, 64, generator=g), torch.randn(64, cols, generator=g)
    spectrum = decay ** torch.arange(64, dtype=torch.float32)
    return (u * spectrum) @ v / 64 + 0.01 * torch.randn(rows, cols, generator=g)


@pytest.mark.parametrize("bpp", [0.8, 1.0, 1.2])
def test_budget_is_hit_where_scaling_the_ranks_stops_at_powersgds_cap(bpp: float) -> None:
    # every matrix's rank at powersgd's own (32) once the plan is scaled up: before the planner
    # tried other ranks and widths of one tensor, these payloads were 0.96, 0.77 and 0.64 of the
    # target (found on a McMahan CNN delta trained on another CPU: 0.88 at 0.5 bpp)
    g = torch.Generator().manual_seed(0)
    update = {
        "conv2": _low_rank_like(g, 64, 800, 0.9).reshape(64, 32, 5, 5),
        "fc1": _low_rank_like(g, 512, 3136, 0.93),
        "fc2": _low_rank_like(g, 10, 512, 0.5),
        "bias": 0.01 * torch.randn(512, generator=g),
    }
    target = bpp * num_params(update) / 8
    blob = parse(f"budget(bpp={bpp}) | powersgd(rank=32) | quantize | zstd", seed=0).encode(update)
    assert payload_bytes(blob) == pytest.approx(target, rel=0.03)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("tail", ["svd | quantize | zstd", "powersgd(rank=32) | quantize | zstd"])
def test_a_target_just_above_the_all_dropped_blob_is_hit(seed: int, tail: str) -> None:
    # LeNet-5's shapes at 0.02 bpp: 154 bytes, where every tensor dropped takes 111. The plan nearest
    # the target (181 bytes: one small tensor at 2 bits) changes only back to 111, and the planner
    # stopped there, at 1.17-1.20x; one tensor added to the 111-byte plan lands at 158
    from fedsqueeze.models import build_model

    g = torch.Generator().manual_seed(seed)
    layout = build_model("lenet5", "mnist").state_dict()
    update = {name: 0.01 * torch.randn(p.shape, generator=g) for name, p in layout.items()}
    target = 0.02 * num_params(update) / 8
    blob = parse(f"budget(bpp=0.02) | {tail}", seed=0).encode(update)
    assert payload_bytes(blob) == pytest.approx(target, rel=rank_tolerance(target))
    assert any(bool(t.any()) for t in decode(blob).values())
