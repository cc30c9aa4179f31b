"""A hostile client for robustness runs: a Flower mod that corrupts the train replies of chosen nodes.

Put it outermost, before the compression mod, so that it corrupts what would go on the wire:
``ClientApp(mods=[hostile_mod({3}, HOSTILE_KINDS), compression_mod])``. In round r a chosen node
sends the kind ``kinds[(r - 1) % len(kinds)]``. Each kind is one of the bad replies of issue 9
(broken or foreign codec blobs, malformed numpy arrays, metrics of the wrong type or value), or a
well-formed, finite update far larger than any honest one (``huge-update``).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp.typing import ClientAppCallable

from fedsqueeze.client.mod import STATE_REFERENCE
from fedsqueeze.codecs import blob_spec, decode, parse
from fedsqueeze.protocol import PAYLOAD_KEY, Uplink, edit_metric, edit_payload

__all__ = ["HOSTILE_KINDS", "hostile_mod"]

#: (reply, the message it answers, the node context) -> the reply sent instead
Corrupt = Callable[[Message, Message, Context], Message]


def _payload(reply: Message) -> ConfigRecord:
    record = reply.content[PAYLOAD_KEY]
    assert isinstance(record, ConfigRecord)  # the compression mod ran inside this mod
    return record


def _raw_blob(spec: bytes, body: bytes) -> bytes:
    return b"FSQZ\x01" + bytes([len(spec)]) + spec + bytes([len(body)]) + body


def _set_field(name: str, value: object) -> Corrupt:
    def corrupt(reply: Message, request: Message, context: Context) -> Message:
        reply.content[PAYLOAD_KEY] = edit_payload(_payload(reply), **{name: value})  # any value: that is the attack
        return reply

    return corrupt


def _replace_payload(record: ConfigRecord) -> Corrupt:
    def corrupt(reply: Message, request: Message, context: Context) -> Message:
        _payload(reply)  # the compression mod ran inside this mod
        reply.content[PAYLOAD_KEY] = record
        return reply

    return corrupt


def _set_metric(name: str, value: object) -> Corrupt:
    def corrupt(reply: Message, request: Message, context: Context) -> Message:
        reply.content[PAYLOAD_KEY] = edit_metric(_payload(reply), name, value)
        return reply

    return corrupt


def _plain_array(data: bytes) -> Corrupt:
    """A plain reply (no payload): the model the node holds, its last array's bytes replaced by ``data``."""

    def corrupt(reply: Message, request: Message, context: Context) -> Message:
        held = context.state[STATE_REFERENCE]
        assert isinstance(held, ArrayRecord)  # the compression mod stored it before the app ran
        arrays = dict(held.items())
        last = next(reversed(arrays))
        arrays[last] = Array(arrays[last].dtype, arrays[last].shape, "numpy.ndarray", data)
        metrics = MetricRecord({"num-examples": 10})
        return Message(RecordDict({"arrays": ArrayRecord(arrays), "metrics": metrics}), reply_to=request)

    return corrupt


def _huge_update(reply: Message, request: Message, context: Context) -> Message:
    """The node's own update, every value 1e6 off, re-encoded with its codec: well-formed, finite, ruinous."""
    payload = _payload(reply)
    blob = Uplink.from_record(payload).blob
    huge = {name: t + 1e6 for name, t in decode(blob).items()}
    reply.content[PAYLOAD_KEY] = edit_payload(payload, blob=parse(blob_spec(blob)).encode(huge))
    return reply


def _huge_npy_header() -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": "<f4", "fortran_order": False, "shape": (2**40,)})
    return buffer.getvalue() + b"\0" * 40


def _error(reply: Message, request: Message, context: Context) -> Message:
    return Message(Error(0, "hostile node: error reply"), reply_to=request)


_D1_BODY = b"\x01\x01w\x01\x01\x01\x00\x00\x03" + b"\x00\x05\x01\x00" + b"\x00\x01\x01\x00" * 2

#: Name -> how the reply is corrupted.
HOSTILE_KINDS: dict[str, Corrupt] = {
    "d1-quantize-blob": _set_field("blob", _raw_blob(b"quantize(granularity=8)", _D1_BODY)),
    "d3-bad-spec": _set_field("blob", _raw_blob(b"topk(ratio=0.5) < quantize(bits=4)", b"")),
    "foreign-pipeline": _set_field("blob", _raw_blob(b"tucker(ranks=4)", b"\x00")),
    "empty-npy": _plain_array(b""),
    "huge-npy-header": _plain_array(_huge_npy_header()),
    "list-metric": _set_metric("fsq-encode-s", [1.0, 2.0]),
    "nan-num-examples": _set_metric("num-examples", float("nan")),
    "wrong-version": _set_field("version", 10_000),
    "not-msgpack": _replace_payload(ConfigRecord({"p": b"\xc1" * 64})),
    "huge-update": _huge_update,
    "error": _error,
}


def hostile_mod(partitions: Iterable[int], kinds: Iterable[str]) -> Callable[..., Message]:
    """A mod that corrupts the train replies of nodes whose ``partition-id`` is in ``partitions``.

    Raises
    ------
    ValueError
        If a kind is not one of :data:`HOSTILE_KINDS`.
    """
    chosen, order = frozenset(partitions), list(kinds)
    unknown = sorted(set(order) - set(HOSTILE_KINDS))
    if unknown or not order:
        raise ValueError(f"hostile kinds must be a non-empty list of {sorted(HOSTILE_KINDS)}, got {order}")

    def mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        if context.node_config.get("partition-id") not in chosen or not msg.metadata.message_type.startswith("train"):
            return reply
        count = context.state.get("hostile", ConfigRecord({"n": 0}))
        n = int(count["n"])  # type: ignore[index,arg-type]
        context.state["hostile"] = ConfigRecord({"n": n + 1})
        if reply.has_error():
            return reply
        return HOSTILE_KINDS[order[n % len(order)]](reply, msg, context)

    return mod
