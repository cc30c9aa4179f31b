"""A Flower client mod that decodes the compressed downlink and compresses the train reply."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from flwr.common.logger import log

from fedsqueeze.client.state import STATE_DIR_KEY, NodeState, load_node_state, save_node_state
from fedsqueeze.client.state_record import state_record, state_tensors
from fedsqueeze.codecs import Codec, CodecError, ErrorFeedback, decode, parse
from fedsqueeze.compact_arch import parse_arch
from fedsqueeze.protocol import (
    ARCH_CONFIG_KEY,
    CONFIG_KEY,
    DELTA,
    ENCODE_TIME_METRIC,
    FULL,
    HELLO,
    PAYLOAD_KEY,
    ZERO_VERSION,
    Downlink,
    ProtocolError,
    Uplink,
    add_tensors,
    all_finite,
    arrays_to_tensors,
    has_payload,
    layout_difference,
    model_digest,
    subtract_tensors,
    tensors_to_arrays,
)

__all__ = ["CompressionMod", "compression_mod", "STATE_REFERENCE", "STATE_META", "STATE_FEEDBACK", "ARCH_CONFIG_KEY"]

#: Keys in ``context.state``: the reference model the node holds, its version, the uplink residual.
STATE_REFERENCE = "fedsqueeze.reference"
STATE_META = "fedsqueeze.meta"
STATE_FEEDBACK = "fedsqueeze.feedback"

Tensors = dict[str, torch.Tensor]
#: Builds the first model of a run on the node (e.g. from the run's seed), for ``initial="shared"``.
InitialModel = Callable[[Context], Tensors]


class Rejected(Exception):
    """The mod cannot go on; the node replies with an error message saying why."""


class CompressionMod:
    """Decode fedsqueeze's compressed model for the app, then compress the app's train reply.

    Add it to any ClientApp with ``ClientApp(mods=[compression_mod])``. On a train message
    that carries a fedsqueeze payload, the mod rebuilds the model the server sent (a full
    blob, or deltas added to the reference this node holds in ``context.state``), hands the
    app a message whose ArrayRecord holds plain numpy arrays, and calls the app. From the
    app's reply it takes the one ArrayRecord (the local model), encodes it with the uplink
    codec the server names (the model itself if that codec is lossless, else
    ``local - received`` through error feedback kept in ``context.state``) and replies with
    one payload record holding the blob and the reply's metrics. When the payload names a
    compact student's architecture (the server switched models), the mod checks the string and
    the digest of a full model, drops the reference and uplink residual of the old model, and
    passes the string to the app as the train config's :data:`ARCH_CONFIG_KEY`. It answers the server's
    one-time ``query`` for the node's stable key itself. Other messages pass through.

    A payload that cannot be used (malformed, undecodable, a delta against a version this
    node does not hold) or an app reply that cannot be compressed gives an error reply
    (code ``MOD_FAILED_PRECONDITION``) saying why; the server then sends the full model.

    Parameters
    ----------
    initial_model : callable or None
        ``context -> tensors``: builds the run's first model on the node, so that the server
        need not send it (it checks a digest). None: such payloads get an error reply, and the
        server sends the first model in full.
    """

    def __init__(self, initial_model: InitialModel | None = None) -> None:
        self.initial_model = initial_model

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        """Run the mod on one message (see the class docstring)."""
        if not msg.has_content() or not has_payload(msg.content):
            return call_next(msg, context)
        kind = msg.metadata.message_type.split(".", 1)[0]
        if kind == MessageType.QUERY and msg.content[PAYLOAD_KEY].get("kind") == HELLO:  # type: ignore[union-attr]
            return _hello_reply(msg, context)
        if kind != MessageType.TRAIN:
            return call_next(msg, context)
        try:
            down = Downlink.from_record(msg.content[PAYLOAD_KEY])  # type: ignore[arg-type]
            parse(down.uplink)  # fail before training if the uplink codec is unknown here
            if down.arch:
                parse_arch(down.arch)
            _restore_saved_state(down, context)
            received = self._receive(down, context)
        except (ProtocolError, ValueError, Rejected) as err:
            return _error_reply(msg, err)
        _store_reference(context.state, received, down)
        plain = RecordDict({n: r for n, r in msg.content.items() if n != PAYLOAD_KEY})
        for name, record in down.folded.items():
            plain[name] = record
        if down.arch:
            config = plain.config_records.get(CONFIG_KEY, ConfigRecord())
            config[ARCH_CONFIG_KEY] = down.arch
            plain[CONFIG_KEY] = config
        plain[down.arrays_key] = tensors_to_arrays(received)
        msg.content = plain
        reply = call_next(msg, context)
        if reply.has_error() or not reply.has_content():
            return reply
        try:
            _compress_reply(reply, down, received, context.state, _codec_seed(context, down.version))
        except (Rejected, ValueError) as err:
            return _error_reply(msg, err)
        _save_state(context)
        return reply

    def _receive(self, down: Downlink, context: Context) -> Tensors:
        """Rebuild the model the server sent, from a full blob or from deltas on the held reference."""
        try:
            if down.kind == FULL:
                return _checked(decode(down.blobs[0]), down.digest)
            weights, blobs = self._base_for(down, context)
            for blob in blobs:
                weights = add_tensors(weights, decode(blob))
            return weights
        except CodecError as err:
            raise Rejected(f"cannot decode the downlink payload: {err}") from err
        except ValueError as err:  # names or shapes of a delta differ from the held reference
            raise Rejected(f"the downlink delta does not fit the held reference: {err}") from err

    def _base_for(self, down: Downlink, context: Context) -> tuple[Tensors, list[bytes]]:
        """The model the deltas apply to, and the deltas still to apply."""
        held = _held_version(context.state, down.arch)
        is_chain = len(down.blobs) == down.version - down.base
        if held is not None and (held == down.base or (is_chain and down.base < held <= down.version)):
            # A node whose last reply did not reach the server holds a later step of the chain: skip it.
            return arrays_to_tensors(context.state[STATE_REFERENCE]), down.blobs[held - down.base :]  # type: ignore[arg-type]
        if held is None and down.base == ZERO_VERSION:
            return self._first_model(down, context), down.blobs
        raise Rejected(
            f"received a delta against reference version {down.base}, but this node holds "
            f"{'none' if held is None else f'version {held}'}; send the full model"
        )

    def _first_model(self, down: Downlink, context: Context) -> Tensors:
        if not down.base_digest:  # the all-zero model: the first blob gives the layout
            first = decode(down.blobs[0])
            return {k: torch.zeros_like(v) for k, v in first.items()}
        if self.initial_model is None:
            raise Rejected("the server expects this node to build the first model itself, and it cannot")
        model = self.initial_model(context)
        if model_digest(model) != down.base_digest:
            raise Rejected("the first model built on this node differs from the server's (digest mismatch)")
        return model


#: The mod for any ClientApp: ``ClientApp(mods=[compression_mod])``.
compression_mod = CompressionMod()


def _error_reply(msg: Message, err: Exception) -> Message:
    return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, f"fedsqueeze: {err}"), reply_to=msg)


def _hello_reply(msg: Message, context: Context) -> Message:
    """Answer the server's one-time query with this node's stable key (its partition id if it has one)."""
    return Message(
        RecordDict({PAYLOAD_KEY: ConfigRecord({"kind": HELLO, "stable-key": _stable_key(context)})}), reply_to=msg
    )


def _stable_key(context: Context) -> int:
    """This node's key across restarts and runs: its partition id if it has one, else its node id."""
    partition = context.node_config.get("partition-id")
    return partition if isinstance(partition, int) and not isinstance(partition, bool) else context.node_id


