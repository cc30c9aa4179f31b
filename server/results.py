"""Write a run's results (rounds.csv, messages.csv, summary.json, distill.csv, compact.json); log each round.

Files in ``results-dir`` (overwritten by each run):

``rounds.csv``
    One row per server round (1..N), written as the round ends:

    - ``round``: server round, from 1.
    - ``accuracy``, ``loss``: the global model after the round, on the whole test set
      (centralized evaluation on the server).
    - ``uplink_bytes``, ``downlink_bytes``: bytes of every message of the round from the
      nodes to the server and back (train messages, and evaluate messages when federated
      evaluation is on), as counted by :func:`fedsqueeze.framing.wire_bytes`.
    - ``uplink_fp32_bytes``, ``downlink_fp32_bytes``: the same messages as plain Flower
      would have sent them, with the model as an FP32 ArrayRecord.
    - ``uplink_payload_bytes``, ``downlink_payload_bytes``: the codec blobs inside those
      messages; the rest is Flower's framing (records, object ids, metadata). Wire sizes vary
      by a few bytes from run to run because Flower draws random 64-bit node ids, whose
      protobuf varints differ in length; payload sizes do not.
    - ``cumulative_uplink_bytes``, ``cumulative_downlink_bytes``, ``cumulative_bytes``,
      ``cumulative_fp32_bytes``: running totals up to and including the round.
    - ``replies``, ``rejected``: train replies received, and how many of them were dropped.
    - ``downlink_lag``: ||global - R|| / ||global||, how far the reference ``R`` that up-to-date
      nodes hold (and train from) trails the server's model after the round's downlink step;
      0 with a lossless downlink. A lag that keeps growing means the downlink codec carries less
      than the aggregated updates move the model (see :mod:`fedsqueeze.server.downlink`).
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
    ``reason`` of each dropped reply) and ``wall_seconds``; with server-side distillation
    also ``compact``, the content of ``compact.json``. When the wire was measured (e.g. by a
    counting proxy in front of the SuperLink, see :func:`add_wire_measurement`), ``wire``: the
    measured bytes, each as ``{"up": .., "down": ..}``, of ``message_bodies`` (what
    ``totals`` models), ``http_headers``, ``idle`` (heartbeats and polls that found nothing),
    ``fab_download`` and ``control`` (every other body), plus ``measured_over_reported``.

Files written only with server-side distillation on (``distill-every`` > 0; a run without
it deletes ``distill.csv`` and ``compact.json`` left by an earlier run in the same folder):

``distill.csv``
    One row per distillation (every ``distill-every`` rounds and at the last round), written
    right after the round's row of ``rounds.csv``:

    - ``round``: the server round whose aggregated global model was distilled.
    - ``student_accuracy``, ``student_loss``: the distilled student (FP32, in memory) on the
      whole test set; ``student_accuracy_before``: the same student right after it was built
      from the global model (pruned and factored), before distillation.
    - ``global_accuracy``: the global model (the teacher), as in ``rounds.csv``.
    - ``student_params``, ``teacher_params``: parameter counts.
    - ``teachers``: models whose logits were averaged (1, or 1 + the round's accepted client
      models with ``distill-ensemble``); ``proxy_samples``: proxy images used.
    - ``final_distill_loss``: mean distillation loss (KL * T^2) of the last epoch.
    - ``distill_seconds``: the distillation itself (teacher inference and student training);
      ``seconds``: with building and evaluating the student. ``round_seconds`` in
      ``rounds.csv`` leaves this time out (the next round's clock starts after it);
      ``elapsed_seconds`` includes it.

``compact.json``
    Written at the end of the run; the student of the last distillation (the last round) and
    its teacher, the final global model, exported to ``compact/`` (``teacher_fp32.pt`` and
    ``.safetensors``; ``student_int8`` or, with ``student-bits`` 32, ``student_fp32``):

    - ``teacher``, ``student``: ``params``, ``bits``, ``torchscript_file`` and
      ``safetensors_file`` (relative to ``results-dir``), ``torchscript_bytes``,
      ``safetensors_bytes``, ``file_test_accuracy`` (the TorchScript file loaded back, on the
      whole test set, raw pixels in), ``latency_us_batch1_1thread`` and
      ``latency_us_batch1_1thread_no_onednn`` (median CPU time of one forward pass of the
      loaded file on one image, one thread). The student also has ``round``,
      ``test_accuracy_in_memory``, ``test_accuracy_before_distill``, ``teachers``,
      ``distill_seconds``, ``student_arch`` (``pruned`` or ``strided``), ``config`` (the
      :class:`~fedsqueeze.server.compact.CompactConfig`, or the strided student's ``widths``) and ``layers``.
    - With ``distill-onnx``, ``teacher`` and ``student`` also have ``onnx_file``, ``onnx_bytes``,
      ``onnx_test_accuracy`` and ``onnx_latency_us_batch1_1thread`` (``{name}.onnx``, int8 Q/DQ, in
      onnxruntime) and the same four ``onnx_packed_*`` (``{name}_packed.onnx``: weights packed at
      their bit width, fused), and ``onnx_packed_size_ratio`` is the teacher's ``.onnx`` bytes over
      the student's packed file's.
    - ``distill``: the distillation settings; ``size_ratio`` (teacher over student TorchScript
      bytes), ``params_ratio``, ``accuracy_drop_points`` (teacher minus student file accuracy,
      in percentage points).
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

__all__ = [
    "ROUND_COLUMNS",
    "MESSAGE_COLUMNS",
    "DISTILL_COLUMNS",
    "ResultsWriter",
    "human_bytes",
    "add_wire_measurement",
]

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
    "downlink_lag",
    "client_encode_seconds",
    "client_train_seconds",
    "round_seconds",
    "elapsed_seconds",
]
MESSAGE_COLUMNS = ["round", "node_id", "direction", "message_type", "kind", "bytes", "fp32_bytes", "payload_bytes"]
DISTILL_COLUMNS = [
    "round",
    "student_accuracy",
    "student_loss",
    "student_accuracy_before",
    "global_accuracy",
    "student_params",
    "teacher_params",
    "teachers",
    "proxy_samples",
    "final_distill_loss",
    "distill_seconds",
    "seconds",
]


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
        self.distillations: list[dict[str, Any]] = []
        for stale in ("distill.csv", "compact.json"):  # written only by runs that distil
            (self.dir / stale).unlink(missing_ok=True)

    def resume_files(self) -> None:
        """Rewrite ``rounds.csv`` and ``messages.csv`` from the rows held (a resumed run's checkpoint), and go on
        timing from the last row's ``elapsed_seconds`` (a killed run's rounds after its checkpoint are dropped)."""
        with open(self.dir / "rounds.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(ROUND_COLUMNS)
            # rows from an older checkpoint may lack newer columns
            writer.writerows([row.get(c, "") for c in ROUND_COLUMNS] for row in self.rounds)
        with open(self.dir / "messages.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(MESSAGE_COLUMNS)
            writer.writerows([getattr(t, c) for c in MESSAGE_COLUMNS] for t in self.messages)
        elapsed = float(self.rounds[-1]["elapsed_seconds"]) if self.rounds else 0.0
        self._last = time.perf_counter()
        self._start = self._last - elapsed

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
        downlink_lag: float = 0.0,
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
            "downlink_lag": float(f"{downlink_lag:.4g}"),
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

    def log_distillation(self, row: Mapping[str, Any]) -> None:
        """Append one row to ``distill.csv`` (created with its header on the first call).

        The next round's ``round_seconds`` is measured from this call on, so that it leaves
        the distillation out.

        Parameters
        ----------
        row : Mapping[str, Any]
            A value for each of :data:`DISTILL_COLUMNS` (None is written as an empty cell).
        """
        missing = [c for c in DISTILL_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"distillation row lacks {missing}; expected the columns {DISTILL_COLUMNS}")
        path = self.dir / "distill.csv"
        with open(path, "a" if self.distillations else "w", newline="") as f:
            writer = csv.writer(f)
            if not self.distillations:
                writer.writerow(DISTILL_COLUMNS)
            writer.writerow(["" if row[c] is None else row[c] for c in DISTILL_COLUMNS])
        self.distillations.append(dict(row))
        self._last = time.perf_counter()

    def write_compact(self, report: Mapping[str, Any]) -> Path:
        """Write ``compact.json`` (the exported teacher and student, see the module docstring); return its path."""
        path = self.dir / "compact.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        return path

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


#: The parts of a wire measurement that ``summary.json`` reports under ``wire``.
WIRE_SECTIONS = ("message_bodies", "http_headers", "idle", "fab_download", "control")


def add_wire_measurement(results_dir: str | Path, wire: Mapping[str, Mapping[str, int]]) -> dict[str, Any]:
    """Add bytes measured on the wire to an existing ``summary.json``, and return its ``wire`` entry.

    Parameters
    ----------
    results_dir : str or Path
        The run's results folder, which holds ``summary.json``.
    wire : mapping
        Each of :data:`WIRE_SECTIONS` -> ``{"up": bytes, "down": bytes}``; ``up`` is node to SuperLink.

    Raises
    ------
    ValueError
        If a section or direction is missing, or a count is not a non-negative int.
    """
    entry: dict[str, Any] = {}
    for section in WIRE_SECTIONS:
        counts = wire.get(section)
        if not isinstance(counts, Mapping) or set(counts) != {"up", "down"}:
            raise ValueError(f"wire measurement {section!r} must map 'up' and 'down' to bytes, got {counts!r}")
        if not all(isinstance(v, int) and v >= 0 for v in counts.values()):
            raise ValueError(f"wire measurement {section!r} must hold non-negative ints, got {dict(counts)!r}")
        entry[section] = {"up": counts["up"], "down": counts["down"]}
    path = Path(results_dir) / "summary.json"
    summary = json.loads(path.read_text())
    totals = summary["totals"]
    entry["measured_over_reported"] = {
        "up": entry["message_bodies"]["up"] / max(totals["uplink_bytes"], 1),
        "down": entry["message_bodies"]["down"] / max(totals["downlink_bytes"], 1),
    }
    summary["wire"] = entry
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return entry
