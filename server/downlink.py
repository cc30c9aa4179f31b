"""Downlink bookkeeping: the reference model nodes hold, its versions, and what each node needs.

Flower-free: it deals in tensors and codec blobs; :class:`~fedsqueeze.server.CompressedStrategy`
puts the result into messages.

The reference ``R`` is the model that up-to-date nodes hold. Each round the server encodes
``global - R`` with the downlink codec, adds the *decoded* blob to ``R`` (the same arithmetic as
on the nodes, so both stay bit-identical) and keeps the blob as the step to the new version.
What the codec drops stays in ``global - R`` and goes out in later rounds: server-side error
feedback, with ``global - R`` itself as the residual.

A node that last acknowledged version ``h`` gets the cheapest of

- the chain of stored steps ``h+1 .. now`` (exact);
- one *catch-up delta*: ``R_now - R_h`` through the catch-up delta codec, from a stored snapshot
  of ``R_h``;
- the whole of ``R_now`` through the lossless ``catchup`` codec (a node that holds nothing).

A lossy catch-up leaves the node at ``R_now`` plus one codec error. Without node memory
(``catchup_memory_bytes=0``) the server does not know that error, so it is never removed and the
catch-up codec must be dense (int8) to keep it small. With node memory the server keeps the model
each node holds after a catch-up of its own (the same arithmetic as on the node, so bit-identical)
and computes the node's next catch-up against it: per-node error feedback on the downlink, so the
error goes out at the node's next visit and catch-ups can use the cheap (low-rank or sparse)
``node_delta_codec``. A node with such an error is always sent a catch-up of its own, never the
shared steps (which would keep its error); a node one step behind with no error gets the step.

Memory is bounded whatever the number of nodes or rounds: ``R``, the current global model, the
first model (version 0), at most ``max_snapshots`` snapshots of ``R``, step blobs adding up to at
most the model's FP32 size, one cached catch-up blob per version asked for in the round, and one
integer per node: about ``(max_snapshots + 3)`` times the model in FP32 plus 16 bytes per node;
plus at most ``catchup_memory_bytes`` of per-node models. When no more fit, further nodes are
caught up as without memory (dense catch-up deltas, never worse than memory off). A node whose
last payload was not acknowledged may hold that payload's version or the one before, so it gets
the exact chain, which serves both, or the full model (a tracked error is then given up). A node's model
is dropped when it gets the full model or is forgotten; one that never comes back keeps its slot.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedsqueeze.codecs import Codec
from fedsqueeze.protocol import DELTA, FULL, ZERO_VERSION, add_tensors, model_digest, subtract_tensors

__all__ = ["DownlinkPlan", "DownlinkState", "model_digest"]  # model_digest: re-exported from protocol

_LOG = logging.getLogger(__name__)

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class DownlinkPlan:
    """What one node is sent: ``kind`` FULL (one lossless blob) or DELTA (blobs to add to ``base``)."""

    kind: str
    version: int
    base: int
    blobs: list[bytes]

    @property
    def size(self) -> int:
        """Bytes of the codec blobs."""
        return sum(map(len, self.blobs))


@dataclass
class DownlinkState:
    """The reference model, its versions and the version each node holds.

    Parameters
    ----------
    codec : Codec
        Downlink codec of the steps and catch-up deltas.
    catchup : Codec
        Lossless codec of the full reference (nodes that hold nothing usable).
    initial : Tensors or None
        Version 0: a model every node holds without being sent anything (the all-zero model,
        or one nodes build from the run's seed); None when nodes hold nothing at first.
    max_snapshots : int
        How many past references to keep for catch-up deltas (0: chains or full only).
    delta_codec : Codec or None
        Codec of the catch-up deltas; None: ``codec``. Without node memory give a dense one when
        ``codec`` sparsifies: a sparse catch-up would leave the node far from ``R`` for good.
    catchup_memory_bytes : int
        Bytes of per-node models the server may keep to correct lossy catch-ups at the node's next
        visit (per-node error feedback; 0: off, every lossy catch-up error stays on the node).
    node_delta_codec : Codec or None
        Codec of the catch-ups of nodes whose model the server keeps; None: ``codec``.
    """

    codec: Codec
    catchup: Codec
    initial: Tensors | None = None
    max_snapshots: int = 32
    delta_codec: Codec | None = None
    catchup_memory_bytes: int = 0
    node_delta_codec: Codec | None = None
    version: int = 0
    reference: Tensors | None = None
    lag: float = 0.0  # ||global - R|| / ||global|| after the last advance: what the downlink has yet to carry
    node_versions: dict[int, int] = field(default_factory=dict)
    _steps: dict[int, bytes] = field(default_factory=dict)  # version v -> blob taking v-1 to v
    _snapshots: OrderedDict[int, Tensors] = field(default_factory=OrderedDict)
    _global: Tensors = field(default_factory=dict)
    _full_blob: bytes | None = None
    _catchup_cache: dict[int, bytes | None] = field(default_factory=dict)  # None: the delta cannot be sent
    _digest: str | None = None  # of the full payload's model, this version
    _held: dict[int, tuple[int, Tensors]] = field(default_factory=dict)  # node -> (version, model it holds)
    _pending: dict[int, tuple[int, Tensors]] = field(default_factory=dict)  # sent, not yet acknowledged
    _node_catchup_cache: dict[int, tuple[bytes, Tensors] | None] = field(default_factory=dict)
    _unanswered: dict[int, int] = field(default_factory=dict)  # node -> version of a payload not acknowledged

    def advance(self, global_model: Mapping[str, torch.Tensor]) -> None:
        """Start a new version: move the reference toward ``global_model`` by one downlink step."""
        self._global = dict(global_model)
        self._full_blob, self._catchup_cache, self._node_catchup_cache, self._digest = None, {}, {}, None
        self.version += 1
        if self.codec.lossless:
            self.reference, self.lag = None, 0.0
            return
        if self.reference is None or not _same_layout(self.reference, self._global):
            if self.initial is None or not _same_layout(self.initial, self._global) or self.version != 1:
                self._restart_in_full()
                return
            self._steps, self._snapshots = {}, OrderedDict()
            self.reference = {k: v.clone() for k, v in self.initial.items()}
            self._snapshot(ZERO_VERSION, self.reference)
        encoded = _encoded(
            self.codec, subtract_tensors(self._global, self.reference), f"the step to version {self.version}"
        )
        if encoded is None:  # every node gets this version whole
            self._restart_in_full()
            return
        blob, decoded = encoded
        self.reference = add_tensors(self.reference, decoded)
        self.lag = _relative_distance(self._global, self.reference)
        self._steps[self.version] = blob
        self._snapshot(self.version, self.reference)
        self._trim_steps()

    def _restart_in_full(self) -> None:
        """Make the global model the reference: every node gets this version in full (no steps before it)."""
        self._steps, self._snapshots = {}, OrderedDict()
        self.reference = {k: v.clone() for k, v in self._global.items()}
        self._snapshot(self.version, self.reference)
        self.lag = 0.0

    def plan(self, node_id: int) -> DownlinkPlan:
        """The cheapest payload that brings ``node_id`` to the current version."""
        self._pending.pop(node_id, None)
        unanswered = self._unanswered.pop(node_id, None) is not None
        plan = self._choose(node_id, unanswered)
        self._unanswered[node_id] = plan.version
        return plan

    def _choose(self, node_id: int, unanswered: bool) -> DownlinkPlan:
        held = self.node_versions.get(node_id)
        if held is None and self.initial is not None:
            held = ZERO_VERSION
        if self.codec.lossless or held is None or not 0 <= held < self.version:
            return self._full_plan()
        if unanswered:
            # Its last payload was not acknowledged, so it may hold that payload's version or the one
            # before: the exact chain of steps serves both (the node takes its tail), a catch-up does not.
            chain, full = self._chain(held), self._full_plan()
            return chain if chain is not None and chain.size < full.size else full
        if self.catchup_memory_bytes > 0:
            return self._plan_with_memory(node_id, held)
        return self._plan_without_memory(held)

    def acknowledge(self, node_id: int, version: int) -> None:
        """``node_id`` replied having applied ``version``: later payloads start from there."""
        self.node_versions[node_id] = version
        self._unanswered.pop(node_id, None)
        pending = self._pending.pop(node_id, None)
        self._held.pop(node_id, None)
        if pending is not None and pending[0] == version:
            self._held[node_id] = pending

    def switch(self) -> None:
        """Forget every model of the old layout: the next :meth:`advance` starts a new model.

        After a switch to another architecture nothing a node holds is usable, so every node gets
        the next version in full; version numbers go on increasing, so no old version is taken
        for a new one.
        """
        self.initial, self.reference, self._global = None, None, {}
        self.node_versions = {}
        self._held, self._pending, self._unanswered = {}, {}, {}
        self._steps, self._snapshots = {}, OrderedDict()
        self._full_blob, self._catchup_cache, self._digest = None, {}, None

    def full_digest(self) -> str:
        """:func:`model_digest` of the model that a full payload of this version decodes to."""
        if self._digest is None:
            model = self._global if self.codec.lossless or self.reference is None else self.reference
            self._digest = model_digest(model)
        return self._digest

    def forget(self, node_id: int) -> None:
        """``node_id`` holds nothing usable (it said so, or its state is unknown): send it in full."""
        self.node_versions[node_id] = -1
        self._held.pop(node_id, None)
        self._pending.pop(node_id, None)
        self._unanswered.pop(node_id, None)

    def forget_all(self) -> None:
        """Forget what every node holds (e.g. after a server restart): nodes start from version 0 or in full."""
        self.node_versions.clear()
        self._held.clear()
        self._pending.clear()
        self._unanswered.clear()

    # ------------------------------------------------------------------ payload options
    def _full_plan(self) -> DownlinkPlan:
        if self._full_blob is None:
            model = self._global if self.codec.lossless or self.reference is None else self.reference
            codec = self.codec if self.codec.lossless else self.catchup
            self._full_blob = codec.encode(model)
        return DownlinkPlan(FULL, self.version, -1, [self._full_blob])

    def _chain(self, held: int) -> DownlinkPlan | None:
        needed = range(held + 1, self.version + 1)
        if not all(v in self._steps for v in needed):
            return None
        return DownlinkPlan(DELTA, self.version, held, [self._steps[v] for v in needed])

    def _catchup_delta(self, held: int) -> DownlinkPlan | None:
        base = self._snapshot_of(held)
        if held >= self.version - 1 or self.max_snapshots <= 0 or base is None or self.reference is None:
            return None  # a chain of one step is already the catch-up delta
        if held not in self._catchup_cache:
            delta = subtract_tensors(self.reference, base)
            encoded = _encoded(self.delta_codec or self.codec, delta, f"the catch-up delta from version {held}")
            self._catchup_cache[held] = None if encoded is None else encoded[0]
        blob = self._catchup_cache[held]
        return None if blob is None else DownlinkPlan(DELTA, self.version, held, [blob])

    def _plan_with_memory(self, node_id: int, held: int) -> DownlinkPlan:
        """A catch-up of its own for a node off the reference or behind, if memory allows; else as without."""
        tracked = self._held.get(node_id)
        if tracked is not None and tracked[0] != held:
            del self._held[node_id]  # a model of a version the node no longer holds
            tracked = None
        base = tracked[1] if tracked is not None else self._snapshot_of(held)
        untracked = held == self.version - 1 or not self._has_room()  # the exact step / no room
        if base is None or self.reference is None or (tracked is None and untracked):
            return self._plan_without_memory(held)
        if tracked is None:  # nodes that hold the same exact version share one blob and one result
            if held not in self._node_catchup_cache:
                self._node_catchup_cache[held] = self._node_catchup(base, f"the catch-up from version {held}")
            catchup = self._node_catchup_cache[held]
        else:
            catchup = self._node_catchup(base, f"node {node_id}'s own catch-up")
        if catchup is None:
            return self._plan_without_memory(held)
        blob, result = catchup
        plan, full = DownlinkPlan(DELTA, self.version, held, [blob]), self._full_plan()
        if plan.size >= full.size:
            return full
        self._pending[node_id] = (self.version, result)
        return plan

    def _node_catchup(self, base: Tensors, what: str) -> tuple[bytes, Tensors] | None:
        """The catch-up blob from ``base`` and the model a node holding ``base`` ends with (None: see _encoded)."""
        assert self.reference is not None
        encoded = _encoded(self._node_codec, subtract_tensors(self.reference, base), what)
        return None if encoded is None else (encoded[0], add_tensors(base, encoded[1]))

    def _plan_without_memory(self, held: int) -> DownlinkPlan:
        options = [p for p in (self._chain(held), self._catchup_delta(held)) if p is not None]
        options.append(self._full_plan())
        return min(options, key=lambda p: p.size)  # min keeps the first of equals: exact beats lossy

    @property
    def _node_codec(self) -> Codec:
        return self.node_delta_codec or self.codec

    def _has_room(self) -> bool:
        """Whether one more node's model fits in ``catchup_memory_bytes`` (besides those held and in flight)."""
        each = _nbytes(self.reference) if self.reference is not None else 0
        return (len(self._held) + len(self._pending) + 1) * each <= self.catchup_memory_bytes

    def _snapshot_of(self, version: int) -> Tensors | None:
        return self._snapshots.get(version, self.initial if version == ZERO_VERSION else None)

    def _snapshot(self, version: int, reference: Tensors) -> None:
        if self.max_snapshots <= 0:
            return
        self._snapshots[version] = reference
        while len(self._snapshots) > self.max_snapshots:
            self._snapshots.popitem(last=False)

    def _trim_steps(self) -> None:
        # A chain of steps longer than the model in FP32 never beats sending it in full.
        limit = _nbytes(self._global)
        total = 0
        for version in sorted(self._steps, reverse=True):
            total += len(self._steps[version])
            if total > limit:
                del self._steps[version]


def _same_layout(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> bool:
    return {k: tuple(v.shape) for k, v in a.items()} == {k: tuple(v.shape) for k, v in b.items()}


def _nbytes(model: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in model.values())


def _relative_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """||a - b|| / ||a|| over all floating-point tensors (0 when a is all zeros)."""
    diff = sum(float((a[k].double() - b[k].double()).square().sum()) for k in a if a[k].is_floating_point())
    norm = sum(float(a[k].double().square().sum()) for k in a if a[k].is_floating_point())
    return (diff / norm) ** 0.5 if norm > 0 else 0.0


def _encoded(codec: Codec, delta: Tensors, what: str) -> tuple[bytes, Tensors] | None:
    """``codec.encode_rebuilt(delta)``: the blob and what it decodes to; None, logged, for a delta it refuses.

    It refuses a delta that is not finite or that rebuilds beyond float32 (a model near float32's
    limits): sent, it would give nodes infinite weights. The caller sends something else.
    """
    try:
        return codec.encode_rebuilt(delta)
    except ValueError as err:
        _LOG.warning("%s is not sent: %s", what, err)
        return None
