"""A strategy wrapper that compresses the model both ways around any Flower strategy, and counts bytes."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy
from flwr.supercore import log

from fedsqueeze.codecs import Codec, CodecError, DecodeLimits, decode, parse
from fedsqueeze.protocol import (
    ARRAYS_KEY,
    DELTA,
    ENCODE_TIME_METRIC,
    FULL,
    TRAIN_TIME_METRIC,
    PAYLOAD_KEY,
    UPLINK_BYTES_METRIC,
    ZERO_VERSION,
    Downlink,
    ProtocolError,
    Uplink,
    add_tensors,
    all_finite,
    arrays_to_tensors,
    message_bytes,
    subtract_tensors,
    tensors_to_arrays,
)

__all__ = ["CompressedStrategy", "TrafficRecord", "Rejection", "UP", "DOWN"]

#: Directions in :class:`TrafficRecord`: server to node, node to server.
DOWN = "down"
UP = "up"


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
        Wire size, see :func:`fedsqueeze.protocol.message_bytes`.
    fp32_bytes : int
        Wire size of the same message with a plain FP32 ArrayRecord instead of the payload
        (what Flower without fedsqueeze would have sent).
    payload_bytes : int
        Codec blob bytes inside the message (0 for plain and error messages).
    """

    round: int
    node_id: int
    direction: str
    message_type: str
    kind: str
    bytes: int
    fp32_bytes: int
    payload_bytes: int


@dataclass(frozen=True)
class Rejection:
    """A train reply that the server dropped, and why."""

    round: int
    node_id: int
    reason: str


class _Rejected(Exception):
    """A reply cannot be aggregated; the message says why."""


def _as_codec(codec: str | Codec, role: str, seed: int | None = None) -> Codec:
    if isinstance(codec, Codec):
        return codec
    if isinstance(codec, str):
        try:
            return parse(codec, seed=seed)
        except ValueError as err:
            raise ValueError(f"bad {role} codec {codec!r}: {err}") from err
    raise TypeError(f"the {role} codec must be a spec string or a Codec, got {type(codec).__name__}")


#: Stages that keep every entry of a tensor: a first model sent through them is still whole.
_DENSE_STAGES = frozenset({"identity", "fp16", "bf16", "quantize", "zstd"})


def _dense(codec: Codec) -> bool:
    return all(stage.name in _DENSE_STAGES for stage in codec.stages)


def _digest(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A content hash of a model, used to put replies in a run-independent order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().contiguous().cpu().numpy().tobytes())
    return h.digest()


def _client_seconds(replies: Iterable[Message]) -> tuple[float, float]:
    """Encode and training seconds that the nodes reported, summed (missing metrics count 0)."""
    encode = train = 0.0
    for reply in replies:
        for record in reply.content.metric_records.values():
            encode += float(record.get(ENCODE_TIME_METRIC, 0.0))
            train += float(record.get(TRAIN_TIME_METRIC, 0.0))
    return encode, train


def _without_payload_metrics(record: MetricRecord) -> MetricRecord:
    return MetricRecord({k: v for k, v in record.items() if k not in (ENCODE_TIME_METRIC, UPLINK_BYTES_METRIC)})


