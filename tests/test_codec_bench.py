"""Smoke tests of the codec benchmark script: its quick mode, its CSV and its synthetic update."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from fedsqueeze.simulation import codec_bench


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_one_row_per_codec_with_consistent_ratios(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    codec_bench.main(["--quick", "--synthetic-params", "5000", "--max-encode-seconds", "0", "--out", str(tmp_path)])
    assert torch.get_num_threads() == threads  # the benchmark gives the thread setting back

    rows = _read_csv(tmp_path / "codec_bench.csv")
    assert [r["codec"] for r in rows] == list(codec_bench.DEFAULT_CODECS)
    assert {r["update"] for r in rows} == {"synthetic-5000"}
    for r in rows:
        assert r["status"] == "ok", r
        assert int(r["num_params"]) == 5000
        assert int(r["fp32_bytes"]) == 4 * 5000
        assert float(r["ratio"]) == pytest.approx(int(r["fp32_bytes"]) / int(r["bytes"]), rel=1e-9)
        assert float(r["bits_per_param"]) == pytest.approx(8 * int(r["bytes"]) / 5000, rel=1e-9)
        assert float(r["encode_mb_s"]) > 0 and float(r["decode_mb_s"]) > 0
        assert 0.0 <= float(r["rel_l2_error"]) and math.isfinite(float(r["rel_l2_error"]))

    by_codec = {r["codec"]: r for r in rows}
    assert float(by_codec["identity"]["rel_l2_error"]) == 0.0  # lossless baseline
    assert float(by_codec["identity | zstd"]["rel_l2_error"]) == 0.0
    assert float(by_codec["fp16"]["ratio"]) == pytest.approx(2.0, rel=0.05)

    markdown = (tmp_path / "codec_bench.md").read_text()
    assert markdown == capsys.readouterr().out.rstrip("\n") + "\n"  # what was printed is what was written
    assert "memcpy reference" in markdown and "--quick" in markdown
    for spec in codec_bench.DEFAULT_CODECS:
        assert "`" + spec.replace("|", "\\|") + "`" in markdown  # pipes escaped inside the table


def test_codecs_override_and_slow_codec_skip(tmp_path: Path) -> None:
    rows = codec_bench.main(
        [
            "--quick",
            "--codecs",
            "quantize(bits=8)  |  zstd",
            "svd(rank=2)",
            "--max-encode-seconds",
            "1e-9",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r.codec for r in rows] == ["quantize(bits=8) | zstd", "svd(rank=2)"]
    assert all(r.status.startswith("skipped") and r.bytes is None for r in rows)
    written = _read_csv(tmp_path / "codec_bench.csv")
    assert [r["status"] for r in written] == [r.status for r in rows]


def test_bad_codec_spec_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        codec_bench.main(["--quick", "--codecs", "quantize(bits=3)"])
    assert exc.value.code == 2
    assert "bits" in capsys.readouterr().err


@pytest.mark.parametrize("num_params", [1_000, 5_000, 123_457, 10_000_000])
def test_synthetic_shapes_add_up_exactly(num_params: int) -> None:
    shapes = codec_bench.synthetic_shapes(num_params)
    assert sum(math.prod(s) for s in shapes.values()) == num_params
    assert any(len(s) == 4 for s in shapes.values()) and any(len(s) == 2 for s in shapes.values())
    if num_params == 10_000_000:
        assert shapes["fc1.weight"] == (2560, 3840)


def test_synthetic_update_is_seeded_and_heavy_tailed() -> None:
    a = codec_bench.synthetic_update(50_000, seed=3)
    b = codec_bench.synthetic_update(50_000, seed=3)
    c = codec_bench.synthetic_update(50_000, seed=4)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == torch.float32 for k in a)
    assert not torch.equal(a["fc1.weight"], c["fc1.weight"])
    x = a["fc1.weight"].flatten().double()
    assert 5e-4 < float(x.std()) < 2e-3
    kurtosis = float(((x - x.mean()) ** 4).mean() / x.var() ** 2)
    assert kurtosis > 4.0  # heavier tails than a Gaussian (3)


def test_synthetic_shapes_reject_tiny_sizes() -> None:
    with pytest.raises(ValueError, match="at least|>= 1000"):
        codec_bench.synthetic_shapes(10)


def test_relative_l2_error() -> None:
    x = {"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0])}
    y = {"a": torch.tensor([3.0, 1.0]), "b": torch.tensor([4.0])}
    assert codec_bench.relative_l2_error(x, y) == pytest.approx(1 / 5)
    assert codec_bench.relative_l2_error(x, x) == 0.0


def test_budget_comparison_and_small_width_table_report_every_update() -> None:
    updates = {"a": codec_bench.synthetic_update(5000, seed=1), "b": codec_bench.synthetic_update(3000, seed=2)}
    table = codec_bench.budget_comparison(updates, [0.5], seed=0)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [(r[0], r[2]) for r in rows] == [("| a", "4 bits"), ("| a", "8 bits"), ("| b", "4 bits"), ("| b", "8 bits")]
    for r in rows:
        budget_bytes, uniform_bytes = int(r[3].replace(",", "")), int(r[-2].replace(",", ""))
        assert uniform_bytes >= budget_bytes  # the uniform codec gets at least the budget's bytes
    grid = codec_bench.small_width_table(updates).splitlines()
    assert len(grid) == 2 + 2 * len(updates)
    one_range, zero_aligned = (float(cell.split()[0]) for cell in grid[2].split(" | ")[2:4])
    assert zero_aligned < one_range  # 2-bit, heavy tails: one range is the worst grid


def test_budget_precision_reports_payload_over_target() -> None:
    updates = {"a": codec_bench.synthetic_update(20_000, seed=1)}
    table = codec_bench.budget_precision(updates, [0.5], ["topk | quantize | zstd", "svd | quantize | zstd"], seed=0)
    rows = [line.split(" | ") for line in table.splitlines()[2:]]
    assert [r[1] for r in rows] == [r"`topk \| quantize \| zstd`", r"`svd \| quantize \| zstd`"]
    for r in rows:
        target, payload, ratio = float(r[3].replace(",", "")), int(r[4].replace(",", "")), float(r[5])
        assert target == 0.5 * 20_000 / 8
        assert ratio == pytest.approx(payload / target, abs=1e-3)
        assert 0.9 < ratio < 1.1


def test_both_paths_on_two_sizes_give_equal_blobs_and_a_comparison_table(tmp_path: Path) -> None:
    spec = "topk(ratio=0.01) | quantize(bits=8) | zstd"
    argv = ["--quick", "--synthetic-params", "3000", "20000", "--codecs", spec, "--paths", "fused", "per-tensor"]
    rows = codec_bench.main([*argv, "--out", str(tmp_path)])
    assert [(r.update, r.path) for r in rows] == [
        ("synthetic-3000", "fused"),
        ("synthetic-3000", "per-tensor"),
        ("synthetic-20000", "fused"),
        ("synthetic-20000", "per-tensor"),
    ]
    assert rows[0].bytes == rows[1].bytes and rows[2].bytes == rows[3].bytes  # the same blob either way
    assert rows[0].rel_l2_error == rows[1].rel_l2_error
    markdown = (tmp_path / "codec_bench.md").read_text()
    table = markdown.split("## Fused against per-tensor")[1]
    assert "| synthetic-20000 | 20,000 |" in table and "memcpy" in table
    assert "SMALL_TARGETS" in markdown  # the small-update targets are checked on the fused rows