def _checked(weights: Tensors, digest: str) -> Tensors:
    """``weights``, if their digest is ``digest`` (or no digest was sent)."""
    if digest and model_digest(weights) != digest:
        raise Rejected("the full model received differs from the server's (digest mismatch)")
    return weights


def _held_version(state: RecordDict, arch: str) -> int | None:
    """The version of the reference this node holds, None if it holds none of architecture ``arch``."""
    meta = state.get(STATE_META)
    if not isinstance(meta, ConfigRecord) or STATE_REFERENCE not in state or meta.get("arch", "") != arch:
        return None
    version = meta.get("version")
    return version if isinstance(version, int) and not isinstance(version, bool) else None


def _store_reference(state: RecordDict, weights: Mapping[str, torch.Tensor], down: Downlink) -> None:
    state[STATE_REFERENCE] = tensors_to_arrays(weights)
    meta = state.get(STATE_META)
    previous = dict(meta) if isinstance(meta, ConfigRecord) else {}
    if previous.get("arch", "") != down.arch and STATE_FEEDBACK in state:
        del state[STATE_FEEDBACK]  # a residual of another model's layout is meaningless
    elif previous.get("uplink") != down.uplink and STATE_FEEDBACK in state:
        _keep_residual_only(state, previous.get("uplink"), down.uplink)
    feedback_version = previous.get("feedback-version", down.version)
    meta = ConfigRecord({"version": down.version, "uplink": down.uplink, "feedback-version": feedback_version})
    if down.arch:  # absent while the run's own model is trained
        meta["arch"] = down.arch
    state[STATE_META] = meta


