"""A DistributedDataParallel communication hook that sends each gradient bucket as a fedsqueeze blob.

Usage, on every rank after ``torch.distributed.init_process_group("gloo", ...)``::

    from fedsqueeze.codecs.ddp import CodecHookState, comm_hook

    model = torch.nn.parallel.DistributedDataParallel(net)
    state = CodecHookState("topk(ratio=0.01) | quantize(bits=8) | zstd")
    model.register_comm_hook(state, comm_hook)

The hook replaces DDP's all-reduce of a bucket with: encode the bucket (plus the residual error
feedback carried for that bucket) into a blob, all-gather the blobs as uint8 tensors (lengths
first, then the bytes padded to the longest), decode every rank's blob and average. Nothing is
pickled. As in torch's PowerSGD hook, the user's hyperparameters (:class:`CodecHookConfig`) are
kept apart from the state the hook builds up (:class:`CodecHookState`: residuals, counters).

This module imports only the standard library, torch and the rest of ``fedsqueeze.codecs``.
"""

# No `from __future__ import annotations` here: DDP's register_comm_hook compares the hook's
# annotations with dist.GradBucket and Future[Tensor] at runtime, and strings would not match.
from dataclasses import dataclass

import torch
import torch.distributed as dist

from . import Codec, DecodeLimits, ErrorFeedback, decode, parse

__all__ = ["CodecHookConfig", "CodecHookState", "all_gather_bytes", "comm_hook"]

#: Name of the single tensor a bucket's blob holds.
BUCKET_TENSOR = "bucket"


@dataclass(frozen=True)
class CodecHookConfig:
    """What the user chooses for :func:`comm_hook`.

    Parameters
    ----------
    codec : str
        Codec spec for the gradient buckets, e.g. ``"topk(ratio=0.01) | quantize(bits=8) | zstd"``.
    error_feedback : bool
        Carry what the codec dropped from a bucket into that bucket's next gradient (default: True).
        Without it, sparsifying or low-bit codecs usually stop training from converging.
    seed : int
        Seed of the codec's randomness; rank r uses ``seed + r`` (default: 0).
    process_group : dist.ProcessGroup or None
        Group to exchange over; None is the default group (default: None).
    """

    codec: str
    error_feedback: bool = True
    seed: int = 0
    process_group: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        parse(self.codec)  # a bad spec fails here, naming the stage and parameter, not in backward


class CodecHookState:
    """The state :func:`comm_hook` keeps between calls: the config, per-bucket encoders and byte counters.

    Parameters
    ----------
    config : CodecHookConfig or str
        The hyperparameters, or just a codec spec (the other fields take their defaults).

    Attributes
    ----------
    bytes_sent : int
        Blob bytes this rank has sent (the padding of the all-gather not counted).
    fp32_bytes : int
        What the same buckets take as float32: the all-reduce baseline.
    calls : int
        Buckets encoded so far.
    """

    def __init__(self, config: CodecHookConfig | str) -> None:
        self.config = CodecHookConfig(config) if isinstance(config, str) else config
        self.bytes_sent = 0
        self.fp32_bytes = 0
        self.calls = 0
        # one encoder per bucket index: its own error-feedback residual and codec state
        self._encoders: dict[int, ErrorFeedback | Codec] = {}

    def encoder(self, bucket_index: int) -> ErrorFeedback | Codec:
        """The encoder of one bucket (its own residual and codec state), made on first use."""
        if bucket_index not in self._encoders:
            rank = dist.get_rank(self.config.process_group) if dist.is_initialized() else 0
            codec = parse(self.config.codec, seed=self.config.seed + rank)
            self._encoders[bucket_index] = ErrorFeedback(codec) if self.config.error_feedback else codec
        return self._encoders[bucket_index]

    @property
    def ratio(self) -> float:
        """FP32 bytes over blob bytes sent so far (0.0 before the first bucket)."""
        return self.fp32_bytes / self.bytes_sent if self.bytes_sent else 0.0


def all_gather_bytes(blob: bytes, group: dist.ProcessGroup | None = None) -> list[bytes]:
    """Every rank's ``blob``, in rank order, exchanged as uint8 tensors (no pickle).

    Two collectives: the lengths (int64), then the bytes padded to the longest length. Works on
    any backend that all-gathers CPU tensors (gloo).

    Raises
    ------
    ValueError
        If ``blob`` is empty (a fedsqueeze blob never is).
    """
    if not blob:
        raise ValueError("all_gather_bytes: expected a non-empty blob, found 0 bytes")
    world = dist.get_world_size(group)
    length = torch.tensor([len(blob)], dtype=torch.int64)
    lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[: len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
    gathered = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [t[: int(n.item())].numpy().tobytes() for t, n in zip(gathered, lengths, strict=True)]


def _decode_bucket(blob: bytes, numel: int, source: int) -> torch.Tensor:
    """Decode one rank's blob of a bucket, checking it holds one float tensor of ``numel`` elements."""
    # the element budget counts every stage's parts too (top-k values and indices, scales): a few
    # times the bucket, so that a hostile blob cannot make a rank allocate far more than a bucket
    limits = DecodeLimits(max_elements=4 * numel + 4096, max_tensors=1)
    tensors = decode(blob, limits=limits)
    got = tensors.get(BUCKET_TENSOR)
    if got is None or got.numel() != numel:
        found = {name: tuple(t.shape) for name, t in tensors.items()}
        raise ValueError(f"rank {source} sent a bucket blob holding {found}; expected {BUCKET_TENSOR!r} of {numel}")
    return got.reshape(-1).to(torch.float32)


def comm_hook(state: CodecHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average a gradient bucket over the ranks, sending it through the state's codec.

    Contract (DDP's): returns a completed future holding a tensor of the bucket's shape and dtype,
    the mean over ranks of what each rank's blob decodes to. With a lossless codec this is DDP's
    own average up to float rounding. Every rank must register the same config. The exchange is
    synchronous (the future is complete on return), so it does not overlap with backward.
    """
    buffer = bucket.buffer()
    flat = buffer.detach().reshape(-1)
    blob = state.encoder(bucket.index()).encode({BUCKET_TENSOR: flat.to(torch.float32)})
    state.bytes_sent += len(blob)
    state.fp32_bytes += 4 * flat.numel()
    state.calls += 1
    blobs = all_gather_bytes(blob, state.config.process_group)
    total = torch.zeros(flat.numel(), dtype=torch.float32)
    for source, received in enumerate(blobs):
        total += _decode_bucket(received, flat.numel(), source)
    buffer.copy_((total / len(blobs)).reshape(buffer.shape).to(buffer.dtype))
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(buffer)
    return future
