"""Distillation of the global model into a compact student during a federated run, and export of both."""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from logging import INFO
from pathlib import Path
from typing import Any

import torch
from flwr.supercore import log
from torch import nn

from fedsqueeze.compact_arch import StudentArch
from fedsqueeze.config import STUDENT_ARCHS, proxy_holdout
from fedsqueeze.data import Dataset, normalisation
from fedsqueeze.server.compact import (
    CompactConfig,
    build_student,
    count_parameters,
    describe,
    layer_sensitivity,
    pruned_copy,
    quantize_student,
    sensitivity_ratios,
)
from fedsqueeze.server.compact.fast import strided_student
from fedsqueeze.server.compact.lsq import weight_bits_of
from fedsqueeze.server.distill import DistillConfig, distill, proxy_split
from fedsqueeze.server.export import (
    LATENCY_KEY,
    LATENCY_NO_ONEDNN_KEY,
    ONNX_LATENCY_KEY,
    ONNX_PACKED_LATENCY_KEY,
    export_and_measure,
    raw_pixels,
)
from fedsqueeze.training import evaluate, set_weights

__all__ = [
    "LATENCY_RUNS",
    "STRIDED_WIDTHS",
    "QuantisationSettings",
    "ServerDistiller",
    "compact_config",
    "distill_config",
    "export_onnx_too",
    "measure_latency",
    "prune_method",
    "quantisation_settings",
    "student_arch",
    "student_kind",
]

#: Optional run-config keys read here with defaults (LSQ fine-tuning and sensitivity pruning of the student).

#: Timed batch-1 forward passes per exported model (interleaved blocks of 50), with ``distill-latency``.
LATENCY_RUNS = 500

#: Filters of the two convolutions of the ``student-arch = "strided"`` student (as compact_bench measured it).
STRIDED_WIDTHS = (8, 16)


def _rank(value: int, key: str) -> int | None:
    if value < 0:
        raise ValueError(f"run config {key!r} must be >= 0 (0 keeps the layers dense), got {value}")
    return value or None


def compact_config(run: Mapping[str, Any]) -> CompactConfig:
    """The student's :class:`CompactConfig` from the run config's ``student-*`` keys.

    ``student-linear-rank`` and ``student-conv-rank`` are ranks of the factored linear and
    conv layers, 0 keeps them dense; ``student-prune-ratio`` is the fraction of conv filters and
    hidden units removed; ``student-bits`` the exported weight bits (8 or 32). The first conv
    and the last linear layer stay dense (``CompactConfig``'s default).

    Parameters
    ----------
    run : Mapping[str, Any]
        Resolved run config.

    Returns
    -------
    CompactConfig

    Raises
    ------
    ValueError
        If a value is out of range.
    """
    return CompactConfig(
        conv_rank=_rank(int(run["student-conv-rank"]), "student-conv-rank"),
        linear_rank=_rank(int(run["student-linear-rank"]), "student-linear-rank"),
        prune_ratio=float(run["student-prune-ratio"]),
        bits=int(run["student-bits"]),
    )


def student_arch(run: Mapping[str, Any]) -> StudentArch:
    """The architecture of the run's student (norm pruning), as nodes build it for ``broadcast-compact``.

    It names the same student as :func:`compact_config`: the ``student-*`` ranks (0: dense) and
    prune ratio, for the run's ``model`` and ``dataset``.

    Raises
    ------
    ValueError
        If ``student-prune-method`` is ``"sensitivity"`` (its per-layer ratios come from data, so the
        string cannot name the student), ``student-arch`` is not ``"pruned"`` (the string names pruned
        students only), or a value is out of range.
    """
    if student_kind(run) != "pruned":
        raise ValueError(
            "run config 'broadcast-compact' = true needs 'student-arch' = 'pruned' (nodes build only the pruned "
            f"student from its architecture string), got {run.get('student-arch')!r}"
        )
    if prune_method(run) != "norm":
        raise ValueError(
            "run config 'broadcast-compact' needs 'student-prune-method' = 'norm' (nodes build the student from "
            f"its ranks and prune ratio alone), got {run.get('student-prune-method')!r}"
        )
    try:
        return StudentArch(
            str(run["model"]),
            str(run["dataset"]),
            int(run["student-conv-rank"]),
            int(run["student-linear-rank"]),
            float(run["student-prune-ratio"]),
        )
    except ValueError as err:
        raise ValueError(f"run config 'broadcast-compact': the student-* keys name no student: {err}") from err


