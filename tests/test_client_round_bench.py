"""The client-round benchmark times what client/mod.py times, and its table adds up."""

from __future__ import annotations

import torch

from fedsqueeze.simulation.client_round_bench import client_round_ms, cpu_ms, report


def test_client_round_is_timed_per_round_with_its_residual_carried() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {"fc.weight": torch.randn(30, 40, generator=g) * 1e-3, "fc.bias": torch.randn(30, generator=g) * 1e-3}
    before: list[int] = []
    up, down = client_round_ms("svd(rank=2) | quantize(bits=4) | zstd", delta, rounds=4, before=before.append)
    assert len(up) == len(down) == 4
    assert all(t >= 0 for t in up + down)
    assert before == [0, 1, 2, 3] * 2  # once before each timed round, then before each timed decode
    row = {
        "codec": "svd(rank=2) | quantize(bits=4) | zstd",
        "uplink_ms": 2.0,
        "decode_ms": 1.0,
        "uplink_after_training_ms": 3.0,
        "decode_after_training_ms": 2.0,
    }
    text = report([row], [100.0])
    # after training: 3 ms of uplink work and 2 ms of decoding against 100 ms of training
    assert "| 2.00 | 3.00 | 3.00 % | 1.00 | 2.00 | 5.00 % |" in text


def test_cpu_ms_leaves_the_work_before_each_call_untimed() -> None:
    spent = cpu_ms(lambda i: None, repeats=3, warmup=0, before=lambda i: sum(range(300_000)))
    assert len(spent) == 3 and max(spent) < 5.0  # the ~10 ms sums before each call are not counted
