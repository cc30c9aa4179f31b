"""The run config of fedsqueeze's Flower apps: one typed, frozen object, and the only place defaults live.

Flower hands each app ``context.run_config``, a flat mapping of kebab-case keys to bools, ints,
floats and strings (``[tool.flwr.app.config]`` in pyproject.toml, overridden by
``flwr run --run-config``). :meth:`RunConfig.from_mapping` turns it into a :class:`RunConfig`:
every key known, every value of its type, defaults filled in. Client and server both read it,
so it lives at the package root.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

__all__ = ["RunConfig", "ConfigValue", "STUDENT_ARCHS", "proxy_holdout"]

ConfigValue = bool | int | float | str

#: Values of ``initial-model``: nodes build the first model from the run's seed (checked by
#: digest), start from the all-zero model, or are sent it in full.
INITIAL_MODELS = ("seeded", "zeros", "sent")
#: Values of ``student-arch``: the student pruned and factored from the global model, or the small
#: strided CNN distilled from scratch (fewer graph nodes: faster at batch 1).
STUDENT_ARCHS = ("pruned", "strided")


@dataclass(frozen=True)
class RunConfig(Mapping[str, ConfigValue]):
    """Every setting of a fedsqueeze run, typed; the attribute ``foo_bar`` is the key ``foo-bar``.

    It is also a read-only mapping from the kebab-case keys to values (``run["lr"]``), the shape
    in which Flower passes run configs and results files record them.
    """

    # Federated training
    num_server_rounds: int = 12
    fraction_train: float = 1.0
    fraction_evaluate: float = 0.0
    min_train_nodes: int = 2
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.9
    model: str = "lenet5"
    dataset: str = "mnist"
    data_dir: str = ""
    partitioner: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_partition: int = 2
    max_samples_per_client: int = 2000
    strategy: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.0
    server_momentum: float = 0.0
    seed: int = 0
    results_dir: str = "results"
    # Compression
    # The defaults: of the pairs measured within one point of FP32 in S1, the one with the most total ratio that
    # also stays within one point in S3 (cross-device) and in this default run (BENCHMARKS.md, section 4)
    uplink_codec: str = "svd(rank=6) | quantize(bits=4) | zstd"
    downlink_codec: str = "svd(rank=6) | quantize(bits=4) | zstd"
    error_feedback: bool = True
    max_feedback_staleness: int = 20
    # A reply whose update is over this many times the round's median update (by L2 norm) is dropped (0: off)
    max_update_norm_ratio: float = 10.0
    # Catch-ups of nodes that missed rounds: the lossy delta codec ("": automatic, see CompressedStrategy) and the
    # server memory for per-node catch-up error feedback (0: off), see server/downlink.py
    catchup_codec: str = ""
    catchup_memory_mb: float = 256.0
    # Sparsity warm-up of the uplink's topk/randomk over this many rounds (0: off), see server/warmup.py
    uplink_warmup_rounds: int = 0
    initial_model: str = "seeded"
    # Server-side distillation into a compact student (off while distill_every is 0)
    distill_every: int = 0
    distill_epochs: int = 2
    distill_temperature: float = 3.0
    distill_lr: float = 0.003
    distill_ensemble: bool = False
    distill_latency: bool = False
    distill_onnx: bool = False
    distill_soft_weight: float = 1.0
    distill_hint_weight: float = 0.0
    proxy_size: int = 5000
    student_linear_rank: int = 12
    student_conv_rank: int = 0
    student_prune_ratio: float = 0.5
    student_bits: int = 8
    student_weight_bits: int = 0
    student_qat_epochs: int = 2
    student_prune_method: str = "norm"
    # "pruned": pruned/factored from the global model by the student-* keys above; "strided": the four-node
    # strided CNN of server/compact/fast.py, distilled from scratch (the student-*-rank/prune keys do not apply)
    student_arch: str = "pruned"
    # After the first distillation, broadcast and train the FP32 student instead of the full model, at this
    # local learning rate (its factored layers diverge at the full model's 0.05: BENCHMARKS.md section 7)
    broadcast_compact: bool = False
    broadcast_compact_lr: float = 0.02
    # Deployment: seconds the server waits for a round's replies (Flower's default 3600); a node that has not
    # replied by then is left out of the round, so a dead SuperNode costs this, not the SuperLink's heartbeat
    round_timeout: float = 3600.0
    # Continue a killed run from the checkpoint in results-dir (the same run config otherwise)
    resume: bool = False

    def __post_init__(self) -> None:
        """Check the values that have a fixed set of choices or a range."""
        if self.initial_model not in INITIAL_MODELS:
            raise ValueError(f"run config 'initial-model' must be one of {INITIAL_MODELS}, got {self.initial_model!r}")
        for key in ("num-server-rounds", "local-epochs", "batch-size"):
            if self[key] < 1:  # type: ignore[operator]
                raise ValueError(f"run config {key!r} must be >= 1, got {self[key]!r}")
        if not self.round_timeout > 0:
            raise ValueError(f"run config 'round-timeout' must be > 0 seconds, got {self.round_timeout!r}")
        if self.max_feedback_staleness < 0:
            raise ValueError(
                f"run config 'max-feedback-staleness' must be >= 0 (0: never), got {self.max_feedback_staleness}"
            )
        if not self.max_update_norm_ratio >= 0:
            raise ValueError(
                f"run config 'max-update-norm-ratio' must be >= 0 (0: off), got {self.max_update_norm_ratio!r}"
            )
        if not self.catchup_memory_mb >= 0:
            raise ValueError(f"run config 'catchup-memory-mb' must be >= 0 (0: off), got {self.catchup_memory_mb!r}")
        if self.uplink_warmup_rounds < 0:
            raise ValueError(
                f"run config 'uplink-warmup-rounds' must be >= 0 (0: off), got {self.uplink_warmup_rounds}"
            )
        if not 0.0 <= self.server_momentum < 1.0:
            raise ValueError(f"run config 'server-momentum' must be in [0, 1), got {self.server_momentum!r}")
        if self.student_arch not in STUDENT_ARCHS:
            raise ValueError(f"run config 'student-arch' must be one of {STUDENT_ARCHS}, got {self.student_arch!r}")
        if self.broadcast_compact and self.student_arch != "pruned":
            raise ValueError(
                "run config 'broadcast-compact' = true needs 'student-arch' = 'pruned' (nodes build only the pruned "
                f"student from its architecture string), got {self.student_arch!r}"
            )
        if self.broadcast_compact and self.distill_every <= 0:
            raise ValueError("run config 'broadcast-compact' = true needs a student: set 'distill-every' > 0")
        if not self.broadcast_compact_lr > 0:
            raise ValueError(f"run config 'broadcast-compact-lr' must be > 0, got {self.broadcast_compact_lr!r}")

    @classmethod
    def from_mapping(cls, run_config: Mapping[str, Any]) -> RunConfig:
        """Build from a flat kebab-case mapping such as ``context.run_config`` (may be partial).

        Raises
        ------
        ValueError
            If a key is unknown (the message names the closest known keys) or a value has the
            wrong type (an int where a float is expected is accepted).
        """
        types = cls.field_types()
        values: dict[str, ConfigValue] = {}
        for key, value in run_config.items():
            if key not in types:
                close = difflib.get_close_matches(key, list(types), n=3)
                hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
                raise ValueError(f"unknown run config key {key!r}{hint} (known keys: {', '.join(types)})")
            values[_attribute(key)] = _typed(key, value, types[key])
        return cls(**values)  # type: ignore[arg-type]

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """Kebab-case key -> the Python type of its value, in declaration order."""
        defaults = cls()
        return {_key(f.name): type(getattr(defaults, f.name)) for f in fields(cls)}

    def as_dict(self) -> dict[str, ConfigValue]:
        """Kebab-case key -> value, e.g. to write into ``summary.json``."""
        return {_key(name): value for name, value in asdict(self).items()}

    def proxy_holdout(self) -> int:
        """Training images the server keeps as its unlabeled proxy set, and no client gets.

        ``proxy-size`` when server-side distillation is on (``distill-every`` > 0), else 0.
        Clients pass it as ``holdout`` to :func:`fedsqueeze.data.client_data`; the server
        takes the same images with :func:`fedsqueeze.server.distill.proxy_split`. Both seed
        the split with ``seed``, so they agree without exchanging anything.

        Raises
        ------
        ValueError
            If ``distill-every`` or ``proxy-size`` is negative, or distillation is on with
            ``proxy-size`` 0.
        """
        if self.distill_every < 0:
            raise ValueError(
                f"run config 'distill-every' must be >= 0 (0 turns distillation off), got {self.distill_every}"
            )
        if self.proxy_size < 0:
            raise ValueError(f"run config 'proxy-size' must be >= 0, got {self.proxy_size}")
        if self.distill_every == 0:
            return 0
        if self.proxy_size == 0:
            raise ValueError("run config 'distill-every' > 0 needs unlabeled proxy images: set 'proxy-size' > 0")
        return self.proxy_size

    # Mapping protocol over the kebab-case keys
    def __getitem__(self, key: str) -> ConfigValue:
        """The value of a kebab-case key; KeyError if the key is unknown."""
        if key not in _KEYS:
            raise KeyError(key)
        value: ConfigValue = getattr(self, _attribute(key))
        return value

    def __iter__(self) -> Iterator[str]:
        """The kebab-case keys in declaration order."""
        return iter(_KEYS)

    def __len__(self) -> int:
        """Number of keys."""
        return len(_KEYS)


def _key(attribute: str) -> str:
    return attribute.replace("_", "-")


def _attribute(key: str) -> str:
    return key.replace("-", "_")


def _typed(key: str, value: Any, expected: type) -> ConfigValue:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not expected:
        raise ValueError(
            f"run config {key!r} must be {expected.__name__} (default: {getattr(RunConfig(), _attribute(key))!r}), "
            f"got {type(value).__name__} {value!r}"
        )
    return value  # type: ignore[no-any-return,return-value]  # type checked just above


_KEYS: tuple[str, ...] = tuple(_key(f.name) for f in fields(RunConfig))


def proxy_holdout(run: Mapping[str, Any]) -> int:
    """:meth:`RunConfig.proxy_holdout` of a run config given as a mapping (a RunConfig or a dict)."""
    config = run if isinstance(run, RunConfig) else RunConfig.from_mapping(run)
    return config.proxy_holdout()