def student_kind(run: Mapping[str, Any]) -> str:
    """The optional ``student-arch``: ``"pruned"`` (default) or ``"strided"``, checked against the keys it excludes.

    The strided student (:func:`~fedsqueeze.server.compact.fast.strided_student`) is not derived
    from the global model, so neither sensitivity pruning nor activation matching (whose hint layers
    are named after the teacher's) applies to it.

    Raises
    ------
    ValueError
        If the value is not one of :data:`fedsqueeze.config.STUDENT_ARCHS`, or ``"strided"`` comes with
        ``student-prune-method`` = ``"sensitivity"`` or ``distill-hint-weight`` > 0.
    """
    kind = run.get("student-arch", "pruned")
    if kind not in STUDENT_ARCHS:
        raise ValueError(f"run config 'student-arch' must be one of {STUDENT_ARCHS}, got {kind!r}")
    if kind == "strided" and prune_method(run) != "norm":
        raise ValueError(
            "run config 'student-prune-method' must be 'norm' with 'student-arch' = 'strided' (the strided student "
            f"is not pruned), got {run.get('student-prune-method')!r}"
        )
    if kind == "strided" and _optional_number(run, "distill-hint-weight", 0.0) > 0:
        raise ValueError(
            "run config 'distill-hint-weight' must be 0 with 'student-arch' = 'strided' (its layers have no "
            f"counterpart in the teacher to match), got {run.get('distill-hint-weight')!r}"
        )
    return str(kind)


def measure_latency(run: Mapping[str, Any]) -> bool:
    """Whether the export times the exported files: the run config's ``distill-latency`` (default: False).

    Timing takes ``2 * LATENCY_RUNS`` forward passes per file, so it is opt-in.

    Parameters
    ----------
    run : Mapping[str, Any]
        Resolved run config; ``distill-latency`` may be absent.

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        If ``distill-latency`` is set to anything but a bool.
    """
    return _optional_flag(run, "distill-latency")


def export_onnx_too(run: Mapping[str, Any]) -> bool:
    """Whether the export also writes ONNX files: the run config's ``distill-onnx`` (default: False).

    The ONNX files need the ``onnx`` extra (onnx and onnxruntime).

    Raises
    ------
    ValueError
        If ``distill-onnx`` is set to anything but a bool.
    """
    return _optional_flag(run, "distill-onnx")


def _optional_flag(run: Mapping[str, Any], key: str) -> bool:
    value = run.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"run config {key!r} must be bool (default: False), got {value!r}")
    return value


def distill_config(run: Mapping[str, Any]) -> DistillConfig:
    """The :class:`DistillConfig` from the run config's ``distill-*`` and ``proxy-size`` keys.

    ``distill-hint-weight`` (activation matching at the student's default hint layers, 0 = off)
    and ``distill-soft-weight`` (soft labels, 0 = off) are optional, with defaults 0.0 and 1.0.

    Parameters
    ----------
    run : Mapping[str, Any]
        Resolved run config with ``distill-every`` > 0.

    Returns
    -------
    DistillConfig

    Raises
    ------
    ValueError
        If a value is out of range, or distillation is off.
    """
    proxy_size = proxy_holdout(run)
    if proxy_size == 0:
        raise ValueError("distillation is off: run config 'distill-every' is 0")
    return DistillConfig(
        temperature=float(run["distill-temperature"]),
        epochs=int(run["distill-epochs"]),
        lr=float(run["distill-lr"]),
        every_n_rounds=int(run["distill-every"]),
        ensemble=bool(run["distill-ensemble"]),
        proxy_size=proxy_size,
        soft_weight=_optional_number(run, "distill-soft-weight", 1.0),
        hint_weight=_optional_number(run, "distill-hint-weight", 0.0),
    )


