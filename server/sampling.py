"""A node order that does not depend on node ids, so that a seeded sample picks the same nodes every run.

Flower's strategies sample nodes with ``random.sample(grid.get_node_ids(), k)``. Node ids are
random in simulation (and per SuperNode registration in deployment), so even a seeded draw
picks different data partitions from run to run. :class:`StableNodeOrder` asks each node once,
with a small ``query`` message that the client mod answers itself, for a stable key (its
``partition-id``, else its node id) and presents the nodes sorted by that key.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from fedsqueeze.framing import wire_bytes
from fedsqueeze.protocol import HELLO, PAYLOAD_KEY, stable_key_of
from fedsqueeze.server.traffic import DOWN, UP, TrafficMeter

__all__ = ["StableNodeOrder"]

#: Seconds to wait for the nodes' answers to the one-time query.
QUERY_TIMEOUT = 120.0


@dataclass
class StableNodeOrder:
    """Node id -> stable key, learned once per node; unanswered nodes sort after the others by id."""

    keys: dict[int, tuple[int, int]] = field(default_factory=dict)

    def grid(self, grid: Grid, server_round: int, meter: TrafficMeter) -> Grid:
        """``grid`` with :meth:`get_node_ids` in stable-key order (asking nodes seen for the first time)."""
        ids = list(grid.get_node_ids())
        unknown = [i for i in ids if i not in self.keys]
        if unknown:
            self._ask(grid, unknown, server_round, meter)
        return _OrderedGrid(grid, self.keys)  # type: ignore[return-value]

    def _ask(self, grid: Grid, node_ids: list[int], server_round: int, meter: TrafficMeter) -> None:
        messages = [
            Message(
                RecordDict({PAYLOAD_KEY: ConfigRecord({"kind": HELLO})}), dst_node_id=i, message_type=MessageType.QUERY
            )
            for i in node_ids
        ]
        for msg in messages:
            size = wire_bytes(msg)
            meter.record(server_round, msg.metadata.dst_node_id, DOWN, msg, "hello", size=size, fp32_bytes=0)
        for reply in _replies(grid, messages):
            node_id = reply.metadata.src_node_id
            key = stable_key_of(reply)
            meter.record(server_round, node_id, UP, reply, "hello", size=wire_bytes(reply), fp32_bytes=0)
            if key is not None:
                self.keys[node_id] = (0, key)
        for i in node_ids:
            self.keys.setdefault(i, (1, i))


def _replies(grid: Grid, messages: list[Message]) -> Iterable[Message]:
    return grid.send_and_receive(messages, timeout=QUERY_TIMEOUT)


class _OrderedGrid:
    """A Grid whose ``get_node_ids`` lists nodes by stable key; everything else goes to the real grid."""

    def __init__(self, grid: Grid, keys: dict[int, tuple[int, int]]) -> None:
        self._grid, self._keys = grid, keys

    def get_node_ids(self) -> list[int]:
        return sorted(self._grid.get_node_ids(), key=lambda i: self._keys.get(i, (2, i)))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)
