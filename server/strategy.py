"""A strategy wrapper that compresses the model both ways around any Flower strategy, and counts bytes."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import ERROR, INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsqueeze.codecs import Codec, parse
from fedsqueeze.config import ConfigValue
from fedsqueeze.framing import wire_bytes
from fedsqueeze.protocol import (
    ARCH_CONFIG_KEY,
    ARRAYS_KEY,
    CONFIG_KEY,
    ENCODE_TIME_METRIC,
    FULL,
    PAYLOAD_KEY,
    TRAIN_TIME_METRIC,
    ZERO_VERSION,
    Downlink,
    all_finite,
    arrays_to_tensors,
    model_digest,
    tensors_to_arrays,
)
from fedsqueeze.server.downlink import DownlinkPlan, DownlinkState
from fedsqueeze.server.outliers import MIN_REPLIES, outliers, update_norm
from fedsqueeze.server.replies import Accepted, Rejected, ReplyChecker
from fedsqueeze.server.sampling import StableNodeOrder
from fedsqueeze.server.traffic import DOWN, UP, TrafficMeter, TrafficRecord, fp32_reply_bytes
from fedsqueeze.server.warmup import warmup_codec

__all__ = ["CompressedStrategy", "TrafficRecord", "Rejection", "UP", "DOWN", "INITIAL_MODES"]

#: How nodes get the first model: sent in full, the all-zero model plus a delta, or built by
#: the nodes themselves (from the run's seed) plus a delta, checked by digest.
INITIAL_MODES = ("sent", "zeros", "shared")

#: Stages that keep every entry of a tensor: a first model or a catch-up sent through them is still whole.
_DENSE_STAGES = frozenset({"identity", "fp16", "bf16", "quantize", "zstd"})
#: Catch-up deltas when the downlink codec sparsifies.
_DENSE_CATCHUP_DELTA = "quantize(bits=8) | zstd"
#: Stages that drop entries: a downlink with one of them gets dense catch-ups, with node memory or without.
_SPARSE_STAGES = frozenset({"topk", "randomk", "threshold"})


@dataclass(frozen=True)
class Rejection:
    """A train reply that the server dropped, and why."""

    round: int
    node_id: int
    reason: str


class CompressedStrategy(Strategy):
    """Wrap any Flower strategy so that the model travels compressed in both directions.

    Downlink: the global model reaches nodes as steps of a reference model, with server-side
    error feedback, through the downlink codec; a node that missed rounds gets the cheapest
    catch-up (see :mod:`fedsqueeze.server.downlink`). With a lossless downlink codec every
    node gets the global model itself.

    Uplink: the train config names the uplink codec; the client mod replies with its local
    model (lossless codec) or ``local - received`` (lossy, through error feedback). Each
    reply is checked in full before the inner strategy sees it (:mod:`fedsqueeze.server.replies`);
    a reply that fails is dropped with one log line naming the node and the reason, and the
    round goes on with the rest. Replies are handed on in an order fixed by their content, and
    nodes are sampled by a seeded draw over a stable node order, so runs are reproducible.

    Every train and evaluate message is measured on the way out and in (:attr:`traffic`).

    Model switch: after :meth:`switch_model` the next train round broadcasts and trains another
    model (a compact student) instead of the one the rounds produced so far: every node gets it
    in full, with its architecture string and digest, and the reply limits, downlink references
    and the inner strategy's state (server momentum, adaptive moments) start over from it.

    Parameters
    ----------
    inner : Strategy
        The strategy that samples nodes and aggregates (FedAvg, FedProx, FedAdam, ...).
    uplink, downlink : str or Codec
        Codecs of the node-to-server update and of the server-to-node model steps
        (default: ``"identity"``).
    catchup : str or Codec
        Lossless codec of the full model for nodes that hold nothing usable (default: ``"zstd"``).
    initial : str
        One of :data:`INITIAL_MODES`: ``"sent"`` (default) sends the first model in full;
        ``"zeros"`` sends it as a delta from the all-zero model (dense downlink codecs only);
        ``"shared"`` tells nodes to build the first model themselves and sends the first step
        as a delta from it, with its digest (nodes that cannot build it get it in full).
    error_feedback : bool
        Tell nodes to carry what their lossy uplink codec dropped to later rounds (default: True).
    max_feedback_staleness : int
        A node's residual older than this many rounds is dropped, not added (default: 0, never).
    seed : int or None
        Seed of the downlink codec's draws and of node sampling; None: fresh entropy.
    max_snapshots : int
        Past references kept for catch-up deltas (default: 32).
    catchup_delta : str or Codec or None
        Lossy codec of the catch-up deltas sent to nodes that missed rounds; None: the downlink
        codec if it is dense, or with ``catchup_memory_bytes`` > 0 if it drops no entries (no
        topk, randomk or threshold: e.g. low rank), else
        ``"quantize(bits=8) | zstd"`` (a sparse catch-up of many missed steps leaves a node far
        from the reference: for good without memory, and by 14-18 points in S3 with it).
    catchup_memory_bytes : int
        Server memory for the models nodes hold after a catch-up, so that their next catch-up
        corrects its error (per-node downlink error feedback, see :mod:`fedsqueeze.server.downlink`;
        default: 0, off). Nodes beyond it are caught up as without memory, by the dense rule above.
    keep_client_models : bool
        Keep the decoded models of the latest round's accepted replies in :attr:`client_models`
        (e.g. teachers for server-side distillation; default: False).
    uplink_warmup_rounds : int
        Sparsity warm-up: in rounds 1..W the uplink's ``topk``/``randomk`` keep exponentially
        more (see :mod:`fedsqueeze.server.warmup`); each round's spec is sent to the nodes and
        replies must be encoded with it (default: 0, off).
    max_update_norm_ratio : float
        A reply whose update (its model less the round's global model) has a norm over this many
        times the median of the round's replies is dropped before aggregation, and the drop is
        logged and kept in :attr:`rejections` (at least 3 replies; default: 10.0; 0: off). One
        diverged node otherwise takes the average with it (see :mod:`fedsqueeze.server.outliers`).
    """

    def __init__(
        self,
        inner: Strategy,
        uplink: str | Codec = "identity",
        downlink: str | Codec = "identity",
        *,
        catchup: str | Codec = "zstd",
        initial: str = "sent",
        error_feedback: bool = True,
        max_feedback_staleness: int = 0,
        seed: int | None = None,
        max_snapshots: int = 32,
        catchup_delta: str | Codec | None = None,
        catchup_memory_bytes: int = 0,
        keep_client_models: bool = False,
        uplink_warmup_rounds: int = 0,
        max_update_norm_ratio: float = 10.0,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a flwr Strategy, got {type(inner).__name__}")
        if initial not in INITIAL_MODES:
            raise ValueError(f"initial must be one of {INITIAL_MODES}, got {initial!r}")
        self.inner = inner
        self.uplink = _as_codec(uplink, "uplink")
        if uplink_warmup_rounds < 0:
            raise ValueError(f"uplink_warmup_rounds must be >= 0 (0: off), got {uplink_warmup_rounds!r}")
        self.uplink_warmup_rounds = int(uplink_warmup_rounds)
        #: The uplink codec of the current round (the configured one, or a warmed one).
        self.round_uplink = self.uplink
        self.downlink = _as_codec(downlink, "downlink", seed)
        self.catchup = _as_codec(catchup, "catchup")
        if not self.catchup.lossless:
            raise ValueError(f"the catchup codec must be lossless, got {self.catchup.spec!r}")
        dense = all(stage.name in _DENSE_STAGES for stage in self.downlink.stages)
        if initial == "zeros" and not dense:
            log(
                INFO,
                "fedsqueeze: initial='zeros' needs a dense downlink codec, not %r: the first model goes in full",
                self.downlink.spec,
            )
            initial = "sent"
        self.initial = initial
        self.error_feedback = bool(error_feedback)
        self.max_feedback_staleness = int(max_feedback_staleness)
        self.seed = seed
        self.keep_client_models = bool(keep_client_models)
        if not max_update_norm_ratio >= 0:
            raise ValueError(f"max_update_norm_ratio must be >= 0 (0: off), got {max_update_norm_ratio!r}")
        self.max_update_norm_ratio = float(max_update_norm_ratio)
        self._drop_feedback: set[int] = set()  # nodes whose next update goes without error feedback
        self.arrays_key: str = getattr(inner, "arrayrecord_key", ARRAYS_KEY)
        if catchup_memory_bytes < 0:
            raise ValueError(f"catchup_memory_bytes must be >= 0 (0: off), got {catchup_memory_bytes!r}")
        dense_delta = self.downlink if dense else _as_codec(_DENSE_CATCHUP_DELTA, "catch-up delta", seed)
        if catchup_delta is None:
            # With node memory a catch-up may be as lossy as a step, but not sparse: top-1 % catch-ups of ten
            # missed steps left S3 runs 14-18 points down; dense int8 ones cut that loss (BENCHMARKS.md section 4)
            sparse = any(stage.name in _SPARSE_STAGES for stage in self.downlink.stages)
            catchup_delta = self.downlink if catchup_memory_bytes > 0 and not sparse else dense_delta
        #: Codec of the catch-up deltas (with memory: those of the nodes whose model the server keeps).
        self.catchup_delta = _as_codec(catchup_delta, "catch-up delta", seed)
        self.downlink_state = DownlinkState(
            self.downlink,
            self.catchup,
            max_snapshots=max_snapshots,
            delta_codec=dense_delta if catchup_memory_bytes > 0 else self.catchup_delta,
            catchup_memory_bytes=int(catchup_memory_bytes),
            node_delta_codec=self.catchup_delta,
        )
        self.meter = TrafficMeter()
        self.node_order = StableNodeOrder()
        #: Every train reply dropped so far.
        self.rejections: list[Rejection] = []
        #: Rounds whose aggregate was refused (node 0: the server itself), see :meth:`_guard_aggregate`,
        #: and nodes sent the full model because their catch-up could not be encoded, see :meth:`_plan`.
        self.guard_events: list[Rejection] = []
        #: Per round: (seconds nodes spent encoding, seconds they spent training), summed over replies.
        self.client_seconds: dict[int, tuple[float, float]] = {}
        #: With ``keep_client_models``: the decoded models accepted in the latest round, else empty.
        self.client_models: list[dict[str, torch.Tensor]] = []
        self._initial_digest = ""
        self._expected: dict[int, int] = {}
        self._checker: ReplyChecker | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self._sent: list[Message] = []  # the latest configure_*'s messages: replies are matched to them
        #: Architecture string of the model broadcast since a model switch; empty before one.
        self.arch = ""
        #: The round whose train messages first carried the switched model (0: no switch yet).
        self.switched_at = 0
        self._pending_switch: tuple[dict[str, torch.Tensor], str] | None = None
        self._train_overrides: dict[str, ConfigValue] = {}

    @property
    def traffic(self) -> list[TrafficRecord]:
        """Every message measured so far, in order."""
        return self.meter.records

    def __repr__(self) -> str:
        """Name the wrapper, its codecs and the inner strategy."""
        return (
            f"CompressedStrategy({self.inner!r}, uplink={self.uplink.spec!r}, "
            f"downlink={self.downlink.spec!r}, catchup={self.catchup.spec!r}, initial={self.initial!r})"
        )

    def summary(self) -> None:
        """Log the codecs, then the inner strategy's summary."""
        log(INFO, "\t├──> fedsqueeze compression:")
        log(INFO, "\t│\t├── uplink codec: %s", self.uplink.spec)
        if self.uplink_warmup_rounds:
            log(INFO, "\t│\t├── uplink sparsity warm-up: %d rounds", self.uplink_warmup_rounds)
        log(INFO, "\t│\t├── downlink codec: %s", self.downlink.spec)
        log(INFO, "\t│\t├── catch-up codec: %s (deltas: %s)", self.catchup.spec, self.catchup_delta.spec)
        if self.downlink_state.catchup_memory_bytes:
            log(INFO, "\t│\t├── catch-up memory: %d bytes", self.downlink_state.catchup_memory_bytes)
        log(INFO, "\t│\t└── first model: %s", self.initial)
        self.inner.summary()

    # ------------------------------------------------------------------ model switch
    def switch_model(
        self, weights: Mapping[str, torch.Tensor], arch: str, train_config: Mapping[str, ConfigValue] | None = None
    ) -> None:
        """From the next train round on, broadcast and train ``weights``, a model of architecture ``arch``.

        Parameters
        ----------
        weights : Mapping of str to torch.Tensor
            The new global model (e.g. a distilled student's state_dict).
        arch : str
            Its architecture string, from which nodes build it
            (:func:`fedsqueeze.compact_arch.parse_arch`); not empty.
        train_config : Mapping or None
            Train config entries that replace those of every later round's train config (e.g. a
            smaller ``lr`` for the new model); None: none (default).
        """
        if not arch:
            raise ValueError("a model switch needs the new model's architecture string, got ''")
        self._pending_switch = ({k: v.detach().clone() for k, v in weights.items()}, arch)
        self._train_overrides = dict(train_config or {})

    def _apply_switch(self, server_round: int) -> ArrayRecord:
        """Make the pending switch's model the global model and forget what depended on the old one."""
        assert self._pending_switch is not None
        weights, self.arch = self._pending_switch
        self._pending_switch = None
        self.switched_at = server_round
        self.downlink_state.switch()
        self._dtypes, self._initial_digest, self._expected = {}, "", {}
        for name in ("current_arrays", "momentum_vector", "m_t", "v_t"):  # Flower's FedAvgM and FedOpt state
            if hasattr(self.inner, name):
                setattr(self.inner, name, None)
        log(
            INFO,
            "fedsqueeze: round %d: the federated model is now %s (%d tensors)",
            server_round,
            self.arch,
            len(weights),
        )
        return tensors_to_arrays(weights)

    # ------------------------------------------------------------------ train
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy sample and configure the round, then swap each model for its payload."""
        if self._pending_switch is not None:
            arrays = self._apply_switch(server_round)
        if self.arch and self._train_overrides:
            config = ConfigRecord({**dict(config), **self._train_overrides})
        ordered = self.node_order.grid(grid, server_round, self.meter)
        with _seeded_random(self.seed, server_round):
            messages = list(self.inner.configure_train(server_round, arrays, config, ordered))
        global_model = arrays_to_tensors(arrays)
        self.round_uplink = warmup_codec(self.uplink, server_round, self.uplink_warmup_rounds)
        self._start_round(global_model)
        if not messages:
            return messages
        self.downlink_state.advance(global_model)
        for msg in messages:
            self._compress_message(server_round, msg)
        self._sent = messages
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Check and decode each reply, drop the bad ones, and let the inner strategy aggregate the rest."""
        accepted: list[tuple[bytes, Accepted, Message]] = []
        for reply in replies:
            result = self._accept(server_round, reply)
            if result is not None:
                accepted.append((_content_digest(result.weights), result, reply))
        accepted = self._same_metric_layout(server_round, accepted)
        accepted = self._bounded_updates(server_round, accepted)
        self.client_seconds[server_round] = _client_seconds(a.metrics for _, a, _ in accepted)
        # Aggregate in an order fixed by the replies' content, not by arrival or by node ids
        # (random in simulation): float sums then come out the same in every run.
        accepted.sort(key=lambda t: t[0])
        self.client_models = [a.weights for _, a, _ in accepted] if self.keep_client_models else []
        arrays, metrics = self.inner.aggregate_train(server_round, [reply for _, _, reply in accepted])
        if arrays is None and self.arch and self._checker is not None:
            # Flower keeps the previous round's arrays when none come back, which may be of the old model
            arrays = tensors_to_arrays(self._checker.global_model)
        return self._guard_aggregate(server_round, arrays), metrics

    def _guard_aggregate(self, server_round: int, arrays: ArrayRecord | None) -> ArrayRecord | None:
        """Refuse a non-finite aggregate: keep the round's starting model, and say so.

        Every reply was finite, so a non-finite aggregate means the inner strategy's arithmetic
        overflowed (e.g. a server learning rate far too large): the run goes on from the last good
        model, and the event is logged and kept in :attr:`guard_events`, never silently.
        """
        if arrays is None or self._checker is None:
            return arrays
        bad = all_finite(arrays_to_tensors(arrays))
        if bad is None:
            return arrays
        reason = f"the aggregate's {bad!r} holds NaN or infinite values; kept the round's starting model"
        log(ERROR, "fedsqueeze: round %d: %s", server_round, reason)
        self.guard_events.append(Rejection(server_round, 0, reason))
        return tensors_to_arrays(self._checker.global_model)

    def _start_round(self, global_model: dict[str, torch.Tensor]) -> None:
        if set(self._dtypes) != set(global_model):
            # The dtypes that nodes reply with: those of the first global model. Some strategies
            # (FedAdam) turn the global model into float64; the nodes' models stay as they are.
            self._dtypes = {name: t.dtype for name, t in global_model.items()}
        if self.initial != "sent" and self.downlink_state.initial is None and not self.arch:
            # (nodes build only the run's first model themselves: a switched model is sent in full)
            first = (
                global_model if self.initial == "shared" else {k: torch.zeros_like(v) for k, v in global_model.items()}
            )
            self.downlink_state.initial = first
            self._initial_digest = model_digest(first) if self.initial == "shared" else ""
        weight_key = getattr(self.inner, "weighted_by_key", "num-examples")
        self._checker = ReplyChecker(self.round_uplink, global_model, self._dtypes, self.arrays_key, weight_key)

    def _compress_message(self, server_round: int, msg: Message) -> None:
        node_id = msg.metadata.dst_node_id
        fp32 = wire_bytes(msg)
        records = msg.content.array_records
        key = self.arrays_key if self.arrays_key in records else next(iter(records), None)
        if key is None:  # nothing to compress
            self.meter.record(server_round, node_id, DOWN, msg, "plain", size=fp32, fp32_bytes=fp32)
            return
        plan = self._plan(server_round, node_id)
        foldable = {n: r for n, r in msg.content.items() if n == CONFIG_KEY and isinstance(r, ConfigRecord)}
        payload = Downlink(
            plan.kind,
            plan.version,
            plan.base,
            plan.blobs,
            self.round_uplink.spec,
            key,
            self.error_feedback and node_id not in self._drop_feedback,
            self.max_feedback_staleness,
            self._initial_digest if plan.base == ZERO_VERSION else "",
            self.arch,
            self.downlink_state.full_digest() if self.arch and plan.kind == FULL else "",
            folded=foldable,
        ).to_record()
        content = RecordDict({n: r for n, r in msg.content.items() if n != key and n not in foldable})
        content[PAYLOAD_KEY] = payload
        msg.content = content  # the inner strategy shares one RecordDict among its messages
        self._expected[node_id] = plan.version
        self._drop_feedback.discard(node_id)
        self.meter.record(
            server_round,
            node_id,
            DOWN,
            msg,
            plan.kind,
            size=wire_bytes(msg),
            fp32_bytes=fp32,
            payload_bytes=plan.size,
        )

    def _plan(self, server_round: int, node_id: int) -> DownlinkPlan:
        """The node's payload; if encoding its own catch-up fails, the full model, and say so.

        A codec failing on one node's catch-up delta (an eigensolver that does not converge) must
        not end the run for every node: the node gets the lossless full model instead, and the
        event is logged and kept in :attr:`guard_events`.
        """
        try:
            return self.downlink_state.plan(node_id)
        except (RuntimeError, ValueError) as err:
            reason = f"encoding node {node_id}'s catch-up failed ({type(err).__name__}: {err}); sent the full model"
            log(ERROR, "fedsqueeze: round %d: %s", server_round, reason)
            self.guard_events.append(Rejection(server_round, node_id, reason))
            self.downlink_state.forget(node_id)
            return self.downlink_state.plan(node_id)

    def _accept(self, server_round: int, reply: Message) -> Accepted | None:
        """Check one reply; on success turn it into the plain reply the inner strategy expects."""
        assert self._checker is not None, "configure_train runs before aggregate_train"
        node_id = self._recipient(reply)
        expected = self._expected.pop(node_id, None)
        size = wire_bytes(reply)
        try:
            result = self._checker.check(reply, expected)
        except Rejected as err:
            log(WARNING, "fedsqueeze: round %d: dropped the reply of node %d: %s", server_round, node_id, err)
            self.rejections.append(Rejection(server_round, node_id, str(err)))
            if reply.has_error() and reply.error.code not in _NOT_FROM_THE_NODE:
                self.downlink_state.forget(node_id)  # e.g. it could not apply the payload: send it in full
            kind = "error" if reply.has_error() else "rejected"
            fp32 = fp32_reply_bytes(reply, self._checker.global_model, self.arrays_key)
            self.meter.record(server_round, node_id, UP, reply, kind, size=size, fp32_bytes=fp32)
            return None
        if result.kind != "plain" and expected is not None:
            self.downlink_state.acknowledge(node_id, expected)
        plain = RecordDict(
            {n: r for n, r in reply.content.items() if n != PAYLOAD_KEY and not isinstance(r, MetricRecord)}
        )
        plain[self.arrays_key] = tensors_to_arrays(result.weights)
        plain[result.metrics_name] = result.metrics
        reply.content = plain
        fp32 = fp32_reply_bytes(reply, result.weights, self.arrays_key)
        self.meter.record(
            server_round,
            node_id,
            UP,
            reply,
            result.kind,
            size=size,
            fp32_bytes=fp32,
            payload_bytes=result.payload_bytes,
        )
        return result

    def _bounded_updates(
        self, server_round: int, accepted: list[tuple[bytes, Accepted, Message]]
    ) -> list[tuple[bytes, Accepted, Message]]:
        """Drop replies whose update is over ``max_update_norm_ratio`` x the round's median (see :mod:`outliers`)."""
        assert self._checker is not None, "configure_train runs before aggregate_train"
        if self.max_update_norm_ratio <= 0 or len(accepted) < MIN_REPLIES:
            return accepted  # off, or no typical size to compare with: no norms to compute
        norms = [update_norm(a.weights, self._checker.global_model) for _, a, _ in accepted]
        kept = []
        for entry, reason in zip(accepted, outliers(norms, self.max_update_norm_ratio), strict=True):
            if reason is None:
                kept.append(entry)
                continue
            node_id = entry[2].metadata.src_node_id
            log(WARNING, "fedsqueeze: round %d: dropped the reply of node %d: %s", server_round, node_id, reason)
            self.rejections.append(Rejection(server_round, node_id, reason))
            # Its error-feedback residual now holds the dropped update's compression error (as large as
            # the update): carried on, every later reply of the node would be dropped too. Its next
            # message asks for one update without error feedback, which empties the residual.
            self._drop_feedback.add(node_id)
        return kept

    def _same_metric_layout(
        self, server_round: int, accepted: list[tuple[bytes, Accepted, Message]]
    ) -> list[tuple[bytes, Accepted, Message]]:
        """Drop replies whose metric names or value shapes differ from most replies' (Flower's
        strategies refuse to aggregate a round whose MetricRecords differ)."""
        layouts = [_metric_layout(a.metrics) for _, a, _ in accepted]
        if len(set(layouts)) <= 1:
            return accepted
        common = max(sorted(set(layouts)), key=layouts.count)
        kept = []
        for entry, layout in zip(accepted, layouts, strict=True):
            if layout == common:
                kept.append(entry)
                continue
            node_id = entry[2].metadata.src_node_id
            reason = f"its metrics {dict(layout)} differ from the other replies' {dict(common)}"
            log(WARNING, "fedsqueeze: round %d: dropped the reply of node %d: %s", server_round, node_id, reason)
            self.rejections.append(Rejection(server_round, node_id, reason))
        return kept

    def _recipient(self, reply: Message) -> int:
        """The node a reply stands for: the destination of the message it answers.

        For a node that died, the SuperLink replies in its place with an error whose source is the
        SuperLink's own id, not the node's; the message id it answers names the node. A reply that
        answers none of the latest messages (or whose grid set no message ids) stands for its source.
        """
        answered = reply.metadata.reply_to_message_id
        for msg in self._sent if answered else ():
            if msg.metadata.message_id == answered:
                return msg.metadata.dst_node_id
        return reply.metadata.src_node_id

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure evaluation (plain FP32 model) and measure the messages."""
        ordered = self.node_order.grid(grid, server_round, self.meter)
        with _seeded_random(self.seed, -server_round):
            messages = list(self.inner.configure_evaluate(server_round, arrays, config, ordered))
        for msg in messages:
            if self.arch:  # the node's app builds the switched model from its architecture string
                _set_config(msg.content, ARCH_CONFIG_KEY, self.arch)
            self.meter.record_plain(server_round, msg.metadata.dst_node_id, DOWN, msg)
        self._sent = messages
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Measure the evaluation replies and let the inner strategy aggregate them."""
        replies = list(replies)
        for reply in replies:
            self.meter.record_plain(server_round, self._recipient(reply), UP, reply)
        return self.inner.aggregate_evaluate(server_round, replies)


#: Error codes of replies the SuperLink makes for a node that did not answer: they say nothing of what the
#: node holds (a node restarted with its saved state still holds its version), so the node keeps its version.
_NOT_FROM_THE_NODE = frozenset(
    {ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE}
)


def _set_config(content: RecordDict, key: str, value: str) -> None:
    """Set ``key`` in the content's config record (made if there is none)."""
    config = content[CONFIG_KEY] if CONFIG_KEY in content.config_records else ConfigRecord()
    assert isinstance(config, ConfigRecord)
    config[key] = value
    content[CONFIG_KEY] = config


def _as_codec(codec: str | Codec, role: str, seed: int | None = None) -> Codec:
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        try:
            return parse(codec, seed=seed)
        except ValueError as err:
            raise ValueError(f"bad {role} codec {codec!r}: {err}") from err
    raise TypeError(f"the {role} codec must be a spec string or a Codec, got {type(codec).__name__}")


def _content_digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A content hash of a model, used to put replies in a run-independent order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


def _client_seconds(metrics: Iterable[MetricRecord]) -> tuple[float, float]:
    """Encode and training seconds that the nodes reported, summed (missing metrics count 0)."""
    encode = train = 0.0
    for record in metrics:
        encode += _number(record.get(ENCODE_TIME_METRIC, 0.0))
        train += _number(record.get(TRAIN_TIME_METRIC, 0.0))
    return encode, train


def _metric_layout(metrics: MetricRecord) -> tuple[tuple[str, int], ...]:
    """Metric names with the length of list values (-1 for a number), sorted."""
    return tuple(sorted((k, len(v) if isinstance(v, list) else -1) for k, v in metrics.items()))


def _number(value: object) -> float:
    """A reported duration; a list (which a hostile node may send) counts as 0."""
    return float(value) if isinstance(value, (int, float)) else 0.0


class _seeded_random:
    """Seed Python's ``random`` (which Flower's strategies sample with) for one call, then restore it."""

    def __init__(self, seed: int | None, salt: int) -> None:
        self.seed, self.salt = seed, salt

    def __enter__(self) -> None:
        self.saved = random.getstate()
        if self.seed is not None:
            random.seed(f"fedsqueeze-sampling/{self.seed}/{self.salt}")

    def __exit__(self, *exc: object) -> None:
        random.setstate(self.saved)
