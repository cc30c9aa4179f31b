"""A Flower client mod that decodes the compressed downlink and compresses the train reply."""

from __future__ import annotations

import time
from collections.abc import Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedsqueeze.codecs import Codec, CodecError, ErrorFeedback, decode, parse
from fedsqueeze.protocol import (
    DELTA,
    ENCODE_TIME_METRIC,
    FULL,
    METRICS_KEY,
    PAYLOAD_KEY,
    UPLINK_BYTES_METRIC,
    ZERO_VERSION,
    Downlink,
    ProtocolError,
    Uplink,
    add_tensors,
    all_finite,
    arrays_to_tensors,
    has_payload,
    subtract_tensors,
    tensors_to_arrays,
)

__all__ = ["compression_mod", "STATE_REFERENCE", "STATE_META", "STATE_FEEDBACK"]

#: Keys in ``context.state``: the reference model the node holds, its version, the uplink residual.
STATE_REFERENCE = "fedsqueeze.reference"
STATE_META = "fedsqueeze.meta"
STATE_FEEDBACK = "fedsqueeze.feedback"


class _Reject(Exception):
    """The mod cannot go on; the node replies with an error message saying why."""


def _is_train(msg: Message) -> bool:
    return msg.metadata.message_type.split(".", 1)[0] == MessageType.TRAIN


def _held_version(state: RecordDict) -> int | None:
    meta = state.get(STATE_META)
    if isinstance(meta, ConfigRecord) and isinstance(meta.get("version"), int) and STATE_REFERENCE in state:
        return int(meta["version"])
    return None


def _receive(down: Downlink, state: RecordDict) -> dict[str, torch.Tensor]:
    """Rebuild the model the server sent, from a full blob or from deltas on the held reference."""
    try:
        if down.kind == FULL:
            return decode(down.blobs[0])
        held = _held_version(state)
        if held is None and down.base == ZERO_VERSION:  # deltas from the all-zero model
            first = decode(down.blobs[0])
            weights = add_tensors({k: torch.zeros_like(v) for k, v in first.items()}, first)
            blobs = down.blobs[1:]
        elif held == down.base:
            weights = arrays_to_tensors(state[STATE_REFERENCE])  # type: ignore[arg-type]
            blobs = down.blobs
        else:
            raise _Reject(
                f"received a delta against reference version {down.base}, but this node holds "
                f"{'none' if held is None else f'version {held}'}; send the full model"
            )
        for blob in blobs:
            weights = add_tensors(weights, decode(blob))
        return weights
    except CodecError as err:
        raise _Reject(f"cannot decode the downlink payload: {err}") from err
    except ValueError as err:  # names or shapes of a delta differ from the held reference
        raise _Reject(f"downlink delta does not fit the held reference: {err}") from err


def _store_reference(state: RecordDict, weights: Mapping[str, torch.Tensor], version: int, uplink: str) -> None:
    state[STATE_REFERENCE] = tensors_to_arrays(weights)
    meta = state.get(STATE_META)
    previous_uplink = meta.get("uplink") if isinstance(meta, ConfigRecord) else None
    if previous_uplink != uplink and STATE_FEEDBACK in state:
        del state[STATE_FEEDBACK]  # a residual of another codec is meaningless
    state[STATE_META] = ConfigRecord({"version": version, "uplink": uplink})


def _encode_reply(
    local: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    codec: Codec,
    state: RecordDict,
    error_feedback: bool = True,
) -> tuple[str, bytes]:
    """Encode the local model: in full for a lossless codec, else its delta (through error feedback)."""
    if codec.lossless:
        return FULL, codec.encode(local)
    if not error_feedback:
        return DELTA, codec.encode(subtract_tensors(local, reference))
    feedback = ErrorFeedback(codec)
    saved = state.get(STATE_FEEDBACK)
    if isinstance(saved, ArrayRecord):
        feedback.load_state_dict(arrays_to_tensors(saved))
    blob = feedback.encode(subtract_tensors(local, reference))
    state[STATE_FEEDBACK] = tensors_to_arrays(feedback.state_dict())
    return DELTA, blob


