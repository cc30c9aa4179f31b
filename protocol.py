"""What fedsqueeze's client and server agree on: payload records, tensor layouts, wire sizes."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

__all__ = [
    "PAYLOAD_KEY",
    "ARRAYS_KEY",
    "METRICS_KEY",
    "CONFIG_KEY",
    "ENCODE_TIME_METRIC",
    "TRAIN_TIME_METRIC",
    "FULL",
    "DELTA",
    "ZERO_VERSION",
    "HELLO",
    "ARCH_CONFIG_KEY",
    "stable_key_of",
    "ProtocolError",
    "Downlink",
    "Uplink",
    "arrays_to_tensors",
    "tensors_to_arrays",
    "add_tensors",
    "subtract_tensors",
    "layout_difference",
    "FOLDED_FIELD",
    "fold_records",
    "unfold_records",
    "all_finite",
    "has_payload",
    "model_digest",
]

#: Name of the ConfigRecord that carries fedsqueeze's blob and bookkeeping, in both directions.
PAYLOAD_KEY = "fedsqueeze"
#: Flower's conventional names of the model, metrics and config records in a message.
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
#: Metrics that the client mod adds to a train reply.
ENCODE_TIME_METRIC = "fsq-encode-s"
#: Metric of fedsqueeze's own ClientApp: seconds of local training (for the codec's share of client time).
TRAIN_TIME_METRIC = "train-seconds"
#: Payload kinds: the full model (lossless) or a delta against a reference both sides hold.
FULL = "full"
DELTA = "delta"
#: The reference version every node holds without being sent anything: the all-zero model, or
#: the first model built by the node itself (then the payload carries its digest).
ZERO_VERSION = 0
#: Payload kind of the one-time query by which the server learns a node's stable key.
HELLO = "hello"
#: Config entry naming the architecture of the model in a train or evaluate message, when the server
#: switched to a compact student (see ``broadcast-compact``); absent: the run config's ``model``.
ARCH_CONFIG_KEY = "model-arch"


class ProtocolError(ValueError):
    """A fedsqueeze payload record is missing fields or holds values of the wrong type."""


def _field(record: ConfigRecord, name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in record:
        raise ProtocolError(f"fedsqueeze payload lacks the field {name!r}")
    value = record[name]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
        raise ProtocolError(f"fedsqueeze payload field {name!r} has type {type(value).__name__}")
    return value


@dataclass
class Downlink:
    """What the server sends a node: the model as one full blob or a chain of delta blobs.

    Parameters
    ----------
    kind : str
        :data:`FULL` (``blobs`` holds one blob of the whole model, lossless) or :data:`DELTA`
        (``blobs`` are deltas to add, in order, to the reference of version ``base``).
    version : int
        Version of the reference the node holds once it applied the payload.
    base : int
        Version the deltas apply to; -1 for a full payload.
    blobs : list[bytes]
        Codec blobs (self-describing, see :func:`fedsqueeze.codecs.decode`).
    uplink : str
        Spec of the codec the node must encode its update with.
    arrays_key : str
        Name under which the node's training code expects the plain model ArrayRecord
        (default: ``"arrays"``).
    error_feedback : bool
        Whether the node carries what its lossy uplink codec dropped over to its next update
        (default: True).
    max_feedback_staleness : int
        A residual from more than this many versions ago is dropped, not added (0: never).
    base_digest : str
        With ``base`` 0: the digest of the first model that the node builds itself (see
        :func:`fedsqueeze.server.downlink.model_digest`); empty: the all-zero model.
    arch : str
        Architecture of the model sent: empty for the run config's ``model``, else a compact
        student's string (:func:`fedsqueeze.compact_arch.parse_arch`). A node holding a model of
        another architecture gets it in full, and drops what it kept of the old one.
    digest : str
        With a full payload: :func:`model_digest` of the model it decodes to, which the node
        checks; empty: no check. On the wire only when not empty, as ``arch``.
    """

    kind: str
    version: int
    base: int
    blobs: list[bytes]
    uplink: str
    arrays_key: str = ARRAYS_KEY
    error_feedback: bool = True
    max_feedback_staleness: int = 0
    base_digest: str = ""
    arch: str = ""
    digest: str = ""

    def to_record(self) -> ConfigRecord:
        """Pack into the ConfigRecord that travels under :data:`PAYLOAD_KEY`."""
        record = ConfigRecord(
            {
                "kind": self.kind,
                "version": self.version,
                "base": self.base,
                "blobs": list(self.blobs),
                "uplink": self.uplink,
                "arrays-key": self.arrays_key,
                "error-feedback": self.error_feedback,
                "max-feedback-staleness": self.max_feedback_staleness,
                "base-digest": self.base_digest,
            }
        )
        for name, value in (("arch", self.arch), ("digest", self.digest)):
            if value:  # absent from the records of runs that never switch models
                record[name] = value
        return record

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Downlink:
        """Unpack and check a received record; :class:`ProtocolError` if it is malformed."""
        kind = _field(record, "kind", str)
        if kind not in (FULL, DELTA):
            raise ProtocolError(f"fedsqueeze payload kind must be {FULL!r} or {DELTA!r}, got {kind!r}")
        blobs = _field(record, "blobs", list)
        if not blobs or not all(isinstance(b, bytes) for b in blobs):
            raise ProtocolError("fedsqueeze payload field 'blobs' must be a non-empty list of bytes")
        if kind == FULL and len(blobs) != 1:
            raise ProtocolError(f"a full fedsqueeze payload holds exactly one blob, got {len(blobs)}")
        return cls(
            kind=kind,
            version=_field(record, "version", int),
            base=_field(record, "base", int),
            blobs=blobs,
            uplink=_field(record, "uplink", str),
            arrays_key=_field(record, "arrays-key", str),
            error_feedback=_field(record, "error-feedback", bool),
            max_feedback_staleness=_field(record, "max-feedback-staleness", int),
            base_digest=_field(record, "base-digest", str),
            arch=_field(record, "arch", str) if "arch" in record else "",
            digest=_field(record, "digest", str) if "digest" in record else "",
        )


@dataclass
class Uplink:
    """What a node replies: its local model (lossless codec) or its update against ``version``.

    Parameters
    ----------
    kind : str
        :data:`FULL` (the blob holds the local weights) or :data:`DELTA` (local minus reference).
    version : int
        Version of the reference the node trained from (and still holds).
    blob : bytes
        Codec blob.
    """

    kind: str
    version: int
    blob: bytes

    def to_record(self) -> ConfigRecord:
        """Pack into the ConfigRecord that travels under :data:`PAYLOAD_KEY`."""
        return ConfigRecord({"kind": self.kind, "version": self.version, "blob": self.blob})

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Uplink:
        """Unpack and check a received record; :class:`ProtocolError` if it is malformed."""
        kind = _field(record, "kind", str)
        if kind not in (FULL, DELTA):
            raise ProtocolError(f"fedsqueeze payload kind must be {FULL!r} or {DELTA!r}, got {kind!r}")
        return cls(
            kind=kind,
            version=_field(record, "version", int),
            blob=_field(record, "blob", bytes),
        )


def stable_key_of(reply: Message) -> int | None:
    """The stable key a node gave in its answer to the :data:`HELLO` query, or None."""
    if reply.has_error() or PAYLOAD_KEY not in reply.content.config_records:
        return None
    key = reply.content.config_records[PAYLOAD_KEY].get("stable-key")
    return key if isinstance(key, int) and not isinstance(key, bool) else None


def has_payload(content: RecordDict) -> bool:
    """Whether a message's content carries a fedsqueeze payload record."""
    return PAYLOAD_KEY in content.config_records


