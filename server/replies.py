"""Checking train replies before any strategy sees them: one bad reply never reaches aggregation.

:class:`ReplyChecker` turns a reply into plain weights, or raises :class:`Rejected` with the
reason. It checks, in order: an error reply; the shape of the fedsqueeze payload record; the
codec named in the blob's header against the round's uplink codec (the server decodes
nothing else); the model version; the blob under :class:`~fedsqueeze.codecs.DecodeLimits`
sized from the global model; names, shapes, dtypes and finiteness; the arrays key; and the
metrics (numbers only, finite, the weighting key a positive integer). Replies from nodes
without the client mod (plain FP32 arrays) get the same checks, with the numpy payload read
without trusting its header.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Message, MetricRecord

from fedsqueeze.codecs import Codec, CodecError, DecodeLimits, blob_spec, decode
from fedsqueeze.protocol import (
    FULL,
    PAYLOAD_KEY,
    ProtocolError,
    Uplink,
    add_tensors,
    all_finite,
    layout_difference,
)

__all__ = ["Rejected", "Accepted", "ReplyChecker", "decode_limits_for", "read_plain_array"]

Tensors = dict[str, torch.Tensor]


class Rejected(Exception):
    """A reply cannot be aggregated; the message says why."""


@dataclass(frozen=True)
class Accepted:
    """A checked reply: ``kind`` (full, delta or plain), the decoded weights, the reply's metrics
    (under their record name) and the bytes of its codec blob."""

    kind: str
    weights: Tensors
    metrics_name: str
    metrics: MetricRecord
    payload_bytes: int


def decode_limits_for(model: Mapping[str, torch.Tensor]) -> DecodeLimits:
    """Caps for decoding a reply to ``model``: a hostile blob cannot cost much more than the model.

    Codecs decode through intermediates of up to about twice the model; four times leaves room.
    """
    elements = sum(t.numel() for t in model.values())
    fp32_bytes = sum(4 * t.numel() + len(k.encode()) for k, t in model.items())
    return DecodeLimits(
        max_elements=4 * elements + 2**20, max_body_bytes=4 * fp32_bytes + 2**20, max_tensors=len(model)
    )


@dataclass
class ReplyChecker:
    """Everything a reply is checked against in one round.

    Parameters
    ----------
    uplink : Codec
        The round's uplink codec (the configured one, or its warmed form during a sparsity
        warm-up); a blob whose header names another spec is rejected.
    global_model : Tensors
        The model the round started from (deltas are added to it).
    dtypes : Mapping[str, torch.dtype]
        The dtype each reply tensor must have.
    arrays_key : str
        Name of the ArrayRecord the inner strategy aggregates.
    weight_key : str
        The metric the inner strategy weights replies by (e.g. ``"num-examples"``).
    """

    uplink: Codec
    global_model: Tensors
    dtypes: Mapping[str, torch.dtype]
    arrays_key: str
    weight_key: str = "num-examples"

    def __post_init__(self) -> None:
        self.limits = decode_limits_for(self.global_model)

    def check(self, reply: Message, expected_version: int | None) -> Accepted:
        """Return the reply's weights and metrics, or raise :class:`Rejected` saying why.

        ``expected_version`` is the model version this round sent to the node (None if none).
        """
        if reply.has_error():
            raise Rejected(f"it replied with error {reply.error.code}: {reply.error.reason}")
        content = reply.content
        if PAYLOAD_KEY not in content.config_records:
            weights = self._plain_weights(reply)
            return Accepted("plain", weights, *self._metrics(dict(content.metric_records)), 0)
        record = content.config_records[PAYLOAD_KEY]
        try:
            up = Uplink.from_record(record)
        except ProtocolError as err:
            raise Rejected(str(err)) from err
        everything = {**content.metric_records, **up.folded}
        metric_records = {k: v for k, v in everything.items() if isinstance(v, MetricRecord)}
        if content.array_records:
            raise Rejected("it sent ArrayRecords next to the fedsqueeze payload")
        if up.version != expected_version:
            raise Rejected(f"it trained from model version {up.version}, but this round sent {expected_version}")
        weights = self._decoded_weights(up)
        return Accepted(up.kind, weights, *self._metrics(metric_records), len(up.blob))

    # ------------------------------------------------------------------ weights
    def _decoded_weights(self, up: Uplink) -> Tensors:
        try:
            spec = blob_spec(up.blob)
        except CodecError as err:
            raise Rejected(f"its blob cannot be decoded: {err}") from err
        if spec != self.uplink.spec:
            raise Rejected(
                f"its blob was encoded with {spec!r}, expected the configured {self.uplink.spec!r} of this round"
            )
        try:
            decoded = decode(up.blob, limits=self.limits)
        except CodecError as err:
            raise Rejected(f"its blob cannot be decoded: {err}") from err
        if up.kind == FULL:
            self._check_layout(decoded, "model")
            return decoded
        self._check_layout(decoded, "update", dtypes=False)
        weights = {k: v.to(self.dtypes[k]) for k, v in add_tensors(self.global_model, decoded).items()}
        self._check_layout(weights, "model")
        return weights

    def _plain_weights(self, reply: Message) -> Tensors:
        records = reply.content.array_records
        if len(records) != 1 or self.arrays_key not in records:
            raise Rejected(
                f"it replied with ArrayRecords {sorted(records)} and no fedsqueeze payload, "
                f"expected exactly one named {self.arrays_key!r}"
            )
        record: ArrayRecord = records[self.arrays_key]
        if set(record) != set(self.global_model):
            missing, extra = sorted(set(self.global_model) - set(record)), sorted(set(record) - set(self.global_model))
            raise Rejected(f"array names differ: missing {missing}, unexpected {extra}")
        weights = {}
        for name, ref in self.global_model.items():
            try:
                weights[name] = torch.from_numpy(read_plain_array(record[name], tuple(ref.shape), self.dtypes[name]))
            except ValueError as err:
                raise Rejected(f"array {name!r}: {err}") from err
        self._check_layout(weights, "array")
        return weights

    def _check_layout(self, tensors: Tensors, what: str, *, dtypes: bool = True) -> None:
        difference = layout_difference(tensors, self.global_model)
        if difference is not None:
            raise Rejected(f"{what} {difference}")
        for name, t in tensors.items():
            if dtypes and t.dtype != self.dtypes[name]:
                raise Rejected(f"{what} {name!r} has dtype {t.dtype}, expected {self.dtypes[name]}")
        bad = all_finite(tensors)
        if bad is not None:
            raise Rejected(f"{what} {bad!r} holds NaN or infinite values")

    # ------------------------------------------------------------------ metrics
    def _metrics(self, records: Mapping[str, MetricRecord]) -> tuple[str, MetricRecord]:
        """The reply's one MetricRecord, checked: numbers only, finite, a positive integer weight."""
        if len(records) != 1:
            raise Rejected(f"it replied with {len(records)} MetricRecords, expected one")
        name, metrics = next(iter(records.items()))
        for key, value in metrics.items():
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
                raise Rejected(f"its metric {key!r} is {value!r}, expected finite numbers")
        weight = metrics.get(self.weight_key)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0 or weight != int(weight):
            raise Rejected(f"its metric {self.weight_key!r} is {weight!r}, expected a positive integer")
        return name, metrics