def _keep_residual_only(state: RecordDict, before: object, now: str) -> None:
    """The uplink spec changed (e.g. a sparsity warm-up step): keep what of the error feedback still applies.

    The residual lives in parameter space, so it carries over to a pipeline of the same stages
    with other parameters (a warmed ``topk`` ratio); stage state (e.g. a PowerSGD basis) may not
    fit the new parameters and is dropped. A pipeline of other stages starts from no residual.
    """
    saved = state[STATE_FEEDBACK]
    try:
        same_stages = isinstance(before, str) and _stage_names(before) == _stage_names(now)
    except ValueError:
        same_stages = False
    tensors = _readable_feedback(saved) if same_stages else None
    if tensors is None:
        del state[STATE_FEEDBACK]
        return
    state[STATE_FEEDBACK] = state_record({k: v for k, v in tensors.items() if k.startswith("residual/")})


def _stage_names(spec: str) -> list[str]:
    return [stage.name for stage in parse(spec).stages]


def _encode_reply(
    local: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    codec: Codec,
    state: RecordDict,
    down: Downlink,
) -> tuple[str, bytes]:
    """Encode the local model: in full for a lossless codec, else its delta (through error feedback)."""
    if codec.lossless:
        return FULL, codec.encode(local)
    if not down.error_feedback:
        # a residual is carried only from one error-feedback update to the next: the server turns
        # error feedback off for one round to empty the residual of a node whose update it dropped
        if STATE_FEEDBACK in state:
            del state[STATE_FEEDBACK]
        return DELTA, codec.encode(subtract_tensors(local, reference))
    feedback = ErrorFeedback(codec)
    saved = state.get(STATE_FEEDBACK)
    if isinstance(saved, ArrayRecord) and not _feedback_too_old(state, down):
        _load_feedback(feedback, saved)
    blob = feedback.encode(subtract_tensors(local, reference))
    state[STATE_FEEDBACK] = state_record(feedback.state_dict(copy=False))  # serialized here, not kept
    meta = state[STATE_META]
    assert isinstance(meta, ConfigRecord)  # written by _store_reference before the app ran
    meta["feedback-version"] = down.version
    return DELTA, blob


def _load_feedback(feedback: ErrorFeedback, saved: ArrayRecord) -> None:
    """Load the residual carried over; one that cannot be read is dropped (logged) and the round goes on without."""
    tensors = _readable_feedback(saved)
    if tensors is None:
        return
    try:
        feedback.load_state_dict(tensors, copy=False)  # fresh tensors, made for it alone
    except (TypeError, ValueError) as err:  # e.g. codec state this codec refuses
        log(logging.ERROR, "fedsqueeze: the node's error-feedback state is unusable (%s); continuing without it", err)


def _feedback_too_old(state: RecordDict, down: Downlink) -> bool:
    """Whether the residual was made against a model more than ``max_feedback_staleness`` versions old."""
    if down.max_feedback_staleness <= 0:
        return False
    meta = state.get(STATE_META)
    made = meta.get("feedback-version") if isinstance(meta, ConfigRecord) else None
    return not isinstance(made, int) or down.version - made > down.max_feedback_staleness