class CompressedStrategy(Strategy):
    """Wrap any Flower strategy so that the model travels compressed in both directions.

    Downlink: the server keeps a reference model ``R``, the model that up-to-date nodes
    hold. Each round it encodes ``global - R`` with the downlink codec, adds the decoded
    blob to ``R`` (the same arithmetic as on the nodes, so both stay bit-identical) and
    sends that blob to nodes that hold the previous version of ``R``. What the codec drops
    stays in ``global - R`` and goes out in later rounds: this is the server-side error
    feedback (the residual is ``global - R`` itself; wrapping the encode in
    :class:`~fedsqueeze.codecs.ErrorFeedback` as well would count it twice). A node that
    missed rounds gets the chain of stored deltas when that is smaller than the model; a
    node that holds nothing (or tells the server that it does not hold what a delta
    needs) gets the whole of ``R`` through the lossless ``catchup`` codec. The first round
    sends ``R`` in full too, unless ``start_from_zero``. With a lossless downlink codec
    every node gets the global model itself, encoded with that codec.

    Uplink: the train config names the uplink codec; the client mod replies with its
    local model (lossless codec) or with ``local - R`` (lossy, through error feedback).
    Before the inner strategy aggregates, each reply is decoded to plain numpy arrays
    (``global + delta`` for deltas) and checked against the global model: the same names,
    shapes and dtypes and finite values. A reply that fails, or that carries an error, is
    dropped with one log line naming the node and the reason; the round goes on with the
    rest. Replies without a fedsqueeze payload (a node without the mod) are checked and
    passed on as they are.

    Every train and evaluate message is measured on the way out and in
    (:attr:`traffic`, see :func:`fedsqueeze.protocol.message_bytes`), together with
    what it would have cost with plain FP32 arrays.

    Parameters
    ----------
    inner : Strategy
        The strategy that samples nodes and aggregates (FedAvg, FedProx, FedAdam,
        FedMedian, ...).
    uplink : str or Codec
        Codec of the node-to-server update (default: ``"identity"``).
    downlink : str or Codec
        Codec of the server-to-node model delta (default: ``"identity"``).
    catchup : str or Codec
        Lossless codec of the full model sent to nodes that are not up to date
        (default: ``"zstd"``).
    start_from_zero : bool
        Send the first model through the downlink codec too, as a delta from the all-zero
        model that every node holds implicitly (version 0), rather than in full through
        ``catchup``. Much smaller with a quantizing downlink codec; wrong for a sparsifying
        one, which would start the nodes from a mostly-zero model (default: False).
    error_feedback : bool
        Tell nodes to carry what their lossy uplink codec dropped over to the next round
        (default: True).
    seed : int | None
        Seed of the downlink codec's random draws (stochastic rounding, random-k); ``None``
        draws fresh entropy (default: None).
    keep_client_models : bool
        Keep the decoded models of the replies accepted in the latest round in
        :attr:`client_models`, e.g. as extra teachers for server-side distillation
        (FedDF-style); off, nothing is kept (default: False).

    Raises
    ------
    ValueError
        If a codec spec is bad or ``catchup`` is lossy.
    """

    def __init__(
        self,
        inner: Strategy,
        uplink: str | Codec = "identity",
        downlink: str | Codec = "identity",
        *,
        catchup: str | Codec = "zstd",
        start_from_zero: bool = False,
        error_feedback: bool = True,
        seed: int | None = None,
        keep_client_models: bool = False,
    ) -> None:
        if not isinstance(inner, Strategy):
            raise TypeError(f"inner must be a flwr Strategy, got {type(inner).__name__}")
        self.inner = inner
        self.uplink = _as_codec(uplink, "uplink")
        self.downlink = _as_codec(downlink, "downlink", seed)
        self.error_feedback = bool(error_feedback)
        #: Per round: (seconds nodes spent encoding, seconds they spent training), summed over replies.
        self.client_seconds: dict[int, tuple[float, float]] = {}
        self.catchup = _as_codec(catchup, "catchup")
        if not self.catchup.lossless:
            raise ValueError(f"the catchup codec must be lossless, got {self.catchup.spec!r}")
        self.arrays_key: str = getattr(inner, "arrayrecord_key", ARRAYS_KEY)
        self.start_from_zero = bool(start_from_zero) and _dense(self.downlink)
        if start_from_zero and not self.start_from_zero:
            log(INFO, "fedsqueeze: start-from-zero is off: downlink %r is not dense; the first model goes in full",
                self.downlink.spec)
        #: Every message measured so far, in order.
        self.traffic: list[TrafficRecord] = []
        #: Every train reply dropped so far.
        self.rejections: list[Rejection] = []
        self.keep_client_models = bool(keep_client_models)
        #: With ``keep_client_models``: the decoded models of the replies accepted in the latest
        #: :meth:`aggregate_train` (in aggregation order); replaced each round, else empty.
        self.client_models: list[dict[str, torch.Tensor]] = []
        self._reference: dict[str, torch.Tensor] | None = None
        self._version = 0
        self._history: dict[int, bytes] = {}  # version v -> blob that takes version v-1 to v
        self._full_blob: bytes | None = None
        self._node_versions: dict[int, int] = {}
        self._seen: set[int] = set()
        self._expected: dict[int, int] = {}
        self._global: dict[str, torch.Tensor] = {}
        self._dtypes: dict[str, torch.dtype] = {}
        self._limits = DecodeLimits()

    def __repr__(self) -> str:
        """Name the wrapper, its codecs and the inner strategy."""
        return (
            f"CompressedStrategy({self.inner!r}, uplink={self.uplink.spec!r}, "
            f"downlink={self.downlink.spec!r}, catchup={self.catchup.spec!r})"
        )

    def summary(self) -> None:
        """Log the codecs, then the inner strategy's summary."""
        log(INFO, "\t├──> fedsqueeze compression:")
        log(INFO, "\t│\t├── uplink codec: %s", self.uplink.spec)
        log(INFO, "\t│\t├── downlink codec: %s", self.downlink.spec)
        log(INFO, "\t│\t└── catch-up codec: %s", self.catchup.spec)
        self.inner.summary()

    # ------------------------------------------------------------------ downlink
    def _advance_reference(self) -> None:
        """Move the reference toward the current global model; keep the delta blob of this step."""
        self._full_blob = None
        self._version += 1
        if self.downlink.lossless:
            self._reference, self._history = None, {}
            return
        same_layout = self._reference is not None and {k: v.shape for k, v in self._reference.items()} == {
            k: v.shape for k, v in self._global.items()
        }
        if not same_layout:
            self._history = {}
            if not (self.start_from_zero and self._version == ZERO_VERSION + 1):
                self._reference = {k: v.clone() for k, v in self._global.items()}
                return
            self._reference = {k: torch.zeros_like(v) for k, v in self._global.items()}
        assert self._reference is not None
        blob = self.downlink.encode(subtract_tensors(self._global, self._reference))
        self._reference = add_tensors(self._reference, decode(blob))
        self._history[self._version] = blob
        # A chain of deltas longer than the model in FP32 never beats sending it in full.
        limit = sum(t.numel() * t.element_size() for t in self._global.values())
        total = 0
        for version in sorted(self._history, reverse=True):
            total += len(self._history[version])
            if total > limit:
                del self._history[version]

    def _full(self) -> bytes:
        if self._full_blob is None:
            if self.downlink.lossless:
                self._full_blob = self.downlink.encode(self._global)
            else:
                assert self._reference is not None
                self._full_blob = self.catchup.encode(self._reference)
        return self._full_blob

    def _payload_for(self, node_id: int) -> Downlink:
        held = self._node_versions.pop(node_id, None)
        if held is None and self.start_from_zero and node_id not in self._seen:
            held = ZERO_VERSION  # a node never sent anything holds the all-zero model
        self._seen.add(node_id)
        if held is not None and not self.downlink.lossless and held < self._version:
            needed = range(held + 1, self._version + 1)
            if all(v in self._history for v in needed):
                chain = [self._history[v] for v in needed]
                if len(chain) == 1 or sum(map(len, chain)) < len(self._full()):
                    return Downlink(DELTA, self._version, held, chain, self.uplink.spec, self.arrays_key, self.error_feedback)
        return Downlink(FULL, self._version, -1, [self._full()], self.uplink.spec, self.arrays_key, self.error_feedback)

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure the round, then swap each message's model for its payload."""
        messages = list(self.inner.configure_train(server_round, arrays, config, grid))
        self._global = arrays_to_tensors(arrays)
        # Caps for decoding replies, sized from the model so that a hostile blob cannot make
        # the server allocate much more than the model (codecs decode through intermediates
        # of up to ~2x the model: 4x leaves room).
        elements = sum(t.numel() for t in self._global.values())
        fp32_bytes = sum(4 * t.numel() + len(k.encode()) for k, t in self._global.items())
        self._limits = DecodeLimits(max_elements=4 * elements + 2**20, max_body_bytes=4 * fp32_bytes + 2**20,
                                    max_tensors=len(self._global))
        if set(self._dtypes) != set(self._global):
            # The dtypes that nodes reply with: those of the first global model. Some strategies
            # (FedAdam) turn the global model into float64; the nodes' models stay as they are.
            self._dtypes = {name: t.dtype for name, t in self._global.items()}
        if not messages:
            return messages
        self._advance_reference()
        for msg in messages:
            node_id = msg.metadata.dst_node_id
            fp32 = message_bytes(msg)
            records = msg.content.array_records
            key = self.arrays_key if self.arrays_key in records else next(iter(records), None)
            if key is None:  # nothing to compress
                self._record(server_round, node_id, DOWN, msg, "plain", fp32, 0)
                continue
            payload = self._payload_for(node_id)
            payload.arrays_key = key
            content = RecordDict({name: record for name, record in msg.content.items() if name != key})
            content[PAYLOAD_KEY] = payload.to_record()
            msg.content = content  # the inner strategy shares one RecordDict among its messages
            self._expected[node_id] = self._version
            self._record(server_round, node_id, DOWN, msg, payload.kind, fp32, sum(map(len, payload.blobs)))
        return messages

    # ------------------------------------------------------------------ uplink
    def _check(self, tensors: Mapping[str, torch.Tensor], what: str) -> None:
        if set(tensors) != set(self._global):
            missing = sorted(set(self._global) - set(tensors))
            extra = sorted(set(tensors) - set(self._global))
            raise _Rejected(f"{what} names differ from the global model's: missing {missing}, unexpected {extra}")
        for name, ref in self._global.items():
            t = tensors[name]
            if tuple(t.shape) != tuple(ref.shape):
                raise _Rejected(f"{what} {name!r} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
            if t.dtype != self._dtypes[name]:
                raise _Rejected(f"{what} {name!r} has dtype {t.dtype}, expected {self._dtypes[name]}")
        bad = all_finite(tensors)
        if bad is not None:
            raise _Rejected(f"{what} {bad!r} holds NaN or infinite values")

    def _decode_reply(self, reply: Message, expected: int | None) -> tuple[str, dict[str, torch.Tensor], str, int]:
        """Return (kind, weights, arrays key, payload bytes) of a reply, or raise :class:`_Rejected`.

        ``expected`` is the model version this round sent to the node (None if none was sent).
        """
        if reply.has_error():
            raise _Rejected(f"it replied with error {reply.error.code}: {reply.error.reason}")
        content = reply.content
        if PAYLOAD_KEY not in content.config_records:
            records = content.array_records
            if len(records) != 1:
                raise _Rejected(f"it replied with {len(records)} ArrayRecords and no fedsqueeze payload")
            key = next(iter(records))
            try:
                weights = arrays_to_tensors(records[key])
            except (TypeError, ValueError) as err:
                raise _Rejected(f"its ArrayRecord cannot be read as numpy arrays: {err}") from err
            self._check(weights, "array")
            return "plain", weights, key, 0
        try:
            up = Uplink.from_record(content.config_records[PAYLOAD_KEY])
        except ProtocolError as err:
            raise _Rejected(str(err)) from err
        if content.array_records:
            raise _Rejected("it sent ArrayRecords next to the fedsqueeze payload")
        if up.version != expected:
            raise _Rejected(f"it trained from model version {up.version}, but this round sent version {expected}")
        try:
            decoded = decode(up.blob, limits=self._limits)
        except CodecError as err:
            raise _Rejected(f"its blob cannot be decoded: {err}") from err
        if up.kind == FULL:
            self._check(decoded, "model")
            return FULL, decoded, up.arrays_key, len(up.blob)
        self._check(decoded, "update")
        weights = {k: v.to(self._dtypes[k]) for k, v in add_tensors(self._global, decoded).items()}
        self._check(weights, "model")
        return DELTA, weights, up.arrays_key, len(up.blob)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Decode and check each reply, drop the bad ones, and let the inner strategy aggregate."""
        accepted: list[tuple[bytes, dict[str, torch.Tensor] | None, Message]] = []
        for reply in replies:
            node_id = reply.metadata.src_node_id
            expected = self._expected.pop(node_id, None)
            size = message_bytes(reply)
            try:
                kind, weights, key, payload_bytes = self._decode_reply(reply, expected)
            except _Rejected as err:
                log(WARNING, "fedsqueeze: round %d: dropped the reply of node %d: %s", server_round, node_id, err)
                self.rejections.append(Rejection(server_round, node_id, str(err)))
                kind = "error" if reply.has_error() else "rejected"
                fp32 = self._fp32_reply_bytes(reply, self._global, self.arrays_key)
                self._record(server_round, node_id, UP, reply, kind, fp32, 0, size=size)
                continue
            payload_digest = _digest(weights)
            if kind != "plain" and expected is not None:
                self._node_versions[node_id] = expected  # it holds what this round sent
            plain = RecordDict({name: rec for name, rec in reply.content.items() if name != PAYLOAD_KEY})
            if kind != "plain":
                plain[key] = tensors_to_arrays(weights)
            reply.content = plain
            fp32 = self._fp32_reply_bytes(reply, weights, key)
            self._record(server_round, node_id, UP, reply, kind, fp32, payload_bytes, size=size)
            accepted.append((payload_digest, weights if self.keep_client_models else None, reply))
        self.client_seconds[server_round] = _client_seconds(reply for _, _, reply in accepted)
        # Aggregate in an order fixed by the replies' content, not by arrival or by node ids
        # (random in simulation): float sums then come out the same in every run.
        accepted.sort(key=lambda t: t[0])
        self.client_models = [weights for _, weights, _ in accepted if weights is not None]
        return self.inner.aggregate_train(server_round, [reply for _, _, reply in accepted])

    # ------------------------------------------------------------------ evaluation
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Let the inner strategy configure evaluation (plain FP32 model) and measure the messages."""
        messages = list(self.inner.configure_evaluate(server_round, arrays, config, grid))
        for msg in messages:
            size = message_bytes(msg)
            self._record(server_round, msg.metadata.dst_node_id, DOWN, msg, "plain", size, 0, size=size)
        return messages

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Measure the evaluation replies and let the inner strategy aggregate them."""
        replies = list(replies)
        for reply in replies:
            size = message_bytes(reply)
            kind = "error" if reply.has_error() else "plain"
            self._record(server_round, reply.metadata.src_node_id, UP, reply, kind, size, 0, size=size)
        return self.inner.aggregate_evaluate(server_round, replies)

    # ------------------------------------------------------------------ accounting
    def _fp32_reply_bytes(self, reply: Message, weights: Mapping[str, torch.Tensor], key: str) -> int:
        """Size of the reply a plain Flower ClientApp would have sent: FP32 arrays, no fedsqueeze."""
        if reply.has_error():
            return message_bytes(reply)
        content = RecordDict()
        for name, record in reply.content.items():
            if name == PAYLOAD_KEY or isinstance(record, ArrayRecord):
                continue
            content[name] = _without_payload_metrics(record) if isinstance(record, MetricRecord) else record
        content[key] = tensors_to_arrays({k: v.float() if v.is_floating_point() else v for k, v in weights.items()})
        return message_bytes(Message(metadata=reply.metadata, content=content))  # type: ignore[call-overload]

    def _record(
        self,
        server_round: int,
        node_id: int,
        direction: str,
        msg: Message,
        kind: str,
        fp32_bytes: int,
        payload_bytes: int,
        *,
        size: int | None = None,
    ) -> None:
        self.traffic.append(
            TrafficRecord(
                round=server_round,
                node_id=node_id,
                direction=direction,
                message_type=msg.metadata.message_type,
                kind=kind,
                bytes=message_bytes(msg) if size is None else size,
                fp32_bytes=fp32_bytes,
                payload_bytes=payload_bytes,
            )
        )

    @property
    def reference_version(self) -> int:
        """Version of the downlink reference model (increases by one each training round)."""
        return self._version

