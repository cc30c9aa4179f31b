"""Benchmark: teacher and compact students in every exported format and runtime, with the ablations.

One run trains (or loads) a teacher centrally on the images the clients would hold, builds the
students, distils them on the server's unlabeled proxy images, exports each as TorchScript
(``.pt``), safetensors, ONNX, fused ONNX and packed ONNX (fused, weight-only, weights stored at
their bit width and folded at session load), measures every file's test accuracy, and times all
of them interleaved at batch 1 on one thread. Students (``--only-strided``: the teacher and the
strided ones only):

- ``l1_kd``: 50 % of filters/units pruned by L1 norm, hidden linears factored (rank 12), soft labels;
- ``l1_kd_hints``: the same plus activation matching (ablation: soft labels alone vs plus hints);
- ``sens_kd``: the same size pruned by measured sensitivity (ablation: L1 vs sensitivity);
- ``sens_iter_kd``: sensitivity pruning in an iterative prune -> fine-tune schedule to that size;
- ``l1_kd_ptq{4,2}`` / ``l1_kd_lsq{4,2}``: ``l1_kd`` with 4- and 2-bit weights, post-training
  (calibrated steps) vs LSQ fine-tuned (ablation: PTQ int8, i.e. ``l1_kd``'s int8 file, vs LSQ 4-bit);
- ``strided_kd`` / ``strided_kd_lsq4`` / ``strided_kd_lsq842``: the four-node strided student,
  int8, LSQ 4-bit, and LSQ with 8/4/2 bits in conv1/conv2/fc.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedsqueeze.data import load_dataset, normalisation
from fedsqueeze.models import build_model
from fedsqueeze.server.compact import (
    CompactConfig,
    build_student,
    count_parameters,
    iterative_prune,
    layer_sensitivity,
    pruned_copy,
    quantize_student,
    sensitivity_ratios,
)
from fedsqueeze.server.compact.fast import strided_student
from fedsqueeze.server.compact.lsq import weight_bits_of
from fedsqueeze.server.compact.sensitivity import prunable_layers
from fedsqueeze.server.distill import distill, proxy_split
from fedsqueeze.server.export import export_compact, file_accuracy, latencies_us, load_exported, raw_pixels
from fedsqueeze.server.onnx_export import OnnxRuntimeModel, export_onnx
from fedsqueeze.training import evaluate, train


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedsqueeze.simulation.compact_bench", description=__doc__)
    p.add_argument("--data-dir", default=None, help="folder or .npz holding MNIST (default: $FEDSQUEEZE_DATA)")
    p.add_argument("--out", required=True, type=Path, help="output folder for bench.json and the files")
    p.add_argument("--teacher", default="lenet5", help="teacher model name (default: lenet5)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="central teacher training epochs (default: 3)")
    p.add_argument("--teacher-state", type=Path, default=None, help="load the teacher here if present, else save")
    p.add_argument("--train-limit", type=int, default=None, help="train the teacher on at most N images (default: all)")
    p.add_argument("--proxy-size", type=int, default=10_000, help="unlabeled proxy images (default: 10000)")
    p.add_argument("--epochs", type=int, default=10, help="distillation epochs of pruned students (default: 10)")
    p.add_argument("--strided-epochs", type=int, default=20, help="distillation epochs, strided (default: 20)")
    p.add_argument("--strided-widths", default="8,16", help="filters of the strided student (default: 8,16)")
    p.add_argument("--qat-epochs", type=int, default=4, help="LSQ fine-tuning epochs (default: 4)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="uniform L1 ratio of l1_kd (default: 0.5)")
    p.add_argument("--linear-rank", type=int, default=12, help="rank of the factored linears (default: 12)")
    p.add_argument("--latency-runs", type=int, default=1000, help="timed calls per file and runtime (default: 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed (default: 0)")
    p.add_argument("--only-strided", action="store_true", help="skip the pruned/factored students (default: all)")
    return p.parse_args(argv)


def _kd(student: nn.Module, teacher: nn.Module, proxy: torch.Tensor, epochs: int, seed: int, **kw: Any) -> nn.Module:
    distill(student, teacher, proxy, epochs=epochs, seed=seed, **kw)
    return student


def _pruned_students(args: argparse.Namespace, teacher: nn.Module, proxy: torch.Tensor) -> dict[str, Any]:
    """The pruned/factored students and the facts of how they were pruned."""
    factor = CompactConfig(conv_rank=None, linear_rank=args.linear_rank, prune_ratio=0.0)
    uniform = dict.fromkeys(prunable_layers(teacher), args.prune_ratio)
    l1_dense = pruned_copy(teacher, uniform)

    def factored_size(model: nn.Module) -> int:  # the budget is the final (factored) student's size
        return count_parameters(build_student(model, factor))

    budget = factored_size(l1_dense)
    table = layer_sensitivity(teacher, teacher, proxy[:2000])
    sens_ratios = sensitivity_ratios(teacher, table, budget, size=factored_size)
    out: dict[str, Any] = {"budget_params": budget, "l1_ratios": uniform, "sens_ratios": sens_ratios}
    out["sensitivity_table"] = {k: {str(r): v for r, v in row.items()} for k, row in table.items()}
    e, s = args.epochs, args.seed
    out["l1_kd"] = _kd(build_student(l1_dense, factor), teacher, proxy, e, s)
    out["l1_kd_hints"] = _kd(build_student(l1_dense, factor), teacher, proxy, e, s, hint_weight=1.0)
    out["sens_kd"] = _kd(build_student(pruned_copy(teacher, sens_ratios), factor), teacher, proxy, e, s)

    def fine_tune(model: nn.Module) -> list[float]:
        return distill(model, teacher, proxy, epochs=2, seed=s).losses

    dense_iter, history = iterative_prune(
        teacher, teacher, proxy, budget, fine_tune, steps=2, sensitivity_samples=2000, size=factored_size
    )
    out["sens_iter_history"] = [asdict(h) for h in history]
    out["sens_iter_kd"] = _kd(build_student(dense_iter, factor), teacher, proxy, e, s)
    return out


def _quantised(
    student: nn.Module, teacher: nn.Module, proxy: torch.Tensor, bits: Any, args: argparse.Namespace
) -> nn.Module:
    quant = quantize_student(student, proxy[:512], weight_bits=bits)
    return _kd(quant, teacher, proxy, args.qat_epochs, args.seed, lr=0.001)


def _models(args: argparse.Namespace, teacher: nn.Module, proxy: torch.Tensor) -> tuple[dict[str, nn.Module], dict]:
    models: dict[str, nn.Module] = {"teacher": teacher}
    facts: dict[str, Any] = {}
    if not args.only_strided:
        facts = _pruned_students(args, teacher, proxy)
        models.update({k: facts.pop(k) for k in ("l1_kd", "l1_kd_hints", "sens_kd", "sens_iter_kd")})
        for bits in (4, 2):
            models[f"l1_kd_ptq{bits}"] = quantize_student(models["l1_kd"], proxy[:512], weight_bits=bits)
            models[f"l1_kd_lsq{bits}"] = _quantised(models["l1_kd"], teacher, proxy, bits, args)
    first, second = (int(w) for w in args.strided_widths.split(","))
    widths = (first, second)
    strided = _kd(strided_student(1, 28, 10, widths, seed=args.seed), teacher, proxy, args.strided_epochs, args.seed,
                  lr=0.01)  # fmt: skip
    models["strided_kd"] = strided
    models["strided_kd_lsq4"] = _quantised(strided, teacher, proxy, 4, args)
    # fc holds 43 % of the weights: 2 bits there, 4 in conv2, 8 in the small first conv
    models["strided_kd_lsq842"] = _quantised(strided, teacher, proxy, {"conv1": 8, "conv2": 4, "fc": 2}, args)
    return models, facts


def _export_all(
    models: dict[str, nn.Module], out: Path, x: torch.Tensor, y: torch.Tensor, mean: float, std: float
) -> tuple[dict[str, dict[str, Any]], dict[str, tuple[Any, Any]]]:
    """Write every model's files, measure their accuracy on the normalised test images ``x``; return the runtimes."""
    raw = raw_pixels(x, mean, std)
    rows: dict[str, dict[str, Any]] = {}
    timed: dict[str, tuple[Any, Any]] = {}
    example, example_np = raw[:1].float(), raw[:1].float().numpy()
    for name, model in models.items():
        bits = 32 if name == "teacher" else 8
        info = export_compact(model, out, bits=bits, example_input=example, mean=mean, std=std, name=name)
        script = load_exported(info.torchscript_path)
        plain = export_onnx(model, out, bits=bits, input_shape=(1, 28, 28), mean=mean, std=std, name=name)
        fused = export_onnx(model, out, bits=bits, input_shape=(1, 28, 28), mean=mean, std=std, name=name + "_fused",
                            fuse=True)  # fmt: skip
        packed = export_onnx(model, out, bits=bits, input_shape=(1, 28, 28), mean=mean, std=std,
                             name=name + "_packed", fuse=True, packed=True)  # fmt: skip
        runtimes: dict[str, Any] = {"torchscript": script, "ort": OnnxRuntimeModel(plain.onnx_path),
                    "ort_fused": OnnxRuntimeModel(fused.onnx_path),
                    "ort_packed": OnnxRuntimeModel(packed.onnx_path)}  # fmt: skip
        quantised = bool(weight_bits_of(model))
        if quantised:
            runtimes["ort_int_kernels"] = OnnxRuntimeModel(plain.onnx_path, integer_kernels=True)
        rows[name] = {
            "params": sum(p.numel() for n, p in model.named_parameters() if not n.endswith(".step")),
            "weight_bits": weight_bits_of(model) or bits,
            "pt_bytes": info.torchscript_bytes,
            "safetensors_bytes": info.safetensors_bytes,
            "onnx_bytes": plain.onnx_bytes,
            "onnx_fused_bytes": fused.onnx_bytes,
            "onnx_packed_bytes": packed.onnx_bytes,
            "accuracy": {rt: file_accuracy(m, raw, y) for rt, m in runtimes.items()},
            "packed_agreement": _agreement(runtimes["ort_packed"], model, raw, x),
        }
        for rt, m in runtimes.items():
            timed[f"{name}|{rt}"] = (m, example if rt == "torchscript" else example_np)
    return rows, timed