@dataclass(frozen=True)
class QuantisationSettings:
    """LSQ fine-tuning of the student after its distillation.

    Parameters
    ----------
    weight_bits : int
        Weight bits of every layer, 2..8; 0 turns LSQ off (the export then quantises to int8 after training).
    epochs : int
        Distillation epochs of the quantised student, >= 1.
    """

    weight_bits: int = 0
    epochs: int = 2


def quantisation_settings(run: Mapping[str, Any]) -> QuantisationSettings:
    """The optional ``student-weight-bits`` (default 0: off) and ``student-qat-epochs`` (default 2) keys.

    Raises
    ------
    ValueError
        If ``student-weight-bits`` is not 0 or 2..8, or ``student-qat-epochs`` < 1.
    """
    bits, epochs = run.get("student-weight-bits", 0), run.get("student-qat-epochs", 2)
    if isinstance(bits, bool) or not isinstance(bits, int) or not (bits == 0 or 2 <= bits <= 8):
        raise ValueError(f"run config 'student-weight-bits' must be 0 (off) or 2..8, got {bits!r}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"run config 'student-qat-epochs' must be an integer >= 1, got {epochs!r}")
    return QuantisationSettings(bits, epochs)


def prune_method(run: Mapping[str, Any]) -> str:
    """The optional ``student-prune-method``: ``"norm"`` (default, by ``CompactConfig.norm``) or ``"sensitivity"``.

    With ``"sensitivity"`` the per-layer ratios are chosen by measured sensitivity on the proxy
    images, at the size uniform pruning by ``student-prune-ratio`` would give.
    """
    method = run.get("student-prune-method", "norm")
    if method not in ("norm", "sensitivity"):
        raise ValueError(f"run config 'student-prune-method' must be 'norm' or 'sensitivity', got {method!r}")
    return str(method)


def _optional_number(run: Mapping[str, Any], key: str, default: float) -> float:
    value = run.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"run config {key!r} must be a number (default: {default}), got {value!r}")
    return float(value)