def read_plain_array(array: Array, shape: tuple[int, ...], dtype: torch.dtype) -> np.ndarray:
    """Read a numpy-serialised Flower Array of a known shape and dtype, trusting nothing in it.

    Unlike :meth:`flwr.app.Array.numpy`, it checks the ``.npy`` header against ``shape`` and
    ``dtype`` and the data length before reading, so a hostile header cannot make it allocate.

    Raises
    ------
    ValueError
        If the serialisation type, header, dtype, shape or length differ from what is expected.
    """
    if array.stype != "numpy.ndarray":
        raise ValueError(f"serialisation type is {array.stype!r}, expected 'numpy.ndarray'")
    expected_dtype = np.dtype(str(dtype).removeprefix("torch."))
    buffer = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(buffer)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        header_shape, fortran, header_dtype = read_header(buffer)
    except (ValueError, EOFError, SyntaxError, TypeError) as err:
        raise ValueError(f"its .npy header cannot be read: {err}") from err
    if tuple(header_shape) != shape or fortran or header_dtype != expected_dtype:
        raise ValueError(
            f"its .npy header says shape {tuple(header_shape)}, dtype {header_dtype}, fortran {fortran}; "
            f"expected shape {shape}, dtype {expected_dtype}, C order"
        )
    body = array.data[buffer.tell() :]
    expected_bytes = expected_dtype.itemsize * math.prod(shape)
    if len(body) != expected_bytes:
        raise ValueError(f"it holds {len(body)} data bytes, expected {expected_bytes}")
    return np.frombuffer(body, dtype=expected_dtype).reshape(shape).copy()
