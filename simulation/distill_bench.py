"""Benchmark: distil a trained MNIST teacher into a compact int8 student and compare the exported files."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fedsqueeze.data import Dataset, load_dataset, normalisation
from fedsqueeze.models import build_model
from fedsqueeze.server.compact import CompactConfig, build_student, count_parameters, describe
from fedsqueeze.server.distill import distill, proxy_split
from fedsqueeze.server.export import (
    LATENCY_KEY,
    LATENCY_NO_ONEDNN_KEY,
    ONNX_LATENCY_KEY,
    export_and_measure,
    raw_pixels,
)
from fedsqueeze.training import evaluate, train

#: MNIST normalisation used by fedsqueeze.data (one channel).
MNIST_MEAN, MNIST_STD = normalisation("mnist")[0][0], normalisation("mnist")[1][0]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedsqueeze.simulation.distill_bench", description=__doc__)
    p.add_argument("--data-dir", default=None, help="folder or .npz holding MNIST (default: $FEDSQUEEZE_DATA)")
    p.add_argument("--out", required=True, type=Path, help="output folder for compact.json and the exported files")
    p.add_argument("--teacher", default="lenet5", help="teacher model name (default: lenet5)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="teacher training epochs (default: 3)")
    p.add_argument(
        "--teacher-lr", type=float, default=0.01, help="teacher SGD learning rate, momentum 0.9 (default: 0.01)"
    )
    p.add_argument(
        "--teacher-state",
        type=Path,
        default=None,
        help="state_dict file: load the teacher from it if it exists, else train and save it there (default: none)",
    )
    p.add_argument(
        "--train-limit", type=int, default=None, help="train the teacher on at most this many images (default: all)"
    )
    p.add_argument("--proxy-size", type=int, default=10_000, help="server-held unlabeled proxy images (default: 10000)")
    p.add_argument("--distill-epochs", type=int, default=10, help="distillation epochs (default: 10)")
    p.add_argument("--temperature", type=float, default=3.0, help="distillation temperature (default: 3.0)")
    p.add_argument("--lr", type=float, default=0.003, help="distillation Adam learning rate (default: 0.003)")
    p.add_argument("--conv-rank", type=_rank, default=None, help="conv rank: int, fraction or 'none' (default: none)")
    p.add_argument("--linear-rank", type=_rank, default=12, help="linear rank: int, fraction or 'none' (default: 12)")
    p.add_argument("--conv-init", choices=["svd", "tucker2"], default="svd", help="conv factoring (default: svd)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="fraction of conv filters removed (default: 0.5)")
    p.add_argument(
        "--linear-prune-ratio", type=float, default=0.5, help="fraction of hidden units removed (default: 0.5)"
    )
    p.add_argument("--norm", choices=["l1", "l2"], default="l1", help="pruning norm (default: l1)")
    p.add_argument("--soft-weight", type=float, default=1.0, help="weight of the soft-label loss (default: 1.0)")
    p.add_argument(
        "--hint-weight", type=float, default=0.0, help="weight of the activation-matching loss, 0 = off (default: 0)"
    )
    p.add_argument(
        "--hint-layers",
        default=None,
        help="comma-separated student layer names to match (default: the output of each conv block)",
    )
    p.add_argument(
        "--onnx",
        action="store_true",
        help="also export ONNX files and measure them in onnxruntime (needs the onnx extra)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of weights, split and batch order (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default: 1)")
    p.add_argument(
        "--latency-runs",
        type=int,
        default=1000,
        help="timed batch-1 forward passes per model, 0 times nothing (default: 1000)",
    )
    return p.parse_args(argv)


def _rank(text: str) -> int | float | None:
    if text.lower() == "none":
        return None
    return float(text) if "." in text else int(text)


def _teacher(args: argparse.Namespace, data: Dataset, client_idx: torch.Tensor) -> tuple[torch.nn.Module, float]:
    """The teacher, loaded from ``--teacher-state`` or trained; with its training seconds (0 if loaded)."""
    teacher = build_model(args.teacher, "mnist")
    seconds = 0.0
    if args.teacher_state is not None and args.teacher_state.is_file():
        teacher.load_state_dict(torch.load(args.teacher_state, map_location="cpu", weights_only=True))
    else:
        t0 = time.perf_counter()
        x, y = data.x_train[client_idx], data.y_train[client_idx]
        train(teacher, x, y, epochs=args.teacher_epochs, lr=args.teacher_lr, seed=args.seed)
        seconds = time.perf_counter() - t0
        if args.teacher_state is not None:
            torch.save(teacher.state_dict(), args.teacher_state)
    return teacher.eval(), seconds


def _plain_script_bytes(teacher: torch.nn.Module, out: Path) -> int:
    """Size of the teacher saved the plain way, ``torch.jit.save(torch.jit.script(teacher))``, for reference."""
    path = out / "teacher_plain_script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x but works
        torch.jit.save(torch.jit.script(teacher), str(path))
    return path.stat().st_size


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``compact.json`` and the exported files to ``--out``; print a table."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset("mnist", args.data_dir)

    # The teacher stands in for the federated global model: trained on the images the clients
    # hold, never on the server's proxy images.
    proxy_idx, client_idx = proxy_split(len(data.x_train), args.proxy_size, seed=args.seed)
    teacher, teacher_seconds = _teacher(args, data, client_idx[: args.train_limit])
    _, teacher_acc = evaluate(teacher, data.x_test, data.y_test)

    config = CompactConfig(
        conv_rank=args.conv_rank,
        linear_rank=args.linear_rank,
        conv_init=args.conv_init,
        prune_ratio=args.prune_ratio,
        linear_prune_ratio=args.linear_prune_ratio,
        norm=args.norm,
    )
    student = build_student(teacher, config)
    _, before_acc = evaluate(student, data.x_test, data.y_test)
    kwargs = {
        "temperature": args.temperature,
        "epochs": args.distill_epochs,
        "lr": args.lr,
        "seed": args.seed,
        "soft_weight": args.soft_weight,
        "hint_weight": args.hint_weight,
        "hint_layers": args.hint_layers.split(",") if args.hint_layers else None,
    }
    result = distill(student, teacher, data.x_train[proxy_idx], **kwargs)
    _, after_acc = evaluate(student, data.x_test, data.y_test)

    # oneDNN (mkldnn) convolutions cost a fixed overhead per call at batch 1 on some CPUs; the
    # native kernels do not, so export_and_measure times both.
    rows = export_and_measure(
        {"teacher_fp32": (teacher, 32), "student_int8": (student, 8), "student_fp32": (student, 32)},
        args.out,
        raw_x=raw_pixels(data.x_test, MNIST_MEAN, MNIST_STD),
        y=data.y_test,
        mean=MNIST_MEAN,
        std=MNIST_STD,
        latency_runs=args.latency_runs,
        also_timed={"teacher_eager": (teacher, data.x_test[:1]), "student_eager": (student, data.x_test[:1])},
        onnx=args.onnx,
    )
    eager = {key: rows.pop(key) for key in ("teacher_eager", "student_eager")}
    report = {
        "command_args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "teacher": {
            "model": args.teacher,
            "params": count_parameters(teacher),
            "train_epochs": args.teacher_epochs,
            "train_seconds": teacher_seconds,
            "loaded_from": str(args.teacher_state) if teacher_seconds == 0.0 else None,
            "test_accuracy": teacher_acc,
            "plain_torchscript_bytes": _plain_script_bytes(teacher, args.out),
            **{f"eager_{key}": value for key, value in eager["teacher_eager"].items()},
        },
        "student": {
            "config": dict(config.__dict__),
            "params": count_parameters(student),
            "layers": [{**r, "weights": [list(s) for s in r["weights"]]} for r in describe(student)],
            "test_accuracy_before_distill": before_acc,
            "test_accuracy_after_distill": after_acc,
            "distill_losses": result.losses,
            "distill_seconds": result.seconds,
            "proxy_size": result.num_samples,
            **{f"eager_{key}": value for key, value in eager["student_eager"].items()},
        },
        "files": rows,
    }
    report.update(_ratios(rows, teacher_acc))
    (args.out / "compact.json").write_text(json.dumps(report, indent=2))
    _print_table(report)
    return 0


def _ratios(rows: dict[str, dict[str, Any]], teacher_acc: float) -> dict[str, Any]:
    """Size ratios and accuracy drop of the int8 student against the fp32 teacher, and whether the target is met."""
    teacher, student = rows["teacher_fp32"], rows["student_int8"]
    ratios: dict[str, Any] = {
        "size_ratio_fp32_over_int8": teacher["torchscript_bytes"] / student["torchscript_bytes"],
        "raw_size_ratio_fp32_over_int8": teacher["raw_torchscript_bytes"] / student["raw_torchscript_bytes"],
        "accuracy_drop_points": 100 * (teacher["file_test_accuracy"] - student["file_test_accuracy"]),
    }
    ratios["meets_target"] = (
        ratios["size_ratio_fp32_over_int8"] >= 20
        and ratios["accuracy_drop_points"] <= 1.0
        and teacher_acc > 0.9  # a diverged teacher would make the comparison meaningless
    )
    return ratios


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def _print_table(report: dict) -> None:
    files = report["files"]
    params = {
        "teacher_fp32": report["teacher"]["params"],
        "student_int8": report["student"]["params"],
        "student_fp32": report["student"]["params"],
    }
    print(
        "| model | params | TorchScript bytes (plain jit.save) | safetensors bytes | test acc (exported file) "
        "| latency us, batch 1, 1 thread (oneDNN off) |"
    )
    print("|---|---|---|---|---|---|")
    for key, row in files.items():
        print(
            f"| {key} | {params[key]:,} | {row['torchscript_bytes']:,} ({row['raw_torchscript_bytes']:,}) | "
            f"{row['safetensors_bytes']:,} | {100 * row['file_test_accuracy']:.2f} % | "
            f"{_us(row[LATENCY_KEY])} ({_us(row[LATENCY_NO_ONEDNN_KEY])}) |"
        )
    for key, row in files.items():
        if "onnx_bytes" in row:
            print(
                f"{key} ONNX (onnxruntime, 1 thread): {row['onnx_bytes']:,} bytes, "
                f"{100 * row['onnx_test_accuracy']:.2f} %, {_us(row[ONNX_LATENCY_KEY])} us"
            )
    teacher, student = report["teacher"], report["student"]
    print(
        f"in-memory fp32 models, latency us: teacher {_us(teacher['eager_' + LATENCY_KEY])} "
        f"({_us(teacher['eager_' + LATENCY_NO_ONEDNN_KEY])} oneDNN off), student "
        f"{_us(student['eager_' + LATENCY_KEY])} ({_us(student['eager_' + LATENCY_NO_ONEDNN_KEY])}); "
        f"teacher torch.jit.save(torch.jit.script(.)) file: {teacher['plain_torchscript_bytes']:,} bytes"
    )
    print(
        f"teacher {100 * teacher['test_accuracy']:.2f} %; student before distillation "
        f"{100 * student['test_accuracy_before_distill']:.2f} %, "
        f"after {100 * student['test_accuracy_after_distill']:.2f} % "
        f"(in memory, fp32); distillation {student['distill_seconds']:.1f} s on {student['proxy_size']} proxy images"
    )
    print(
        f"size ratio teacher fp32 / student int8: {report['size_ratio_fp32_over_int8']:.1f}x "
        f"(plain torch.jit.save archives: {report['raw_size_ratio_fp32_over_int8']:.1f}x); accuracy drop "
        f"{report['accuracy_drop_points']:.2f} points; target (>= 20x, <= 1 point) met: {report['meets_target']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