class ServerDistiller:
    """Distil the global model into a compact student every n rounds; export both at the end.

    Contracts:

    - :meth:`due` is true every ``distill-every`` rounds and at the last round; the ServerApp
      calls :meth:`distill_round` then, with the round's aggregated global model.
    - Each distillation builds a fresh student from the current global model
      (:func:`~fedsqueeze.server.compact.build_student`: filter pruning and truncated SVD of
      the global's own weights), so the student's structure and starting point always come
      from the model it is distilled from and each distillation depends on the current round
      only. With ``student-arch`` = ``"strided"`` the fresh student is instead
      :func:`~fedsqueeze.server.compact.fast.strided_student` (widths :data:`STRIDED_WIDTHS`, input
      and classes of the dataset, weights from ``seed``), which learns everything by distillation.
      The global model and the client models are never modified.
    - The student is trained to match the soft predictions of the global model or, with
      ``distill-ensemble``, the average logits of the global model and the client models
      received this round (FedDF-style, every teacher weighted equally).
    - The proxy images are the ``proxy-size`` training images of
      :func:`~fedsqueeze.server.distill.proxy_split` (seed ``seed``); their labels are never
      read, and the clients leave them out of their partitions (``client_data(...,
      holdout=...)``).
    - With ``broadcast-compact`` (``broadcast`` true), :meth:`switch_weights` hands the latest FP32
      student (before any LSQ) and its architecture string to the ServerApp, which makes it the
      federated model; later due rounds call :meth:`adopt_round` instead, which takes the federated
      student itself as the student to export (LSQ-fine-tuned from itself when ``student-weight-bits``
      is set) and keeps the teacher of the switch.
    - :meth:`export` writes the last student and its teacher (TorchScript and safetensors, and
      ONNX with ``distill-onnx`` true) and measures their test accuracy;
      it times them (batch 1, one thread) only with ``distill-latency`` true (default false),
      else nothing is timed and the latency fields are None.

    Parameters
    ----------
    run : Mapping[str, Any]
        Resolved run config with ``distill-every`` > 0.
    data : Dataset
        The dataset: proxy images from its training set, evaluation on its test set.
    make_model : Callable[[], torch.nn.Module]
        Builds an empty model of the global model's architecture (for client teachers).
    """

    def __init__(self, run: Mapping[str, Any], data: Dataset, make_model: Callable[[], nn.Module]) -> None:
        self.config = distill_config(run)
        self.student_config = compact_config(run)
        self.seed = int(run["seed"])
        self.num_rounds = int(run["num-server-rounds"])
        self.measure_latency = measure_latency(run)
        self.onnx = export_onnx_too(run)
        self.quantisation = quantisation_settings(run)
        self.prune_method = prune_method(run)
        self.kind = student_kind(run)
        self.prune_ratios: dict[str, float] | None = None
        self.data = data
        self.make_model = make_model
        proxy_idx, _ = proxy_split(len(data.x_train), self.config.proxy_size, seed=self.seed)
        self.proxy_x = data.x_train[proxy_idx]  # images only: the labels are never read
        self.mean, self.std = normalisation(data.name)
        self.student: nn.Module | None = None
        self.teacher: nn.Module | None = None
        self.last_round = 0
        self.last_row: dict[str, Any] = {}
        self.broadcast = _optional_flag(run, "broadcast-compact")
        self.arch = student_arch(run) if self.broadcast else None
        self.fp32_student: nn.Module | None = None
        self.switched_round = 0

    @property
    def ensemble(self) -> bool:
        """Whether the round's client models are teachers too."""
        return self.config.ensemble

    def due(self, server_round: int) -> bool:
        """True every ``distill-every`` rounds and at the last round."""
        return server_round % self.config.every_n_rounds == 0 or server_round == self.num_rounds

    def distill_round(
        self,
        server_round: int,
        global_model: nn.Module,
        client_weights: Sequence[Mapping[str, torch.Tensor]] = (),
        global_accuracy: float | None = None,
    ) -> dict[str, Any]:
        """Build a student from ``global_model``, distil it, evaluate it; return the ``distill.csv`` row.

        Parameters
        ----------
        server_round : int
            The round just aggregated.
        global_model : torch.nn.Module
            The aggregated global model (not modified; a copy is kept for the export).
        client_weights : sequence of Mapping of str to torch.Tensor
            The round's client models, used as extra teachers when ``ensemble`` (default: ()).
        global_accuracy : float or None
            Test accuracy of the global model, for the row (default: None).

        Returns
        -------
        dict
            One value per column of ``distill.csv`` (:data:`fedsqueeze.server.results.DISTILL_COLUMNS`).
        """
        start = time.perf_counter()
        teacher = copy.deepcopy(global_model).eval()
        teachers: list[nn.Module] = [teacher]
        if self.ensemble:
            for weights in client_weights:
                model = self.make_model()
                set_weights(model, weights)
                teachers.append(model.eval())
        student = self._build(teacher)
        _, before = evaluate(student, self.data.x_test, self.data.y_test)
        result = distill(student, teachers, self.proxy_x, seed=self.seed + server_round, **self.config.kwargs())
        self.fp32_student = copy.deepcopy(student) if self.quantisation.weight_bits else student
        if self.quantisation.weight_bits:
            student = quantize_student(student, self.proxy_x[:512], weight_bits=self.quantisation.weight_bits)
            kwargs = {**self.config.kwargs(), "epochs": self.quantisation.epochs, "lr": self.config.lr / 3}
            result = distill(student, teachers, self.proxy_x, seed=self.seed + server_round, **kwargs)
        loss, accuracy = evaluate(student, self.data.x_test, self.data.y_test)
        self.student, self.teacher, self.last_round = student, teacher, server_round
        row: dict[str, Any] = {
            "round": server_round,
            "student_accuracy": accuracy,
            "student_loss": loss,
            "student_accuracy_before": before,
            "global_accuracy": global_accuracy,
            "student_params": count_parameters(student),
            "teacher_params": count_parameters(teacher),
            "teachers": result.num_teachers,
            "proxy_samples": result.num_samples,
            "final_distill_loss": result.losses[-1],
            "distill_seconds": round(result.seconds, 3),
            "seconds": round(time.perf_counter() - start, 3),
        }
        self.last_row = row
        log(
            INFO,
            "fedsqueeze: round %d: student (%d params, %.1fx fewer) accuracy %.4f (%.4f before distillation, "
            "global %s) from %d teacher(s) on %d proxy images, %.1f s",
            server_round,
            row["student_params"],
            row["teacher_params"] / max(row["student_params"], 1),
            accuracy,
            before,
            "n/a" if global_accuracy is None else f"{global_accuracy:.4f}",
            result.num_teachers,
            result.num_samples,
            row["seconds"],
        )
        return row

    def switch_weights(self, server_round: int) -> tuple[dict[str, torch.Tensor], str]:
        """The latest FP32 student's weights and architecture string, for the federated model switch.

        Raises
        ------
        RuntimeError
            If ``broadcast-compact`` is off, no distillation ran, or the student's layout differs
            from what nodes build from the string (a bug: nodes would refuse it).
        """
        if self.arch is None or self.fp32_student is None:
            raise RuntimeError("no student to switch to: broadcast-compact is off or no distillation ran")
        weights = {k: v.detach().clone() for k, v in self.fp32_student.state_dict().items()}
        built = {k: tuple(v.shape) for k, v in self.arch.build().state_dict().items()}
        if built != {k: tuple(v.shape) for k, v in weights.items()}:
            raise RuntimeError(f"the distilled student's layout differs from the one {self.arch} builds")
        self.switched_round = server_round
        return weights, str(self.arch)

    def adopt_round(self, server_round: int, global_student: nn.Module, global_accuracy: float) -> dict[str, Any]:
        """After a switch: take the federated student as the student to export; return the ``distill.csv`` row.

        With ``student-weight-bits`` set, the LSQ student is fine-tuned by distillation from the
        FP32 federated student (the teacher of the export stays the model of the switch).
        """
        start = time.perf_counter()
        student = copy.deepcopy(global_student).eval()
        teachers, samples, final_loss, seconds = 0, 0, None, 0.0
        if self.quantisation.weight_bits:
            fp32 = copy.deepcopy(student)
            student = quantize_student(student, self.proxy_x[:512], weight_bits=self.quantisation.weight_bits)
            kwargs = {**self.config.kwargs(), "epochs": self.quantisation.epochs, "lr": self.config.lr / 3}
            result = distill(student, [fp32], self.proxy_x, seed=self.seed + server_round, **kwargs)
            teachers, samples, final_loss = result.num_teachers, result.num_samples, result.losses[-1]
            seconds = round(result.seconds, 3)
        loss, accuracy = evaluate(student, self.data.x_test, self.data.y_test)
        self.student, self.last_round = student, server_round
        assert self.teacher is not None  # the switch came after a distillation
        self.last_row = {
            "round": server_round,
            "student_accuracy": accuracy,
            "student_loss": loss,
            "student_accuracy_before": global_accuracy,
            "global_accuracy": global_accuracy,
            "student_params": count_parameters(student),
            "teacher_params": count_parameters(self.teacher),
            "teachers": teachers,
            "proxy_samples": samples,
            "final_distill_loss": final_loss,
            "distill_seconds": seconds,
            "seconds": round(time.perf_counter() - start, 3),
        }
        log(INFO, "fedsqueeze: round %d: the federated student is the student (accuracy %.4f)", server_round, accuracy)
        return self.last_row

    def _build(self, teacher: nn.Module) -> nn.Module:
        """The student of ``teacher``: uniform norm pruning, per-layer ratios by sensitivity at the same size,
        or (``student-arch`` strided) a fresh strided student shaped by the dataset."""
        if self.kind == "strided":
            _, channels, side, _ = self.data.x_train.shape
            return strided_student(channels, side, self.data.num_classes, STRIDED_WIDTHS, seed=self.seed)
        config = self.student_config
        if self.prune_method != "sensitivity" or config.prune_ratio == 0:
            return build_student(teacher, config)
        factor_only = replace(config, prune_ratio=0.0, linear_prune_ratio=0.0)
        budget = count_parameters(build_student(teacher, config))

        def size(model: nn.Module) -> int:
            return count_parameters(build_student(model, factor_only))

        # Sensitivity on at most 1,000 proxy images: enough to rank layers, a second or two per layer
        table = layer_sensitivity(teacher, teacher, self.proxy_x[:1000])
        self.prune_ratios = sensitivity_ratios(teacher, table, budget, size=size)
        return build_student(pruned_copy(teacher, self.prune_ratios), factor_only)

    def export(self, results_dir: str | Path) -> dict[str, Any]:
        """Export the latest student and its FP32 teacher to ``results_dir/compact/`` and measure both.

        Writes ``teacher_fp32.{pt,safetensors}`` and ``student_int8`` (or ``student_fp32``
        with ``student-bits`` 32) with :func:`~fedsqueeze.server.export.export_compact`, loads
        each TorchScript file back and measures its test accuracy and, with ``distill-latency``,
        its CPU latency for one image (1 thread, median of interleaved runs, with and without
        oneDNN; otherwise the latency fields are None and nothing is timed). With
        ``distill-onnx`` it also writes ``{name}.onnx`` (int8 Q/DQ) and ``{name}_packed.onnx`` (weights
        packed at their bit width, fused: the smallest and, at batch 1, fastest file) and measures both
        in onnxruntime.

        Parameters
        ----------
        results_dir : str or Path
            The run's results folder.

        Returns
        -------
        dict
            The ``compact.json`` content (see :mod:`fedsqueeze.server.results`).

        Raises
        ------
        RuntimeError
            If no distillation ran yet.
        """
        if self.student is None or self.teacher is None:
            raise RuntimeError("nothing to export: no distillation ran")
        results_dir = Path(results_dir)
        out = results_dir / "compact"
        bits = self.student_config.bits
        student_name = f"student_{'int8' if bits == 8 else 'fp32'}"
        if self.quantisation.weight_bits:
            student_name = f"student_lsq{self.quantisation.weight_bits}"
        names = {"teacher": "teacher_fp32", "student": student_name}
        models = {"teacher": (self.teacher, 32), "student": (self.student, bits)}
        rows = export_and_measure(
            {names[key]: model_bits for key, model_bits in models.items()},
            out,
            raw_x=raw_pixels(self.data.x_test, self.mean, self.std),
            y=self.data.y_test,
            mean=self.mean,
            std=self.std,
            latency_runs=LATENCY_RUNS if self.measure_latency else 0,
            onnx=self.onnx,
        )
        report: dict[str, Any] = {}
        for key, (model, _) in models.items():
            row = rows[names[key]]
            report[key] = {
                "params": count_parameters(model),
                "bits": row["bits"],
                "torchscript_file": str(Path(row["torchscript_path"]).relative_to(results_dir)),
                "torchscript_bytes": row["torchscript_bytes"],
                "safetensors_file": str(Path(row["safetensors_path"]).relative_to(results_dir)),
                "safetensors_bytes": row["safetensors_bytes"],
                "file_test_accuracy": row["file_test_accuracy"],
                LATENCY_KEY: row[LATENCY_KEY],
                LATENCY_NO_ONEDNN_KEY: row[LATENCY_NO_ONEDNN_KEY],
            }
            if self.onnx:
                report[key].update(_onnx_entry(row, results_dir))
        report["student"].update(self._student_details(self.student))
        report["distill"] = {
            **asdict(self.config),
            "seed": self.seed,
            "measure_latency": self.measure_latency,
            "onnx": self.onnx,
        }
        teacher, student = report["teacher"], report["student"]
        report["size_ratio"] = teacher["torchscript_bytes"] / student["torchscript_bytes"]
        report["params_ratio"] = teacher["params"] / student["params"]
        report["accuracy_drop_points"] = 100 * (teacher["file_test_accuracy"] - student["file_test_accuracy"])
        if self.onnx:  # the file to ship for size and batch-1 speed, against the global model's FP32 ONNX file
            report["onnx_packed_size_ratio"] = teacher["onnx_bytes"] / student["onnx_packed_bytes"]
        _log_export(out, report)
        return report

    def _student_details(self, student: nn.Module) -> dict[str, Any]:
        """The last distillation's facts for ``compact.json``'s ``student`` entry."""
        return {
            "round": self.last_round,
            "test_accuracy_in_memory": self.last_row["student_accuracy"],
            "test_accuracy_before_distill": self.last_row["student_accuracy_before"],
            "teachers": self.last_row["teachers"],
            "distill_seconds": self.last_row["distill_seconds"],
            "student_arch": self.kind,
            "config": asdict(self.student_config) if self.kind == "pruned" else {"widths": list(STRIDED_WIDTHS)},
            "weight_bits": weight_bits_of(student) or None,
            "qat_epochs": self.quantisation.epochs if self.quantisation.weight_bits else None,
            "prune_method": self.prune_method,
            "prune_ratios": self.prune_ratios,
            "layers": [{**r, "weights": [list(s) for s in r["weights"]]} for r in describe(student)],
            "broadcast_after_round": self.switched_round or None,
            "arch": str(self.arch) if self.switched_round else None,
        }


