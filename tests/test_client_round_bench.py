"""The client-round benchmark times what client/mod.py times, and its table adds up."""

from __future__ import annotations

import torch

from fedsqueeze.simulation.client_round_bench import client_round_ms, report


def test_client_round_is_timed_per_round_with_its_residual_carried() -> None:
    g = torch.Generator().manual_seed(0)
    delta = {"fc.weight": torch.randn(30, 40, generator=g) * 1e-3, "fc.bias": torch.randn(30, generator=g) * 1e-3}
    up, down = client_round_ms("svd(rank=2) | quantize(bits=4) | zstd", delta, rounds=4)
    assert len(up) == len(down) == 4
    assert all(t >= 0 for t in up + down)
    text = report([{"codec": "svd(rank=2) | quantize(bits=4) | zstd", "uplink_ms": 2.0, "decode_ms": 1.0}], [100.0])
    # 2 ms of uplink work and 1 ms of decoding against 100 ms of training
    assert "| 2.00 | 2.00 % | 1.00 | 3.00 % |" in text
