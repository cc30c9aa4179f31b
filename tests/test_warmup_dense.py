"""``topk(dense_below=N)``: small tensors skip the sparsifier; large ones are sparsified as before."""

from __future__ import annotations

import pytest
import torch

from fedsqueeze.codecs import ErrorFeedback, TopK, decode, parse


def update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"fc.weight": torch.randn(50, 40, generator=g), "fc.bias": torch.randn(50, generator=g)}


def test_a_tensor_below_the_threshold_keeps_every_entry_through_the_next_stage() -> None:
    u = update()
    out = decode(parse("topk(ratio=0.01, dense_below=100) | quantize(bits=8)").encode(u))
    assert int((out["fc.bias"] != 0).sum()) >= 49  # quantized dense (one code may land on zero)
    step = float(u["fc.bias"].max() - u["fc.bias"].min()) / 255
    assert float((out["fc.bias"] - u["fc.bias"]).abs().max()) <= step / 2 + 1e-6
    assert int((out["fc.weight"] != 0).sum()) == 20  # 2,000 entries >= 100: top 1 %, as without the parameter


def test_without_a_next_stage_a_small_tensor_is_sent_exactly() -> None:
    u = update()
    out = decode(parse("topk(ratio=0.1, dense_below=51)").encode(u))
    assert torch.equal(out["fc.bias"], u["fc.bias"])
    assert int((out["fc.weight"] != 0).sum()) == 200


def test_the_threshold_is_strict_and_zero_turns_it_off() -> None:
    u = update()  # fc.bias has 50 entries: dense below 51, sparse at 50
    assert int((decode(parse("topk(ratio=0.1, dense_below=50)").encode(u))["fc.bias"] != 0).sum()) == 5
    assert parse("topk(ratio=0.1, dense_below=0)").encode(u) == parse("topk(ratio=0.1)").encode(u)


def test_the_parameter_is_in_the_spec_and_checked() -> None:
    assert parse("topk(ratio=0.01, dense_below=1000) | zstd").spec == "topk(dense_below=1000) | zstd"
    assert TopK(ratio=0.05).spec == "topk(ratio=0.05)"  # the default is omitted: old specs are unchanged
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="dense_below"):
            TopK(dense_below=bad)  # type: ignore[arg-type]


def test_error_feedback_keeps_only_the_quantization_error_of_a_dense_small_tensor() -> None:
    u = update()
    feedback = ErrorFeedback(parse("topk(ratio=0.01, dense_below=100) | quantize(bits=8)"))
    sent = decode(feedback.encode(u))
    for name in u:
        assert torch.allclose(sent[name] + feedback.residual[name], u[name], atol=1e-6)
    step = float(u["fc.bias"].max() - u["fc.bias"].min()) / 255
    assert float(feedback.residual["fc.bias"].abs().max()) <= step / 2 + 1e-6
    assert float(feedback.residual["fc.weight"].abs().max()) > 1.0  # the dropped 99 % of the large tensor