@torch.no_grad()
def _agreement(runtime: Any, model: nn.Module, raw: torch.Tensor, x: torch.Tensor) -> float:
    """Fraction of the images on which a file's runtime predicts the class the in-memory model predicts."""
    batches = range(0, len(raw), 128)  # as file_accuracy: larger CPU batches spend their time in malloc
    file_classes = torch.cat([runtime(raw[i : i + 128].float()).argmax(1) for i in batches])
    model_classes = torch.cat([model(x[i : i + 128]).argmax(1) for i in batches])
    return float((file_classes == model_classes).float().mean())


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``bench.json`` and the files to ``--out``; print the table."""
    args = _parse(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    data = load_dataset("mnist", args.data_dir)
    mean, std = (v[0] for v in normalisation("mnist"))
    proxy_idx, client_idx = proxy_split(len(data.x_train), args.proxy_size, seed=args.seed)
    teacher = build_model(args.teacher, "mnist")
    start = time.perf_counter()
    if args.teacher_state is not None and args.teacher_state.is_file():
        teacher.load_state_dict(torch.load(args.teacher_state, map_location="cpu", weights_only=True))
    else:
        client_idx = client_idx[: args.train_limit]
        train(teacher, data.x_train[client_idx], data.y_train[client_idx], epochs=args.teacher_epochs, lr=0.01,
              seed=args.seed)  # fmt: skip
        if args.teacher_state is not None:
            torch.save(teacher.state_dict(), args.teacher_state)
    teacher.eval()
    teacher_seconds = time.perf_counter() - start
    models, facts = _models(args, teacher, data.x_train[proxy_idx])
    in_memory = {k: evaluate(m, data.x_test, data.y_test)[1] for k, m in models.items()}
    rows, timed = _export_all(models, args.out, data.x_test, data.y_test, mean, std)
    latency = latencies_us(timed, args.latency_runs)
    for key, value in latency.items():
        name, rt = key.split("|")
        rows[name].setdefault("latency_us", {})[rt] = value
    for name, row in rows.items():
        row["in_memory_accuracy"] = in_memory[name]
    report = {"command_args": {k: str(v) for k, v in vars(args).items()}, "teacher_seconds": teacher_seconds,
              "pruning": facts, "models": rows}  # fmt: skip
    (args.out / "bench.json").write_text(json.dumps(report, indent=2, default=str))
    _print_table(rows)
    return 0


def _print_table(rows: dict[str, dict[str, Any]]) -> None:
    teacher = rows["teacher"]
    best_teacher = min(teacher["latency_us"].values())
    print(
        "| model | params | weight bits | .pt B | .safetensors B | .onnx B | fused .onnx B | packed .onnx B (x) "
        "| acc .pt | acc ORT fused | acc ORT packed | packed = in-memory | TorchScript us | ORT us | ORT fused us "
        "| ORT packed us | ORT int kernels us | best / teacher best | packed / teacher best |"
    )
    print("|" + "---|" * 19)
    for name, row in rows.items():
        lat, acc = row["latency_us"], row["accuracy"]
        bits = (
            row["weight_bits"]
            if isinstance(row["weight_bits"], int)
            else "/".join(str(b) for b in sorted(set(row["weight_bits"].values())))
        )
        smaller = teacher["onnx_fused_bytes"] / row["onnx_packed_bytes"]
        print(
            f"| {name} | {row['params']:,} | {bits} | {row['pt_bytes']:,} | {row['safetensors_bytes']:,} | "
            f"{row['onnx_bytes']:,} | {row['onnx_fused_bytes']:,} | {row['onnx_packed_bytes']:,} ({smaller:.1f}x) | "
            f"{100 * acc['torchscript']:.2f} | {100 * acc['ort_fused']:.2f} | {100 * acc['ort_packed']:.2f} | "
            f"{100 * row['packed_agreement']:.2f} % | {lat['torchscript']:.1f} | {lat['ort']:.1f} | "
            f"{lat['ort_fused']:.1f} | {lat['ort_packed']:.1f} | {lat.get('ort_int_kernels', float('nan')):.1f} | "
            f"{min(lat.values()) / best_teacher:.2f} | {lat['ort_packed'] / best_teacher:.2f} |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
