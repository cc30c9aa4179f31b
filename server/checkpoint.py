"""The ServerApp's state after each round, so that a killed run can go on from its last complete round.

``<results-dir>/checkpoint.pt`` holds, after round r: r, the global model, the compression strategy
(downlink reference and steps, server error feedback, per-node versions, the codec's random
generator, node order, traffic and rejections so far, the inner strategy with its own state, e.g.
FedAdam's moments), the results writer (rows of ``rounds.csv`` and ``messages.csv`` so far) and the
random states of Python, NumPy and torch. It is written to a temporary file and renamed, so a kill
while writing leaves the previous checkpoint whole.

The file is a pickle (``torch.save`` of whole objects): it is the server's own file, written and
read on the same machine, never anything received over the network.

What a resumed run cannot restore is on the nodes: a resumed run is a new Flower run, and a node's
``context.state`` (its uplink error-feedback residual and the model version it holds) belongs to a
run. So the server forgets which versions nodes hold (they get a catch-up from the first model, or the
full model) and each node's first uplink after the resume starts without the residual that its lossy
uplink codec had carried. With a lossless uplink codec and downlink codec the resumed run is the
uninterrupted one.
"""

from __future__ import annotations

import os
import pickle
import random
import types
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedsqueeze.server.results import ResultsWriter
from fedsqueeze.server.strategy import CompressedStrategy

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "save_checkpoint", "load_checkpoint", "RoundOffset"]

#: The checkpoint's name in the results folder.
CHECKPOINT_FILE = "checkpoint.pt"

#: Run-config keys a resumed run may change; any other difference from the checkpointed run is refused.
RESUMABLE_CHANGES = frozenset({"resume", "num-server-rounds", "round-timeout"})


class _Pickler(pickle.Pickler):
    """Pickles memoryviews as bytes.

    Flower keeps memoryview pieces in an ArrayRecord once it has hashed it (sent it, or measured it
    for the FP32 byte count), and such a record held by this strategy or the inner one (FedAdam's
    ``current_arrays``) would not pickle otherwise; the pieces read back as bytes work the same.
    """

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, memoryview):
            return bytes, (obj.tobytes(),)
        return NotImplemented


#: What torch.save needs of a pickle module, with :class:`_Pickler`.
_PICKLE_MODULE = types.ModuleType("fedsqueeze_checkpoint_pickle")
_PICKLE_MODULE.Pickler = _Pickler  # type: ignore[attr-defined]
_PICKLE_MODULE.dump = pickle.dump  # type: ignore[attr-defined]


@dataclass
class Checkpoint:
    """The ServerApp's state after ``round``."""

    round: int
    arrays: ArrayRecord
    strategy: CompressedStrategy
    results: ResultsWriter
    random_states: dict[str, Any]


def save_checkpoint(
    server_round: int, arrays: ArrayRecord, strategy: CompressedStrategy, results: ResultsWriter
) -> Path:
    """Write the state after ``server_round`` to ``<results dir>/checkpoint.pt`` (atomically); return the path."""
    sent, strategy._sent = strategy._sent, []  # the round's messages are done with; Messages do not pickle
    try:
        state = Checkpoint(
            server_round,
            arrays,
            strategy,
            results,
            {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
        )
        path = results.dir / CHECKPOINT_FILE
        partial = path.with_name(path.name + ".partial")
        torch.save(state, partial, pickle_module=_PICKLE_MODULE)
        os.replace(partial, path)
    finally:
        strategy._sent = sent
    return path


def load_checkpoint(results_dir: str | Path, config: dict[str, Any]) -> Checkpoint:
    """Read the checkpoint of ``results_dir``, check it belongs to the same run config, restore random states.

    Also makes the strategy forget the model versions nodes held (see the module docstring).

    Raises
    ------
    FileNotFoundError
        If there is no checkpoint (the message says where it looked).
    ValueError
        If the checkpointed run's config differs from ``config`` in a key other than
        :data:`RESUMABLE_CHANGES` (the message names each, checkpoint against now).
    """
    path = Path(results_dir).expanduser() / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume = true, but there is no checkpoint at {path}: start the run without resume")
    state: Checkpoint = torch.load(path, weights_only=False)  # the server's own file, see the module docstring
    differ = {
        k: (state.results.config.get(k), v)
        for k, v in config.items()
        if k not in RESUMABLE_CHANGES and state.results.config.get(k) != v
    }
    if differ:
        detail = ", ".join(f"{k}: checkpoint {old!r}, now {new!r}" for k, (old, new) in differ.items())
        raise ValueError(f"cannot resume {path}: the run config differs ({detail})")
    random.setstate(state.random_states["python"])
    np.random.set_state(state.random_states["numpy"])
    torch.set_rng_state(state.random_states["torch"])
    state.strategy.downlink_state.forget_all()
    state.results.config = dict(config)
    return state


class RoundOffset(Strategy):
    """A strategy seen ``offset`` rounds later: Flower's ``start`` counts rounds from 1, a resumed run does not."""

    def __init__(self, inner: Strategy, offset: int) -> None:
        self.inner, self.offset = inner, offset

    def summary(self) -> None:
        """The inner strategy's summary."""
        self.inner.summary()

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's, ``offset`` rounds later."""
        return self.inner.configure_train(server_round + self.offset, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The inner strategy's, ``offset`` rounds later."""
        return self.inner.aggregate_train(server_round + self.offset, replies)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The inner strategy's, ``offset`` rounds later."""
        return self.inner.configure_evaluate(server_round + self.offset, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """The inner strategy's, ``offset`` rounds later."""
        return self.inner.aggregate_evaluate(server_round + self.offset, replies)
