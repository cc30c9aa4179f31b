"""Traffic metering: every train and evaluate message, its bytes on the wire and its FP32 equivalent."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import torch
from flwr.app import ArrayRecord, Message, MetricRecord, RecordDict

from fedsqueeze.framing import wire_bytes
from fedsqueeze.protocol import ENCODE_TIME_METRIC, PAYLOAD_KEY, tensors_to_arrays

__all__ = ["TrafficRecord", "TrafficMeter", "Direction", "UP", "DOWN"]

Direction = Literal["up", "down"]
#: Directions in :class:`TrafficRecord`: server to node, node to server.
DOWN: Direction = "down"
UP: Direction = "up"


@dataclass(frozen=True)
class TrafficRecord:
    """One message on the wire.

    Parameters
    ----------
    round : int
        Server round (from 1).
    node_id : int
        The node the message went to (down) or came from (up).
    direction : str
        :data:`DOWN` or :data:`UP`.
    message_type : str
        Flower message type (``"train"``, ``"evaluate"``, ...).
    kind : str
        ``"full"`` or ``"delta"`` (fedsqueeze payloads), ``"plain"`` (no fedsqueeze payload),
        ``"error"`` (an error reply) or ``"rejected"`` (a reply the server dropped).
    bytes : int
        Wire size, see :func:`fedsqueeze.framing.wire_bytes`.
    fp32_bytes : int
        Wire size of the same message with a plain FP32 ArrayRecord instead of the payload
        (what Flower without fedsqueeze would have sent).
    payload_bytes : int
        Codec blob bytes inside the message (0 for plain and error messages).
    """

    round: int
    node_id: int
    direction: Direction
    message_type: str
    kind: str
    bytes: int
    fp32_bytes: int
    payload_bytes: int


@dataclass
class TrafficMeter:
    """Records every message measured so far, in order (:attr:`records`)."""

    records: list[TrafficRecord] = field(default_factory=list)

    def record(
        self,
        server_round: int,
        node_id: int,
        direction: Direction,
        msg: Message,
        kind: str,
        *,
        size: int,
        fp32_bytes: int,
        payload_bytes: int = 0,
    ) -> None:
        """Add one message (``size`` from :func:`wire_bytes`, measured when it crossed)."""
        self.records.append(
            TrafficRecord(
                server_round, node_id, direction, msg.metadata.message_type, kind, size, fp32_bytes, payload_bytes
            )
        )

    def record_plain(self, server_round: int, node_id: int, direction: Direction, msg: Message) -> None:
        """Add a message that fedsqueeze did not touch: its FP32 size is its size."""
        size = wire_bytes(msg)
        kind = "error" if msg.has_error() else "plain"
        self.record(server_round, node_id, direction, msg, kind, size=size, fp32_bytes=size)

    def of_round(self, server_round: int) -> list[TrafficRecord]:
        """The records of one round."""
        return [t for t in self.records if t.round == server_round]


def fp32_reply_bytes(reply: Message, weights: Mapping[str, torch.Tensor], key: str) -> int:
    """Size of the reply a plain Flower ClientApp would have sent: FP32 arrays, no fedsqueeze.

    Its records are the reply's own, without the payload record and the payload metrics,
    plus ``weights`` (floats as FP32) under ``key``.
    """
    if reply.has_error():
        return wire_bytes(reply)
    content = RecordDict()
    for name, record in reply.content.items():
        if name == PAYLOAD_KEY or isinstance(record, ArrayRecord):
            continue
        content[name] = _without_payload_metrics(record) if isinstance(record, MetricRecord) else record
    content[key] = tensors_to_arrays({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
    return wire_bytes(Message(metadata=reply.metadata, content=content))  # type: ignore[call-overload]


def _without_payload_metrics(record: MetricRecord) -> MetricRecord:
    return MetricRecord({k: v for k, v in record.items() if k != ENCODE_TIME_METRIC})