def _onnx_entry(row: Mapping[str, Any], results_dir: Path) -> dict[str, Any]:
    """The ``onnx_*`` and ``onnx_packed_*`` keys of a ``compact.json`` entry from its export row, paths relative."""
    entry: dict[str, Any] = {}
    for kind, latency_key in (("onnx", ONNX_LATENCY_KEY), ("onnx_packed", ONNX_PACKED_LATENCY_KEY)):
        entry[f"{kind}_file"] = str(Path(row[f"{kind}_path"]).relative_to(results_dir))
        entry.update({k: row[k] for k in (f"{kind}_bytes", f"{kind}_test_accuracy", latency_key)})
    return entry


def _latency_text(entry: Mapping[str, Any]) -> str:
    value = entry[LATENCY_KEY]
    return "latency not measured" if value is None else f"{value:.0f} us (batch 1, 1 thread)"


def _log_export(out: Path, report: Mapping[str, Any]) -> None:
    teacher, student = report["teacher"], report["student"]
    log(
        INFO,
        "fedsqueeze: exported to %s: teacher %d params, %d bytes, accuracy %.4f, %s; student %d params, "
        "%d bytes (%.1fx smaller), accuracy %.4f, %s",
        out,
        teacher["params"],
        teacher["torchscript_bytes"],
        teacher["file_test_accuracy"],
        _latency_text(teacher),
        student["params"],
        student["torchscript_bytes"],
        report["size_ratio"],
        student["file_test_accuracy"],
        _latency_text(student),
    )