def _check_like(local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    difference = layout_difference(local, reference)
    if difference is not None:
        raise Rejected(f"the ClientApp replied with other arrays than it received: {difference}")
    bad = all_finite(local)
    if bad is not None:
        raise Rejected(f"the ClientApp replied {bad!r} with NaN or infinite values")


def _compress_reply(reply: Message, down: Downlink, received: Tensors, state: RecordDict, seed: int) -> None:
    """Replace the reply's plain ArrayRecord and MetricRecord with one payload record, in place."""
    records = reply.content.array_records
    if down.arrays_key in records:
        key = down.arrays_key
    elif len(records) == 1:
        key = next(iter(records))
    else:
        raise Rejected(f"the ClientApp replied with {len(records)} ArrayRecords; fedsqueeze compresses exactly one")
    try:
        local = arrays_to_tensors(records[key])
    except (TypeError, ValueError) as err:
        raise Rejected(f"the ClientApp's reply ArrayRecord {key!r} is not plain numpy arrays: {err}") from err
    _check_like(local, received)
    codec = parse(down.uplink, seed=seed)
    start = time.perf_counter()
    kind, blob = _encode_reply(local, received, codec, state, down)
    seconds = time.perf_counter() - start

    metrics = dict(reply.content.metric_records) or {"metrics": MetricRecord()}
    name, target = next(iter(metrics.items()))
    target[ENCODE_TIME_METRIC] = seconds
    payload = Uplink(kind, down.version, blob, folded=metrics).to_record()  # one record on the wire, not two
    content = RecordDict({n: r for n, r in reply.content.items() if n != key and n not in metrics})
    content[PAYLOAD_KEY] = payload
    reply.content = content


def _restore_saved_state(down: Downlink, context: Context) -> None:
    """On a node that holds no model (a restarted SuperNode), load the one saved under ``state-dir``.

    Only a version the payload can start from is loaded (its base, or a later step of its chain);
    the residual only if it was made with the payload's uplink codec and loads into it.
    """
    directory = context.node_config.get(STATE_DIR_KEY)
    if not directory or down.kind == FULL or _held_version(context.state, down.arch) is not None:
        return
    is_chain = len(down.blobs) == down.version - down.base
    saved = load_node_state(
        str(directory),
        context.run_id,
        _stable_key(context),
        lambda v: v == down.base or (is_chain and down.base < v <= down.version),
    )
    if saved is None or saved.arch != down.arch:
        return
    _store_reference(context.state, saved.reference, replace(down, version=saved.version, uplink=saved.uplink))
    if saved.feedback is not None and saved.feedback_version is not None and saved.uplink == down.uplink:
        try:
            ErrorFeedback(parse(down.uplink)).load_state_dict(saved.feedback)  # check it before relying on it
        except (TypeError, ValueError) as err:
            log(logging.ERROR, "fedsqueeze: the saved uplink residual is unusable (%s); starting without", err)
            return
        context.state[STATE_FEEDBACK] = state_record(saved.feedback)
        meta = context.state[STATE_META]
        assert isinstance(meta, ConfigRecord)  # written by _store_reference just above
        meta["feedback-version"] = saved.feedback_version
    log(logging.INFO, "fedsqueeze: restored model version %d from %s", saved.version, directory)


def _save_state(context: Context) -> None:
    """Save what the node holds after a reply under ``state-dir`` (if set); a failure is logged, not raised."""
    directory = context.node_config.get(STATE_DIR_KEY)
    meta = context.state.get(STATE_META)
    arch = str(meta.get("arch", "")) if isinstance(meta, ConfigRecord) else ""
    held = _held_version(context.state, arch)
    if not directory or held is None:
        return
    made = meta.get("feedback-version")  # type: ignore[union-attr]
    state = NodeState(
        run_id=context.run_id,
        node=_stable_key(context),
        version=held,
        reference=arrays_to_tensors(context.state[STATE_REFERENCE]),  # type: ignore[arg-type]
        uplink=str(meta["uplink"]),  # type: ignore[index]
        feedback=_readable_feedback(context.state.get(STATE_FEEDBACK)),
        feedback_version=made if isinstance(made, int) else None,
        arch=arch,
    )
    try:
        save_node_state(str(directory), state)
    except OSError as err:
        log(logging.ERROR, "fedsqueeze: cannot save the node state to %s: %s", directory, err)


def _readable_feedback(record: object) -> dict[str, torch.Tensor] | None:
    """The node's error-feedback state as tensors, or None: none held, or unreadable (logged)."""
    if not isinstance(record, ArrayRecord):
        return None
    try:
        return state_tensors(record)
    except (TypeError, ValueError) as err:
        log(logging.ERROR, "fedsqueeze: the node's error-feedback state is unusable (%s); continuing without it", err)
        return None


def _codec_seed(context: Context, version: int) -> int:
    """Seed of the uplink codec's random draws: reproducible per node (partition) and round."""
    node = context.node_config.get("partition-id", context.node_id)
    node = node if isinstance(node, int) else context.node_id
    return (node * 1_000_003 + version) % 2**63
