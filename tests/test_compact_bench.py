"""Smoke test of the compact-model benchmark (tiny teacher, one epoch of everything)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedsqueeze.simulation import compact_bench


def test_compact_bench_writes_every_student_and_runtime(
    mnist_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")
    args = ["--data-dir", str(mnist_path), "--out", str(tmp_path), "--teacher-epochs", "1", "--train-limit", "2000"]
    args += ["--proxy-size", "600", "--epochs", "1", "--strided-epochs", "1", "--qat-epochs", "1"]
    assert compact_bench.main([*args, "--latency-runs", "50"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    models = report["models"]
    expected = {"teacher", "l1_kd", "l1_kd_hints", "sens_kd", "sens_iter_kd", "l1_kd_ptq4", "l1_kd_lsq4"}
    expected |= {"l1_kd_ptq2", "l1_kd_lsq2", "strided_kd", "strided_kd_lsq4", "strided_kd_lsq842"}
    assert set(models) == expected
    for name, row in models.items():
        runtimes = {"torchscript", "ort", "ort_fused", "ort_packed"} | (
            {"ort_int_kernels"} if ("ptq" in name or "lsq" in name) else set()
        )
        assert set(row["latency_us"]) == runtimes and all(v > 0 for v in row["latency_us"].values())
        assert set(row["accuracy"]) == runtimes
        assert row["pt_bytes"] == (tmp_path / f"{name}.pt").stat().st_size
    # packed low-bit weights: fewer bytes as the bits go down; the same parameters
    assert models["l1_kd"]["pt_bytes"] > models["l1_kd_lsq4"]["pt_bytes"] > models["l1_kd_lsq2"]["pt_bytes"]
    assert models["l1_kd"]["params"] == models["l1_kd_lsq4"]["params"]
    pruning = report["pruning"]
    assert models["sens_kd"]["params"] <= pruning["budget_params"] == models["l1_kd"]["params"]
    assert set(pruning["sens_ratios"]) == {"conv1", "conv2", "fc1", "fc2"} and len(pruning["sens_iter_history"]) == 2
    assert "| strided_kd |" in capsys.readouterr().out


def test_compact_bench_only_strided_writes_packed_files(
    mnist_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("onnxruntime", reason="the onnx extra (onnx, onnxruntime) is not installed")
    args = ["--data-dir", str(mnist_path), "--out", str(tmp_path), "--teacher-epochs", "1", "--train-limit", "2000"]
    args += ["--proxy-size", "600", "--strided-epochs", "1", "--qat-epochs", "1", "--only-strided"]
    assert compact_bench.main([*args, "--latency-runs", "20"]) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    models = report["models"]
    assert set(models) == {"teacher", "strided_kd", "strided_kd_lsq4", "strided_kd_lsq842"} and report["pruning"] == {}
    for name, row in models.items():
        assert row["onnx_packed_bytes"] == (tmp_path / f"{name}_packed.onnx").stat().st_size
        assert row["latency_us"]["ort_packed"] > 0 and 0.9 <= row["packed_agreement"] <= 1.0
    packed = {name: row["onnx_packed_bytes"] for name, row in models.items()}
    # weights at their bit width: fewer bytes as the bits drop, fewer than the int8-container files
    assert packed["teacher"] > packed["strided_kd"] > packed["strided_kd_lsq4"] > packed["strided_kd_lsq842"]
    assert all(packed[k] < models[k]["onnx_fused_bytes"] for k in ("strided_kd_lsq4", "strided_kd_lsq842"))
    assert "| strided_kd_lsq842 |" in capsys.readouterr().out
