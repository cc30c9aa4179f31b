"""The examples in examples/ run as a user runs them (a fresh interpreter each) and do what they say."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, tmp_path: Path, *args: str, timeout: float = 120) -> dict[str, Any]:
    """Run ``examples/NAME`` with ``ARGS --json FILE``; return what it wrote to FILE."""
    out = tmp_path / f"{name}.json"
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, f"{name} failed with status {done.returncode}:\n{done.stdout}\n{done.stderr}"
    assert out.is_file(), f"{name} wrote no {out.name}:\n{done.stdout}\n{done.stderr}"
    return dict(json.loads(out.read_text()))


def test_plain_fedavg_learns_and_sends_far_fewer_bytes_than_fp32(tmp_path: Path) -> None:
    summary = run_example("plain_fedavg.py", tmp_path, "--rounds", "8")
    rounds = summary["rounds"]
    assert len(rounds) == 8 and summary["initial_accuracy"] < 0.2  # 10 classes: chance at the start
    assert rounds[-1]["accuracy"] > 0.75
    for r in rounds:
        assert r["uplink_bytes"] * 10 < r["fp32_bytes_each_way"]  # top-5 % + int8 + zstd: over 10x
        assert r["downlink_bytes"] * 3 < r["fp32_bytes_each_way"]  # int8 + zstd deltas: over 3x

    fp32 = run_example("plain_fedavg.py", tmp_path, "--rounds", "8", "--uplink", "identity", "--downlink", "identity")
    assert all(r["uplink_bytes"] > r["fp32_bytes_each_way"] for r in fp32["rounds"])  # FP32 plus blob headers
    assert rounds[-1]["accuracy"] > fp32["rounds"][-1]["accuracy"] - 0.05  # compression costs little accuracy


def test_distributed_fedavg_over_gloo_learns_and_keeps_replicas_identical(tmp_path: Path) -> None:
    summary = run_example("distributed_fedavg.py", tmp_path, "--processes", "3", "--rounds", "8")
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == list(range(1, 9))
    assert rounds[-1]["accuracy"] > 0.75 and rounds[-1]["accuracy"] > rounds[0]["accuracy"]
    assert summary["replicas_in_sync"] is True  # every process applied the same decoded mean
    for r in rounds:
        assert len(r["bytes_sent"]) == 3  # one blob from each process, received by every process
        assert all(0 < b * 10 < summary["fp32_bytes"] for b in r["bytes_sent"])


def test_ddp_hook_converges_and_sends_several_times_fewer_bytes(tmp_path: Path) -> None:
    summary = run_example("ddp_hook.py", tmp_path, "--processes", "2", "--steps", "150")
    losses = summary["losses"]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.2 * first, (first, last)
    assert summary["replicas_in_sync"] is True
    assert summary["buckets_encoded"] >= 150  # at least one bucket per step went through the hook
    assert summary["fp32_bytes"] >= 5 * summary["bytes_sent"] > 0
    assert summary["ratio"] == pytest.approx(summary["fp32_bytes"] / summary["bytes_sent"])


def test_ddp_hook_with_a_lossless_codec_matches_plain_ddp(tmp_path: Path) -> None:
    hooked = run_example("ddp_hook.py", tmp_path, "--steps", "15", "--codec", "identity")
    plain = run_example("ddp_hook.py", tmp_path, "--steps", "15", "--codec", "")
    assert plain["buckets_encoded"] == 0 and hooked["buckets_encoded"] >= 15
    # the mean of the decoded FP32 buckets is DDP's all-reduce average up to float rounding
    assert hooked["losses"] == pytest.approx(plain["losses"], rel=1e-4, abs=1e-6)


# ----------------------------------------------------------------------------- fedsqueeze.codecs.ddp pieces


def test_ddp_hook_config_refuses_a_bad_codec_when_made() -> None:
    from fedsqueeze.codecs.ddp import CodecHookConfig, CodecHookState

    with pytest.raises(ValueError, match="topk"):
        CodecHookConfig("topk(ratio=2)")
    state = CodecHookState("quantize(bits=8)")  # a spec alone takes the defaults
    assert state.config.error_feedback and state.ratio == 0.0


def test_a_bucket_blob_of_the_wrong_size_is_refused_naming_the_rank() -> None:
    import torch

    from fedsqueeze.codecs import parse
    from fedsqueeze.codecs.ddp import _decode_bucket

    blob = parse("quantize(bits=8)").encode({"bucket": torch.ones(10)})
    assert torch.allclose(_decode_bucket(blob, 10, source=1), torch.ones(10))
    with pytest.raises(ValueError, match=r"rank 1 sent .*expected 'bucket' of 12"):
        _decode_bucket(blob, 12, source=1)
    other = parse("identity").encode({"weights": torch.ones(10)})
    with pytest.raises(ValueError, match="rank 3 sent a bucket blob holding {'weights': \\(10,\\)}"):
        _decode_bucket(other, 10, source=3)


def test_all_gather_bytes_returns_the_blob_in_a_group_of_one() -> None:
    import torch.distributed as dist

    from fedsqueeze.codecs.ddp import all_gather_bytes

    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        assert all_gather_bytes(b"\x00fedsqueeze\xff") == [b"\x00fedsqueeze\xff"]
        with pytest.raises(ValueError, match="non-empty blob, found 0 bytes"):
            all_gather_bytes(b"")
    finally:
        dist.destroy_process_group()