def arrays_to_tensors(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """Convert a plain (``numpy.ndarray`` stype) ArrayRecord to CPU tensors, keeping names and order.

    Raises
    ------
    TypeError
        If an Array is not numpy-serialised (e.g. it carries compressed bytes).
    """
    return {name: torch.from_numpy(np.array(array.numpy(), copy=True)) for name, array in record.items()}


def tensors_to_arrays(tensors: Mapping[str, torch.Tensor | np.ndarray]) -> ArrayRecord:
    """Convert tensors (or arrays) to a plain ArrayRecord, keeping names and order."""
    out: dict[str, Array] = {}
    for name, value in tensors.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[name] = Array(np.ascontiguousarray(array))
    return ArrayRecord(out)


def layout_difference(tensors: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> str | None:
    """Say how ``tensors`` differ from ``reference`` in names or shapes, or return None if they match.

    The one layout check that client, server and the tensor arithmetic below share.
    """
    if set(tensors) != set(reference):
        missing = sorted(set(reference) - set(tensors))
        extra = sorted(set(tensors) - set(reference))
        return f"names differ: missing {missing}, unexpected {extra}"
    for name, ref in reference.items():
        shape = tuple(tensors[name].shape)
        if shape != tuple(ref.shape):
            return f"{name!r} has shape {shape}, expected {tuple(ref.shape)}"
    return None


def add_tensors(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``base + delta`` per tensor in ``base``'s dtypes.

    Client and server both use this one function, so that a reference updated by the same
    decoded deltas is bit-identical on both sides.

    Raises
    ------
    ValueError
        If the names or shapes differ.
    """
    difference = layout_difference(delta, base)
    if difference is not None:
        raise ValueError(f"the delta does not fit the reference: {difference}")
    return {name: torch.add(b, delta[name].to(b.dtype)) for name, b in base.items()}


def subtract_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``a - b`` per tensor in ``a``'s dtypes (names and shapes must match, see :func:`add_tensors`)."""
    difference = layout_difference(b, a)
    if difference is not None:
        raise ValueError(f"cannot subtract: {difference}")
    return {name: torch.sub(x, b[name].to(x.dtype)) for name, x in a.items()}


def all_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Return the name of the first float tensor holding NaN or infinity, else None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


#: Payload field listing the records folded into it, in order, as ``"<name>:m"`` (a MetricRecord)
#: or ``"<name>:c"`` (a ConfigRecord).
FOLDED_FIELD = "folded"


def fold_records(payload: ConfigRecord, records: Mapping[str, ConfigRecord | MetricRecord]) -> None:
    """Move small records into the payload record, as ``"<i>/<key>"`` fields for the i-th record.

    Every record costs its own object on the wire (a 64-character id in the message's object
    tree, a header and a body), so a message with one record instead of two is ~250 B smaller.
    :func:`unfold_records` restores them.

    Raises
    ------
    ProtocolError
        If a record name holds ``"/"`` or ``":"``, or a record is neither a ConfigRecord nor a MetricRecord.
    """
    folded = []
    for index, (name, record) in enumerate(records.items()):
        if "/" in name or ":" in name:
            raise ProtocolError(f"cannot fold record {name!r}: its name holds '/' or ':'")
        if not isinstance(record, (ConfigRecord, MetricRecord)):
            raise ProtocolError(f"cannot fold record {name!r} of type {type(record).__name__}")
        folded.append(f"{name}:{'m' if isinstance(record, MetricRecord) else 'c'}")
        for key, value in record.items():
            payload[f"{index}/{key}"] = value
    payload[FOLDED_FIELD] = folded


def unfold_records(payload: ConfigRecord) -> dict[str, ConfigRecord | MetricRecord]:
    """The records that :func:`fold_records` moved into ``payload`` (none if it folded nothing).

    Raises
    ------
    ProtocolError
        If the folded list is malformed or a metric is not a number or a list of numbers.
    """
    entries = payload.get(FOLDED_FIELD, [])
    if not isinstance(entries, list) or not all(isinstance(e, str) and e.count(":") == 1 for e in entries):
        raise ProtocolError(f"fedsqueeze payload field {FOLDED_FIELD!r} must be a list of 'name:kind' strings")
    out: dict[str, ConfigRecord | MetricRecord] = {}
    for index, entry in enumerate(entries):
        name, kind = str(entry).split(":")
        prefix = f"{index}/"
        values = {k[len(prefix) :]: v for k, v in payload.items() if k.startswith(prefix)}
        if kind == "c":
            out[name] = ConfigRecord(values)
        elif kind == "m":
            out[name] = _metric_record(name, values)
        else:
            raise ProtocolError(f"folded record {name!r} has kind {kind!r}, expected 'm' (metrics) or 'c' (config)")
    return out


def _metric_record(name: str, values: dict[str, Any]) -> MetricRecord:
    for key, value in values.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
            raise ProtocolError(f"folded metric {name}/{key} is {value!r}, expected a number or a list of numbers")
    return MetricRecord(values)


def model_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of a model's names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()
