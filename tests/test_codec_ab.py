"""The A/B codec benchmark loads another checkout's codecs beside this one and times both."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fedsqueeze.codecs as this_codecs
from fedsqueeze.simulation.codec_ab import compare, load_codecs

ROOT = Path(__file__).resolve().parents[1]


def test_another_checkouts_codecs_load_apart_and_both_sides_are_timed() -> None:
    other = load_codecs(ROOT, name="codecs_ab_test_copy")  # this checkout, loaded a second time
    assert other is not this_codecs and other.parse is not this_codecs.parse
    update = {"w": torch.randn(40, 30, generator=torch.Generator().manual_seed(0))}
    # the copy reads what this package writes (the same format, two registries), to the same values
    blob = this_codecs.parse("quantize(bits=8)").encode(update)
    assert torch.equal(other.decode(blob)["w"], this_codecs.decode(blob)["w"])
    text = compare(other, update, "svd(rank=2) | quantize(bits=4) | zstd", repeats=3)
    assert "| before |" in text and "| this checkout |" in text
    assert "this checkout / before: encode time" in text


def test_a_folder_without_codecs_is_refused_with_what_was_expected(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="expected the root of a fedsqueeze checkout"):
        load_codecs(tmp_path)
