"""Short runs of the fuzzing campaigns (simulation/fuzz_codecs.py).

Decoder: nothing but CodecError may escape. Encoder: every input encodes consistently or is
refused with a ValueError or TypeError.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

from fedsqueeze.simulation.fuzz_codecs import parse_blob, seed_blobs, serialize


def run_campaign(tmp_path: pathlib.Path, *args: str) -> dict[str, object]:
    command = [sys.executable, "-m", "fedsqueeze.simulation.fuzz_codecs", "--out", str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=dict(os.environ), check=False)
    report = json.loads((tmp_path / "report.json").read_text())
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return report


def test_the_blob_model_round_trips_every_seed() -> None:
    # the structure-aware mutations start from parsed blobs: parsing must lose nothing
    for blob in seed_blobs():
        model = parse_blob(blob)
        if not model.compressed:
            assert serialize(model) == blob
        assert parse_blob(serialize(model)) == model


def test_short_structure_and_byte_campaign_sees_only_codec_errors(tmp_path: pathlib.Path) -> None:
    report = run_campaign(tmp_path, "--inputs", "6000", "--progress", "2000", "--seed", "7")
    assert report["inputs"] == 6000 and report["finished"] is True
    assert report["non_codec_error_outcomes"] == 0, report
    outcomes = report["outcomes"]
    assert isinstance(outcomes, dict)
    assert set(outcomes) == {"decode: CodecError", "decode: ok", "parse: ValueError", "parse: ok"}
    assert outcomes["decode: ok"] > 100  # the mutations are not all rejected at the header
    assert not (tmp_path / "failures").exists()


def test_short_coverage_guided_campaign_sees_only_codec_errors(tmp_path: pathlib.Path) -> None:
    if importlib.util.find_spec("atheris") is None:  # optional: then the mode must say so, not crash
        command = [
            sys.executable,
            "-m",
            "fedsqueeze.simulation.fuzz_codecs",
            "--mode",
            "atheris",
            "--out",
            str(tmp_path),
        ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2 and "atheris is not installed" in done.stderr
        return
    report = run_campaign(tmp_path, "--mode", "atheris", "--inputs", "3000", "--progress", "500")
    # libFuzzer decides how it counts its initial corpus: the report is rewritten every 500 inputs
    assert isinstance(report["inputs"], int) and report["inputs"] >= 2500, report
    assert report["non_codec_error_outcomes"] == 0, report


def test_short_encoder_campaign_keeps_every_promise(tmp_path: pathlib.Path) -> None:
    report = run_campaign(tmp_path, "--mode", "encode", "--inputs", "300", "--progress", "100", "--seed", "5")
    assert report["inputs"] == 300 and report["finished"] is True
    assert report["non_codec_error_outcomes"] == 0, report
    outcomes = report["outcomes"]
    assert isinstance(outcomes, dict)
    assert not any("failure" in key for key in outcomes), outcomes
    feedback_ok = sum(n for key, n in outcomes.items() if key.startswith("encode error feedback: ok"))
    assert outcomes["encode: ok"] > 150 and feedback_ok > 150  # most inputs encode
    assert any(key.startswith("encode non-finite: ValueError") for key in outcomes)  # NaN/inf is refused
    assert not (tmp_path / "failures").exists()
