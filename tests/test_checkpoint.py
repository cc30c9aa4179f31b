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
