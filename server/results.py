"""Write a run's results (rounds.csv, messages.csv, summary.json) and print one line per round.

Files in ``results-dir`` (overwritten by each run):

``rounds.csv``
    One row per server round (1..N), written as the round ends:

    - ``round``: server round, from 1.
    - ``accuracy``, ``loss``: the global model after the round, on the whole test set
      (centralized evaluation on the server).
    - ``uplink_bytes``, ``downlink_bytes``: bytes of every message of the round from the
      nodes to the server and back (train messages, and evaluate messages when federated
      evaluation is on), as counted by :func:`fedsqueeze.protocol.message_bytes`.
    - ``uplink_fp32_bytes``, ``downlink_fp32_bytes``: the same messages as plain Flower
      would have sent them, with the model as an FP32 ArrayRecord.
    - ``uplink_payload_bytes``, ``downlink_payload_bytes``: the codec blobs inside those
      messages; the rest is Flower's framing (records, object ids, metadata). Wire sizes vary
      by a few bytes from run to run because Flower draws random 64-bit node ids, whose
      protobuf varints differ in length; payload sizes do not.
    - ``cumulative_uplink_bytes``, ``cumulative_downlink_bytes``, ``cumulative_bytes``,
      ``cumulative_fp32_bytes``: running totals up to and including the round.
    - ``replies``, ``rejected``: train replies received, and how many of them were dropped.
    - ``client_encode_seconds``, ``client_train_seconds``: seconds the nodes spent encoding
      their update and training, summed over the accepted replies (as they reported them).
    - ``round_seconds``, ``elapsed_seconds``: wall time of the round, and since the start.

``messages.csv``
    One row per message, the rows of ``rounds.csv`` are sums of these:
    ``round, node_id, direction`` (``down`` server to node, ``up`` node to server),
    ``message_type`` (``train``, ``evaluate``), ``kind`` (``full``, ``delta``: fedsqueeze
    payloads; ``plain``: no payload; ``error``: an error reply; ``rejected``: a reply the
    server dropped), ``bytes``, ``fp32_bytes``, ``payload_bytes`` (the codec blobs alone).

``summary.json``
    ``config`` (the run config with defaults filled in), ``num_rounds``, ``num_nodes``,
    ``initial_accuracy``, ``initial_loss``, ``final_accuracy``, ``final_loss``,
    ``totals`` (``uplink_bytes``, ``downlink_bytes``, ``total_bytes`` and their
    ``*_fp32_bytes`` counterparts, ``messages``), ``ratios`` (FP32 bytes divided by actual
    bytes: ``uplink``, ``downlink``, ``total``), ``per_node`` (node id ->
    ``uplink_bytes``, ``downlink_bytes``), ``rejected`` (``round``, ``node_id``,
    ``reason`` of each dropped reply) and ``wall_seconds``.
"""

from __future__ import annotations

import csv
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict
from logging import INFO
from pathlib import Path
from typing import Any

from flwr.supercore import log

from fedsqueeze.server.strategy import DOWN, UP, Rejection, TrafficRecord

__all__ = ["ROUND_COLUMNS", "MESSAGE_COLUMNS", "ResultsWriter", "human_bytes"]

ROUND_COLUMNS = [
    "round",
    "accuracy",
    "loss",
    "uplink_bytes",
    "downlink_bytes",
    "uplink_fp32_bytes",
    "downlink_fp32_bytes",
    "uplink_payload_bytes",
    "downlink_payload_bytes",
    "cumulative_uplink_bytes",
    "cumulative_downlink_bytes",
    "cumulative_bytes",
    "cumulative_fp32_bytes",
    "replies",
    "rejected",
    "client_encode_seconds",
    "client_train_seconds",
    "round_seconds",
    "elapsed_seconds",
]
MESSAGE_COLUMNS = ["round", "node_id", "direction", "message_type", "kind", "bytes", "fp32_bytes", "payload_bytes"]


def human_bytes(n: float) -> str:
    """``1234567`` -> ``"1.23 MB"`` (decimal units)."""
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} GB"


