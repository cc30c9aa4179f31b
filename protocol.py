"""What fedsqueeze's client and server agree on: payload records, run-config defaults, wire sizes."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
from flwr.app.message.message import remove_content_from_message
from flwr.common.serde import message_to_proto
from flwr.supercore.inflatable.inflatable_object import (
    get_all_nested_objects,
    get_object_tree,
    no_object_id_recompute,
)

__all__ = [
    "PAYLOAD_KEY",
    "ARRAYS_KEY",
    "METRICS_KEY",
    "CONFIG_KEY",
    "ENCODE_TIME_METRIC",
    "TRAIN_TIME_METRIC",
    "UPLINK_BYTES_METRIC",
    "FULL",
    "DELTA",
    "ZERO_VERSION",
    "RUN_CONFIG_DEFAULTS",
    "ProtocolError",
    "Downlink",
    "Uplink",
    "resolve_run_config",
    "proxy_holdout",
    "arrays_to_tensors",
    "tensors_to_arrays",
    "add_tensors",
    "subtract_tensors",
    "message_bytes",
    "all_finite",
    "has_payload",
]

#: Name of the ConfigRecord that carries fedsqueeze's blob and bookkeeping, in both directions.
PAYLOAD_KEY = "fedsqueeze"
#: Flower's conventional names of the model, metrics and config records in a message.
ARRAYS_KEY = "arrays"
METRICS_KEY = "metrics"
CONFIG_KEY = "config"
#: Metrics that the client mod adds to a train reply.
ENCODE_TIME_METRIC = "fedsqueeze-encode-s"
#: Metric of fedsqueeze's own ClientApp: seconds of local training (for the codec's share of client time).
TRAIN_TIME_METRIC = "train-seconds"
UPLINK_BYTES_METRIC = "fedsqueeze-uplink-bytes"
#: Payload kinds: the full model (lossless) or a delta against a reference both sides hold.
FULL = "full"
DELTA = "delta"
#: The reference version every node holds without being sent anything: the all-zero model.
ZERO_VERSION = 0

#: Defaults of every ``[tool.flwr.app.config]`` key; ``run_simulation`` passes an empty run config.
RUN_CONFIG_DEFAULTS: dict[str, bool | int | float | str] = {
    "num-server-rounds": 12,
    "fraction-train": 1.0,
    "fraction-evaluate": 0.0,
    "min-train-nodes": 2,
    "local-epochs": 1,
    "batch-size": 32,
    "lr": 0.05,
    "momentum": 0.9,
    "model": "lenet5",
    "dataset": "mnist",
    "data-dir": "",
    "partitioner": "dirichlet",
    "dirichlet-alpha": 0.5,
    "classes-per-partition": 2,
    "max-samples-per-client": 2000,
    "uplink-codec": "topk(ratio=0.01) | quantize(bits=8) | zstd",
    "downlink-codec": "quantize(bits=8) | zstd",
    "error-feedback": True,
    "start-from-zero": True,
    "strategy": "fedavg",
    "proximal-mu": 0.01,
    "server-lr": 0.0,
    "seed": 0,
    "results-dir": "results",
    # Server-side distillation into a compact student (off while distill-every is 0); the
    # defaults are what simulation/distill_bench found on MNIST/LeNet-5, sized to a few seconds.
    "distill-every": 0,
    "distill-epochs": 2,
    "distill-temperature": 3.0,
    "distill-lr": 0.003,
    "distill-ensemble": False,
    "proxy-size": 5000,
    "student-linear-rank": 12,
    "student-conv-rank": 0,
    "student-prune-ratio": 0.5,
    "student-bits": 8,
}


class ProtocolError(ValueError):
    """A fedsqueeze payload record is missing fields or holds values of the wrong type."""


def resolve_run_config(run_config: Mapping[str, Any]) -> dict[str, bool | int | float | str]:
    """Merge a run config over :data:`RUN_CONFIG_DEFAULTS`, checking the types of known keys.

    Parameters
    ----------
    run_config : Mapping[str, Any]
        ``context.run_config`` (may be empty or partial).

    Returns
    -------
    dict
        Every default key, overridden where ``run_config`` sets it; unknown keys are kept.

    Raises
    ------
    ValueError
        If a known key holds a value of the wrong type (an int where a float is expected is fine).
    """
    out: dict[str, bool | int | float | str] = dict(RUN_CONFIG_DEFAULTS)
    for key, value in run_config.items():
        default = RUN_CONFIG_DEFAULTS.get(key)
        if default is not None:
            expected = type(default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not expected:
                raise ValueError(
                    f"run config {key!r} must be {expected.__name__} (default: {default!r}), got {value!r}"
                )
        out[key] = value
    return out


def proxy_holdout(run: Mapping[str, Any]) -> int:
    """Training images the server keeps as its unlabeled proxy set, and no client gets.

    ``proxy-size`` when server-side distillation is on (``distill-every`` > 0), else 0.
    Clients pass it as ``holdout`` to :func:`fedsqueeze.data.client_data`, the server takes
    the same images with :func:`fedsqueeze.server.distill.proxy_split`; both seed the split
    with ``seed``, so they agree without exchanging anything.

    Parameters
    ----------
    run : Mapping[str, Any]
        Resolved run config (see :func:`resolve_run_config`).

    Returns
    -------
    int
        Number of held-out training images, >= 0.

    Raises
    ------
    ValueError
        If ``distill-every`` or ``proxy-size`` is negative, or distillation is on with
        ``proxy-size`` 0.
    """
    every, size = int(run["distill-every"]), int(run["proxy-size"])
    if every < 0:
        raise ValueError(f"run config 'distill-every' must be >= 0 (0 turns distillation off), got {every}")
    if size < 0:
        raise ValueError(f"run config 'proxy-size' must be >= 0, got {size}")
    if every == 0:
        return 0
    if size == 0:
        raise ValueError("run config 'distill-every' > 0 needs unlabeled proxy images: set 'proxy-size' > 0 (e.g. 5000)")
    return size


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
    """

    kind: str
    version: int
    base: int
    blobs: list[bytes]
    uplink: str
    arrays_key: str = ARRAYS_KEY
    error_feedback: bool = True

    def to_record(self) -> ConfigRecord:
        """Pack into the ConfigRecord that travels under :data:`PAYLOAD_KEY`."""
        return ConfigRecord(
            {
                "kind": self.kind,
                "version": self.version,
                "base": self.base,
                "blobs": list(self.blobs),
                "uplink": self.uplink,
                "arrays-key": self.arrays_key,
                "error-feedback": self.error_feedback,
            }
        )

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
            error_feedback=_field(record, "error-feedback", bool) if "error-feedback" in record else True,
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
    arrays_key : str
        Name of the ArrayRecord that the node's training code replied with (default: ``"arrays"``).
    """

    kind: str
    version: int
    blob: bytes
    arrays_key: str = ARRAYS_KEY

    def to_record(self) -> ConfigRecord:
        """Pack into the ConfigRecord that travels under :data:`PAYLOAD_KEY`."""
        return ConfigRecord(
            {"kind": self.kind, "version": self.version, "blob": self.blob, "arrays-key": self.arrays_key}
        )

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
            arrays_key=_field(record, "arrays-key", str),
        )


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


def add_tensors(base: Mapping[str, torch.Tensor], delta: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``base + delta`` per tensor in ``base``'s dtypes.

    Client and server both use this one function, so that a reference updated by the same
    decoded deltas is bit-identical on both sides.

    Raises
    ------
    ValueError
        If the names or shapes differ.
    """
    if set(base) != set(delta):
        missing, extra = sorted(set(base) - set(delta)), sorted(set(delta) - set(base))
        raise ValueError(f"delta does not match the reference: missing {missing}, unexpected {extra}")
    out = {}
    for name, b in base.items():
        d = delta[name]
        if tuple(d.shape) != tuple(b.shape):
            raise ValueError(f"delta[{name!r}] has shape {tuple(d.shape)}, the reference {tuple(b.shape)}")
        out[name] = torch.add(b, d.to(b.dtype))
    return out


