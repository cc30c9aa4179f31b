"""The ServerApp's checkpoint: written whatever Flower has done to the records it holds."""

from __future__ import annotations

from pathlib import Path

import torch
from flwr.serverapp.strategy import FedAdam

from fedsqueeze.models import first_model
from fedsqueeze.protocol import arrays_to_tensors, tensors_to_arrays
from fedsqueeze.server.checkpoint import save_checkpoint
from fedsqueeze.server.results import ResultsWriter
from fedsqueeze.server.strategy import CompressedStrategy


def test_records_that_flower_has_hashed_are_checkpointed(tmp_path: Path) -> None:
    """Regression: once Flower hashes an ArrayRecord (to send it or to count its bytes) it holds
    memoryview pieces, and torch.save raised "cannot pickle memoryview objects": a round with no
    accepted reply, which keeps the sent model as the global one, crashed the ServerApp."""
    weights = first_model("lenet5", "mnist", 0)
    arrays = tensors_to_arrays(weights)
    inner = FedAdam()
    inner.current_arrays = tensors_to_arrays(weights)
    assert arrays.object_id and inner.current_arrays.object_id  # hashed, as sending does
    strategy = CompressedStrategy(inner, uplink="zstd", downlink="zstd")
    results = ResultsWriter(tmp_path, {"seed": 0})
    path = save_checkpoint(1, arrays, strategy, results)
    state = torch.load(path, weights_only=False)
    for restored in (state.arrays, state.strategy.inner.current_arrays):
        got = arrays_to_tensors(restored)
        assert got.keys() == weights.keys()
        assert all(torch.equal(got[k], weights[k]) for k in weights)


def test_resumed_rows_from_an_older_checkpoint_are_written_with_newer_columns_blank(tmp_path: Path) -> None:
    import csv

    from fedsqueeze.server.results import ROUND_COLUMNS

    results = ResultsWriter(tmp_path, {})
    row = results.log_round(1, 0.5, 1.0, [], replies=2, rejected=0, downlink_lag=0.125)
    older = {k: v for k, v in row.items() if k != "downlink_lag"}  # as a checkpoint from before the column
    results.rounds = [older, row]
    results.resume_files()
    with open(tmp_path / "rounds.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ROUND_COLUMNS
    assert [r["downlink_lag"] for r in rows] == ["", "0.125"]