class ResultsWriter:
    """Collect per-round results and write them to ``results_dir`` as they come.

    Parameters
    ----------
    results_dir : str or Path
        Folder for the files (created if missing; files in it are overwritten).
    config : Mapping[str, Any]
        The run config, stored in ``summary.json``.
    """

    def __init__(self, results_dir: str | Path, config: Mapping[str, Any]) -> None:
        self.dir = Path(results_dir).expanduser()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config = dict(config)
        self.rounds: list[dict[str, Any]] = []
        self.messages: list[TrafficRecord] = []
        self.initial: tuple[float, float] | None = None
        self._start = time.perf_counter()
        self._last = self._start
        with open(self.dir / "rounds.csv", "w", newline="") as f:
            csv.writer(f).writerow(ROUND_COLUMNS)
        with open(self.dir / "messages.csv", "w", newline="") as f:
            csv.writer(f).writerow(MESSAGE_COLUMNS)

    def start_clock(self) -> None:
        """Measure round times from now (call it right before the first round)."""
        self._start = self._last = time.perf_counter()

    def log_initial(self, accuracy: float, loss: float) -> None:
        """Record and print the evaluation of the initial model."""
        self.initial = (accuracy, loss)
        log(INFO, "fedsqueeze: initial model: accuracy %.4f, loss %.4f", accuracy, loss)

    def log_round(
        self,
        server_round: int,
        accuracy: float,
        loss: float,
        traffic: Iterable[TrafficRecord],
        replies: int,
        rejected: int,
        client_seconds: tuple[float, float] = (0.0, 0.0),
    ) -> dict[str, Any]:
        """Append the round's messages and its summary row, print one line, return the row."""
        now = time.perf_counter()
        traffic = list(traffic)
        up = [t for t in traffic if t.direction == UP]
        down = [t for t in traffic if t.direction == DOWN]
        previous = self.rounds[-1] if self.rounds else {}
        row: dict[str, Any] = {
            "round": server_round,
            "accuracy": accuracy,
            "loss": loss,
            "uplink_bytes": sum(t.bytes for t in up),
            "downlink_bytes": sum(t.bytes for t in down),
            "uplink_fp32_bytes": sum(t.fp32_bytes for t in up),
            "downlink_fp32_bytes": sum(t.fp32_bytes for t in down),
            "uplink_payload_bytes": sum(t.payload_bytes for t in up),
            "downlink_payload_bytes": sum(t.payload_bytes for t in down),
            "replies": replies,
            "rejected": rejected,
            "client_encode_seconds": round(client_seconds[0], 4),
            "client_train_seconds": round(client_seconds[1], 4),
            "round_seconds": round(now - self._last, 3),
            "elapsed_seconds": round(now - self._start, 3),
        }
        row["cumulative_uplink_bytes"] = previous.get("cumulative_uplink_bytes", 0) + row["uplink_bytes"]
        row["cumulative_downlink_bytes"] = previous.get("cumulative_downlink_bytes", 0) + row["downlink_bytes"]
        row["cumulative_bytes"] = row["cumulative_uplink_bytes"] + row["cumulative_downlink_bytes"]
        row["cumulative_fp32_bytes"] = (
            previous.get("cumulative_fp32_bytes", 0) + row["uplink_fp32_bytes"] + row["downlink_fp32_bytes"]
        )
        self._last = now
        self.rounds.append(row)
        self.messages.extend(traffic)
        with open(self.dir / "messages.csv", "a", newline="") as f:
            writer = csv.writer(f)
            for t in traffic:
                writer.writerow([getattr(t, c) for c in MESSAGE_COLUMNS])
        with open(self.dir / "rounds.csv", "a", newline="") as f:
            csv.writer(f).writerow([row[c] for c in ROUND_COLUMNS])
        fp32_round = row["uplink_fp32_bytes"] + row["downlink_fp32_bytes"]
        log(
            INFO,
            "fedsqueeze: round %d: accuracy %.4f, loss %.4f | up %s, down %s (FP32: %s) | "
            "cumulative %s (FP32: %s, %.1fx smaller) | %.1f s",
            server_round,
            accuracy,
            loss,
            human_bytes(row["uplink_bytes"]),
            human_bytes(row["downlink_bytes"]),
            human_bytes(fp32_round),
            human_bytes(row["cumulative_bytes"]),
            human_bytes(row["cumulative_fp32_bytes"]),
            row["cumulative_fp32_bytes"] / max(row["cumulative_bytes"], 1),
            row["round_seconds"],
        )
        return row

    def write_summary(self, rejected: Iterable[Rejection] = (), **extra: Any) -> dict[str, Any]:
        """Write ``summary.json`` from what was logged; ``extra`` items are added at the top level."""
        up = [t for t in self.messages if t.direction == UP]
        down = [t for t in self.messages if t.direction == DOWN]
        totals = {
            "uplink_bytes": sum(t.bytes for t in up),
            "downlink_bytes": sum(t.bytes for t in down),
            "uplink_fp32_bytes": sum(t.fp32_bytes for t in up),
            "downlink_fp32_bytes": sum(t.fp32_bytes for t in down),
            "messages": len(self.messages),
        }
        totals["total_bytes"] = totals["uplink_bytes"] + totals["downlink_bytes"]
        totals["total_fp32_bytes"] = totals["uplink_fp32_bytes"] + totals["downlink_fp32_bytes"]
        per_node: dict[str, dict[str, int]] = {}
        for t in self.messages:
            entry = per_node.setdefault(str(t.node_id), {"uplink_bytes": 0, "downlink_bytes": 0})
            entry["uplink_bytes" if t.direction == UP else "downlink_bytes"] += t.bytes
        last = self.rounds[-1] if self.rounds else {}
        summary: dict[str, Any] = {
            "config": self.config,
            "num_rounds": len(self.rounds),
            "num_nodes": len(per_node),
            "initial_accuracy": self.initial[0] if self.initial else None,
            "initial_loss": self.initial[1] if self.initial else None,
            "final_accuracy": last.get("accuracy"),
            "final_loss": last.get("loss"),
            "totals": totals,
            "ratios": {
                "uplink": totals["uplink_fp32_bytes"] / max(totals["uplink_bytes"], 1),
                "downlink": totals["downlink_fp32_bytes"] / max(totals["downlink_bytes"], 1),
                "total": totals["total_fp32_bytes"] / max(totals["total_bytes"], 1),
            },
            "per_node": per_node,
            "rejected": [asdict(r) for r in rejected],
            "wall_seconds": round(time.perf_counter() - self._start, 3),
        }
        summary.update(extra)
        (self.dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        log(
            INFO,
            "fedsqueeze: %d rounds, final accuracy %s; sent %s up and %s down, %s in all "
            "(FP32 would be %s: %.1fx); results in %s",
            summary["num_rounds"],
            f"{summary['final_accuracy']:.4f}" if summary["final_accuracy"] is not None else "n/a",
            human_bytes(totals["uplink_bytes"]),
            human_bytes(totals["downlink_bytes"]),
            human_bytes(totals["total_bytes"]),
            human_bytes(totals["total_fp32_bytes"]),
            summary["ratios"]["total"],
            self.dir.resolve(),
        )
        return summary