def subtract_tensors(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Return ``a - b`` per tensor (names and shapes must match, see :func:`add_tensors`)."""
    if set(a) != set(b):
        raise ValueError(f"cannot subtract: names differ ({sorted(set(a) ^ set(b))})")
    out = {}
    for name, x in a.items():
        y = b[name]
        if tuple(x.shape) != tuple(y.shape):
            raise ValueError(f"cannot subtract {name!r}: shapes {tuple(x.shape)} and {tuple(y.shape)}")
        out[name] = torch.sub(x, y.to(x.dtype))
    return out


def all_finite(tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Return the name of the first float tensor holding NaN or infinity, else None."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return name
    return None


def message_bytes(message: Message) -> int:
    """Bytes Flower 1.42 moves between SuperLink and SuperNode for ``message`` (either way).

    Flower sends a message in pieces: the message proto without content plus its object
    tree (``PushMessages`` / ``PullMessages``), then every object of the tree, each
    deflated to a header and a body (``PushObject`` / ``PullObject``): the Message, its
    RecordDict, each record, each Array and each distinct ArrayChunk (up to 5 MiB each).
    The count is the serialized size of the message proto (with the ``message_id`` that
    the SuperLink assigns, the object ID of the message) plus the serialized object tree
    plus the length of every distinct object's deflated content. It leaves out HTTP and
    TLS framing and the per-request fields (node, run and session IDs, the 64-character
    object ID of each ``PushObject`` request), and it does not model that the SuperLink
    skips objects it already holds from other messages.

    Parameters
    ----------
    message : Message
        Any message, with content or with an error.

    Returns
    -------
    int
        The size in bytes.
    """
    with no_object_id_recompute():  # hash each object once
        return _message_bytes(message)


def _message_bytes(message: Message) -> int:
    envelope = message_to_proto(remove_content_from_message(message))
    # The SuperLink names a message by its object ID (64 hex digits); the simulation engine
    # uses a shorter UUID and a message not sent yet has none: count what a deployment sends.
    envelope.metadata.message_id = message.object_id
    objects = get_all_nested_objects(message)
    body = sum(len(obj.deflate()) for obj in objects.values())
    return envelope.ByteSize() + get_object_tree(message).ByteSize() + body