def _check_like(local: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    if set(local) != set(reference):
        missing, extra = sorted(set(reference) - set(local)), sorted(set(local) - set(reference))
        raise _Reject(f"the ClientApp replied with other arrays than it received: missing {missing}, extra {extra}")
    for name, ref in reference.items():
        if tuple(local[name].shape) != tuple(ref.shape):
            raise _Reject(f"the ClientApp replied {name!r} with shape {tuple(local[name].shape)}, received {tuple(ref.shape)}")
    bad = all_finite(local)
    if bad is not None:
        raise _Reject(f"the ClientApp replied {bad!r} with NaN or infinite values")


def _compress_reply(
    reply: Message, down: Downlink, received: dict[str, torch.Tensor], state: RecordDict, seed: int
) -> None:
    """Replace the reply's plain ArrayRecord with the compressed payload, in place."""
    records = reply.content.array_records
    if down.arrays_key in records:
        key = down.arrays_key
    elif len(records) == 1:
        key = next(iter(records))
    else:
        raise _Reject(f"the ClientApp replied with {len(records)} ArrayRecords; fedsqueeze compresses exactly one")
    try:
        local = arrays_to_tensors(records[key])
    except (TypeError, ValueError) as err:
        raise _Reject(f"the ClientApp's reply ArrayRecord {key!r} is not plain numpy arrays: {err}") from err
    _check_like(local, received)
    codec = parse(down.uplink, seed=seed)
    start = time.perf_counter()
    kind, blob = _encode_reply(local, received, codec, state, down.error_feedback)
    seconds = time.perf_counter() - start

    content = RecordDict({name: record for name, record in reply.content.items() if name != key})
    content[PAYLOAD_KEY] = Uplink(kind=kind, version=down.version, blob=blob, arrays_key=key).to_record()
    metrics = content.metric_records
    target = metrics[next(iter(metrics))] if metrics else MetricRecord()
    target[ENCODE_TIME_METRIC] = seconds
    target[UPLINK_BYTES_METRIC] = len(blob)
    if not metrics:
        content[METRICS_KEY] = target
    reply.content = content


def _codec_seed(context: Context, version: int) -> int:
    """Seed of the uplink codec's random draws: reproducible per node (partition) and round."""
    node = context.node_config.get("partition-id", context.node_id)
    node = node if isinstance(node, int) else context.node_id
    return (node * 1_000_003 + version) % 2**63


def compression_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Decode fedsqueeze's compressed model for the app, then compress the app's train reply.

    Add it to any ClientApp with ``ClientApp(mods=[compression_mod])``. On a train message
    that carries a fedsqueeze payload, the mod rebuilds the model the server sent (a full
    blob, or deltas added to the reference this node holds in ``context.state``), hands
    the app a message whose ArrayRecord (``"arrays"`` unless the server says otherwise)
    holds plain numpy arrays, and calls the app. From the app's reply it takes the one
    ArrayRecord (the local model), encodes it with the uplink codec named by the server
    (the model itself if that codec is lossless, else ``local - received`` through error
    feedback whose residual stays in ``context.state``), and replies with the blob in the
    ``"fedsqueeze"`` ConfigRecord instead, adding the metrics ``fedsqueeze-encode-s`` and
    ``fedsqueeze-uplink-bytes`` to the reply's MetricRecord. Messages without a fedsqueeze
    payload (evaluation, query, plain Flower strategies) pass through untouched.

    A payload that cannot be used (malformed, undecodable, a delta against a version this
    node does not hold) or an app reply that cannot be compressed gives an error reply
    (code ``MOD_FAILED_PRECONDITION``) saying why; the server then sends the full model.

    Parameters
    ----------
    msg : Message
        The incoming message.
    context : Context
        The node's context; ``context.state`` keeps the reference model and the residual.
    call_next : ClientAppCallable
        The next mod or the app's handler.

    Returns
    -------
    Message
        The (compressed) reply.
    """
    if not _is_train(msg) or not msg.has_content() or not has_payload(msg.content):
        return call_next(msg, context)
    try:
        down = Downlink.from_record(msg.content[PAYLOAD_KEY])  # type: ignore[arg-type]
        parse(down.uplink)  # fail before training if the uplink codec is unknown here
        received = _receive(down, context.state)
    except (ProtocolError, ValueError, _Reject) as err:
        return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, f"fedsqueeze: {err}"), reply_to=msg)
    _store_reference(context.state, received, down.version, down.uplink)

    plain = RecordDict({name: record for name, record in msg.content.items() if name != PAYLOAD_KEY})
    plain[down.arrays_key] = tensors_to_arrays(received)
    msg.content = plain
    reply = call_next(msg, context)
    if reply.has_error() or not reply.has_content():
        return reply
    try:
        _compress_reply(reply, down, received, context.state, _codec_seed(context, down.version))
    except (_Reject, ValueError) as err:
        return Message(Error(ErrorCode.MOD_FAILED_PRECONDITION, f"fedsqueeze: {err}"), reply_to=msg)
    return reply
