"""What fedsqueeze's client and server agree on: payload records, tensor layouts, wire sizes."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack
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
    "PACKED_FIELD",
    "PAYLOAD_FORMAT",
    "WIRE_NAMES",
    "edit_payload",
    "edit_metric",
    "fold_records",
    "unfold_records",
    "all_finite",
    "has_payload",
    "model_digest",
]

#: Name of the ConfigRecord that carries fedsqueeze's blob and bookkeeping, in both directions.
PAYLOAD_KEY = "fsq"
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


#: The payload record's one field: the payload packed as a msgpack array, ``[PAYLOAD_FORMAT, *fields]``.
PACKED_FIELD = "p"
#: Version of that layout; a node and a server of different layouts refuse each other's payloads.
PAYLOAD_FORMAT = 2
#: Strings that travel as their index in this tuple (one byte) instead of their characters: payload
#: kinds, record names and the metric and config keys that fedsqueeze's own apps send every round.
#: Append only: an index is part of the wire format.
WIRE_NAMES = (
    FULL,
    DELTA,
    ARRAYS_KEY,
    METRICS_KEY,
    CONFIG_KEY,
    "num-examples",
    "train-loss",
    TRAIN_TIME_METRIC,
    ENCODE_TIME_METRIC,
    "local-epochs",
    "batch-size",
    "lr",
    "momentum",
    "server-round",
    ARCH_CONFIG_KEY,
)
_WIRE_INDEX = {name: i for i, name in enumerate(WIRE_NAMES)}
_NAME = (int, str)  # a string, or its index in WIRE_NAMES
#: (name, type or types) of each packed field, in order
Fields = tuple[tuple[str, type | tuple[type, ...]], ...]
_DOWNLINK_FIELDS: Fields = (
    ("kind", _NAME),
    ("version", int),
    ("base", int),
    ("blobs", list),
    ("uplink", str),
    ("arrays-key", _NAME),
    ("error-feedback", bool),
    ("max-feedback-staleness", int),
    ("base-digest", bytes),
    ("arch", str),
    ("digest", bytes),
    ("folded", list),
)
_UPLINK_FIELDS: Fields = (
    ("kind", _NAME),
    ("version", int),
    ("blob", bytes),
    ("folded", list),
)
#: Small records that travel inside the payload (the train config down, the reply's metrics up)
FoldedRecords = Mapping[str, ConfigRecord | MetricRecord]


def _to_wire(name: str) -> int | str:
    return _WIRE_INDEX.get(name, name)


def _from_wire(name: Any, what: str) -> str:
    if isinstance(name, int) and not isinstance(name, bool) and 0 <= name < len(WIRE_NAMES):
        return WIRE_NAMES[name]
    if isinstance(name, str):
        return name
    raise ProtocolError(f"fedsqueeze payload {what} must be a string or a known name's index, got {name!r}")


def _pack(fields: Fields, values: list[Any]) -> ConfigRecord:
    assert len(values) == len(fields)
    return ConfigRecord({PACKED_FIELD: msgpack.packb([PAYLOAD_FORMAT, *values], use_bin_type=True)})


def _unpack(record: ConfigRecord, fields: Fields) -> dict[str, Any]:
    """The raw fields of a packed payload record, by name, with their types checked.

    Raises
    ------
    ProtocolError
        If the record is not one packed field, not msgpack of this format, or a field has the wrong type.
    """
    if set(record) != {PACKED_FIELD} or not isinstance(record[PACKED_FIELD], bytes):
        raise ProtocolError(
            f"fedsqueeze payload must hold one bytes field {PACKED_FIELD!r}, got fields {sorted(record)} "
            "(a node or server from before payload format 2?)"
        )
    try:  # msgpack builds only plain values (no code runs); nesting and sizes are bounded by the data
        items = msgpack.unpackb(record[PACKED_FIELD], raw=False, strict_map_key=False, use_list=True)
    except Exception as err:  # msgpack raises several unrelated types for malformed input
        raise ProtocolError(f"fedsqueeze payload is not valid msgpack: {type(err).__name__}: {err}") from err
    if not isinstance(items, list) or not items or items[0] != PAYLOAD_FORMAT:
        found = items[0] if isinstance(items, list) and items else type(items).__name__
        raise ProtocolError(f"fedsqueeze payload format must be {PAYLOAD_FORMAT}, got {found!r}")
    if len(items) != len(fields) + 1:
        raise ProtocolError(f"fedsqueeze payload must hold {len(fields)} fields, got {len(items) - 1}")
    out = {}
    for (name, kind), value in zip(fields, items[1:], strict=True):
        if not isinstance(value, kind) or isinstance(value, bool) and kind is int:
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            raise ProtocolError(
                f"fedsqueeze payload field {name!r} has type {type(value).__name__}, expected {expected}"
            )
        out[name] = value
    return out


def edit_payload(record: ConfigRecord, **changes: Any) -> ConfigRecord:
    """A copy of a packed uplink or downlink payload record with raw fields replaced by any value.

    For tests and fault injection (a hostile node). Field names take ``_`` for ``-``.
    """
    values = msgpack.unpackb(record[PACKED_FIELD], raw=False, strict_map_key=False)[1:]
    fields = _UPLINK_FIELDS if len(values) == len(_UPLINK_FIELDS) else _DOWNLINK_FIELDS
    names = [name.replace("-", "_") for name, _ in fields]
    unknown = set(changes) - set(names)
    if unknown:
        raise KeyError(f"no payload fields {sorted(unknown)}; the fields are {names}")
    return _pack(fields, [changes.get(n, v) for n, v in zip(names, values, strict=True)])


def edit_metric(record: ConfigRecord, name: str, value: Any) -> ConfigRecord:
    """A copy of an uplink payload record whose first folded record has ``name`` set to any value.

    For tests and fault injection, as :func:`edit_payload`.
    """
    first, *rest = fold_records(Uplink.from_record(record).folded)
    first[2] = {k: v for k, v in first[2].items() if k != _to_wire(name)} | {name: value}
    return edit_payload(record, folded=[first, *rest])


def _kind(value: Any) -> str:
    kind = _from_wire(value, "kind")
    if kind not in (FULL, DELTA):
        raise ProtocolError(f"fedsqueeze payload kind must be {FULL!r} or {DELTA!r}, got {kind!r}")
    return kind


def _digest_to_wire(digest: str) -> bytes:
    return bytes.fromhex(digest)


def _digest_from_wire(raw: bytes, name: str) -> str:
    if len(raw) not in (0, 32):
        raise ProtocolError(
            f"fedsqueeze payload field {name!r} must be a 32-byte SHA-256 or empty, got {len(raw)} bytes"
        )
    return raw.hex()


@dataclass
class Downlink:
    """What the server sends a node: the model as one full blob or a chain of delta blobs.

    On the wire it is one record of one field (see :data:`PACKED_FIELD`), with the small records
    of the message (``folded``) inside it: every record costs its own object on the wire (a
    64-character id in the message's object tree, a header and a body).

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
        (default: True). Without, the node also drops the residual it kept: the server sends
        False for one round to a node whose update it dropped as an outlier.
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
        checks; empty: no check.
    folded : dict
        The message's other small records (the train config), which the node hands its app.
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
    folded: FoldedRecords = field(default_factory=dict)

    def to_record(self) -> ConfigRecord:
        """Pack into the ConfigRecord that travels under :data:`PAYLOAD_KEY`.

        Raises
        ------
        ProtocolError
            If a folded record cannot travel (see :func:`fold_records`).
        """
        values = [
            _to_wire(self.kind),
            self.version,
            self.base,
            list(self.blobs),
            self.uplink,
            _to_wire(self.arrays_key),
            self.error_feedback,
            self.max_feedback_staleness,
            _digest_to_wire(self.base_digest),
            self.arch,
            _digest_to_wire(self.digest),
            fold_records(self.folded),
        ]
        return _pack(_DOWNLINK_FIELDS, values)

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Downlink:
        """Unpack and check a received record; :class:`ProtocolError` if it is malformed."""
        f = _unpack(record, _DOWNLINK_FIELDS)
        kind, blobs = _kind(f["kind"]), f["blobs"]
        if not blobs or not all(isinstance(b, bytes) for b in blobs):
            raise ProtocolError("fedsqueeze payload field 'blobs' must be a non-empty list of bytes")
        if kind == FULL and len(blobs) != 1:
            raise ProtocolError(f"a full fedsqueeze payload holds exactly one blob, got {len(blobs)}")
        return cls(
            kind=kind,
            version=f["version"],
            base=f["base"],
            blobs=blobs,
            uplink=f["uplink"],
            arrays_key=_from_wire(f["arrays-key"], "arrays key"),
            error_feedback=f["error-feedback"],
            max_feedback_staleness=f["max-feedback-staleness"],
            base_digest=_digest_from_wire(f["base-digest"], "base-digest"),
            arch=f["arch"],
            digest=_digest_from_wire(f["digest"], "digest"),
            folded=unfold_records(f["folded"]),
        )


@dataclass
class Uplink:
    """What a node replies: its local model (lossless codec) or its update against ``version``.

    On the wire it is one record of one field, as :class:`Downlink`, with the reply's metrics inside.

    Parameters
    ----------
    kind : str
        :data:`FULL` (the blob holds the local weights) or :data:`DELTA` (local minus reference).
    version : int
        Version of the reference the node trained from (and still holds).
    blob : bytes
        Codec blob.
    folded : dict
        The reply's other small records (its metrics), which the server hands its strategy.
    """

    kind: str
    version: int
    blob: bytes
    folded: FoldedRecords = field(default_factory=dict)

    def to_record(self) -> ConfigRecord:
        """Pack into the ConfigRecord that travels under :data:`PAYLOAD_KEY`."""
        return _pack(_UPLINK_FIELDS, [_to_wire(self.kind), self.version, self.blob, fold_records(self.folded)])

    @classmethod
    def from_record(cls, record: ConfigRecord) -> Uplink:
        """Unpack and check a received record; :class:`ProtocolError` if it is malformed."""
        f = _unpack(record, _UPLINK_FIELDS)
        return cls(_kind(f["kind"]), f["version"], f["blob"], unfold_records(f["folded"]))


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
    out = ArrayRecord()  # filled in place: ArrayRecord(dict) copies every Array once more
    for name, value in tensors.items():
        array = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        out[name] = Array(np.require(array, requirements="C"))  # not ascontiguousarray: it makes 0-d arrays 1-d
    return out


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
    return {name: torch.add(b, _as_dtype(delta[name], b.dtype)) for name, b in base.items()}


def subtract_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``a - b`` per tensor in ``a``'s dtypes (names and shapes must match, see :func:`add_tensors`)."""
    difference = layout_difference(b, a)
    if difference is not None:
        raise ValueError(f"cannot subtract: {difference}")
    return {name: torch.sub(x, _as_dtype(b[name], x.dtype)) for name, x in a.items()}


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call when it would return ``t`` (a node round makes ~20 per model)."""
    return t if t.dtype == dtype else t.to(dtype)


def all_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Return the name of the first float tensor holding NaN or infinity, else None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not _finite(t):
            return name
    return None


_SUMMED = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""Float dtypes with a CPU sum (float8 has none): :func:`_finite` tries the sum first on these."""


def _finite(t: torch.Tensor) -> bool:
    # NaN and infinity always reach the sum, so a finite sum settles it; only a sum that overflowed
    # (or met NaN) needs the exact test, which costs 8-18x a sum on the AVX-512 machines (189 us
    # against 22 us for a LeNet-5 model, 1 thread; benchmarks/encode-speed-5/finite_check.py), and
    # is paid by every node and every reply. The same check as fedsqueeze.codecs' own.
    summed = t.dtype in _SUMMED and math.isfinite(float(torch.sum(t)))
    return summed or bool(torch.isfinite(t).all())


def fold_records(records: Mapping[str, ConfigRecord | MetricRecord]) -> list[list[Any]]:
    """Small records as payload values: ``[name, is_metric, {key: value}]`` each, known names as indices.

    Raises
    ------
    ProtocolError
        If a record is neither a ConfigRecord nor a MetricRecord.
    """
    out = []
    for name, record in records.items():
        if not isinstance(record, (ConfigRecord, MetricRecord)):
            raise ProtocolError(f"cannot fold record {name!r} of type {type(record).__name__}")
        values = {_to_wire(key): value for key, value in record.items()}
        out.append([_to_wire(name), isinstance(record, MetricRecord), values])
    return out


def unfold_records(folded: list[Any]) -> dict[str, ConfigRecord | MetricRecord]:
    """The records that :func:`fold_records` packed.

    Raises
    ------
    ProtocolError
        If an entry is malformed, a metric is not a number or a list of numbers, or a config value
        is not one a ConfigRecord holds.
    """
    out: dict[str, ConfigRecord | MetricRecord] = {}
    for entry in folded:
        if not (
            isinstance(entry, list) and len(entry) == 3 and isinstance(entry[1], bool) and isinstance(entry[2], dict)
        ):
            raise ProtocolError(f"a folded record must be [name, is_metric, {{key: value}}], got {entry!r:.200}")
        name = _from_wire(entry[0], "record name")
        values = {_from_wire(k, f"key in record {name!r}"): v for k, v in entry[2].items()}
        out[name] = _metric_record(name, values) if entry[1] else _config_record(name, values)
    return out


def _config_record(name: str, values: dict[str, Any]) -> ConfigRecord:
    try:
        return ConfigRecord(values)
    except (TypeError, ValueError) as err:
        raise ProtocolError(f"folded config record {name!r} holds a value a ConfigRecord cannot: {err}") from err


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
