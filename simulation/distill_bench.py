"""Benchmark: distil a trained MNIST teacher into a compact int8 student and compare the exported files."""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch

from fedsqueeze.data import load_dataset, normalisation
from fedsqueeze.models import build_model
from fedsqueeze.server.compact import CompactConfig, build_student, count_parameters, describe
from fedsqueeze.server.distill import distill, proxy_split
from fedsqueeze.server.export import export_compact, file_accuracy, latencies_us, load_exported, raw_pixels
from fedsqueeze.training import evaluate, train

#: MNIST normalisation used by fedsqueeze.data (one channel).
MNIST_MEAN, MNIST_STD = normalisation("mnist")[0][0], normalisation("mnist")[1][0]


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fedsqueeze.simulation.distill_bench", description=__doc__)
    p.add_argument("--data-dir", default=None, help="folder or .npz holding MNIST (default: $FEDSQUEEZE_DATA)")
    p.add_argument("--out", required=True, type=Path, help="output folder for compact.json and the exported files")
    p.add_argument("--teacher", default="lenet5", help="teacher model name (default: lenet5)")
    p.add_argument("--teacher-epochs", type=int, default=3, help="teacher training epochs (default: 3)")
    p.add_argument("--teacher-lr", type=float, default=0.01, help="teacher SGD learning rate, momentum 0.9 (default: 0.01)")
    p.add_argument(
        "--teacher-state",
        type=Path,
        default=None,
        help="state_dict file: load the teacher from it if it exists, else train and save it there (default: none)",
    )
    p.add_argument("--train-limit", type=int, default=None, help="train the teacher on at most this many images (default: all)")
    p.add_argument("--proxy-size", type=int, default=10_000, help="server-held unlabeled proxy images (default: 10000)")
    p.add_argument("--distill-epochs", type=int, default=10, help="distillation epochs (default: 10)")
    p.add_argument("--temperature", type=float, default=3.0, help="distillation temperature (default: 3.0)")
    p.add_argument("--lr", type=float, default=0.003, help="distillation Adam learning rate (default: 0.003)")
    p.add_argument("--conv-rank", type=_rank, default=None, help="conv rank: int, fraction or 'none' (default: none)")
    p.add_argument("--linear-rank", type=_rank, default=12, help="linear rank: int, fraction or 'none' (default: 12)")
    p.add_argument("--conv-init", choices=["svd", "tucker2"], default="svd", help="conv factoring (default: svd)")
    p.add_argument("--prune-ratio", type=float, default=0.5, help="fraction of conv filters removed (default: 0.5)")
    p.add_argument("--linear-prune-ratio", type=float, default=0.5, help="fraction of hidden units removed (default: 0.5)")
    p.add_argument("--norm", choices=["l1", "l2"], default="l1", help="pruning norm (default: l1)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, split and batch order (default: 0)")
    p.add_argument("--threads", type=int, default=1, help="torch threads for training (default: 1)")
    p.add_argument("--latency-runs", type=int, default=1000, help="timed batch-1 forward passes per model (default: 1000)")
    return p.parse_args(argv)


def _rank(text: str) -> int | float | None:
    if text.lower() == "none":
        return None
    return float(text) if "." in text else int(text)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``compact.json`` and the exported files to ``--out``; print a table."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = load_dataset("mnist", args.data_dir)
    raw_test = raw_pixels(data.x_test, MNIST_MEAN, MNIST_STD)

    # The teacher stands in for the federated global model: trained on the images the clients
    # hold, never on the server's proxy images.
    proxy_idx, client_idx = proxy_split(len(data.x_train), args.proxy_size, seed=args.seed)
    client_idx = client_idx[: args.train_limit]
    teacher = build_model(args.teacher, "mnist")
    teacher_seconds = 0.0
    if args.teacher_state is not None and args.teacher_state.is_file():
        teacher.load_state_dict(torch.load(args.teacher_state, map_location="cpu", weights_only=True))
    else:
        t0 = time.perf_counter()
        train(teacher, data.x_train[client_idx], data.y_train[client_idx], epochs=args.teacher_epochs, lr=args.teacher_lr, seed=args.seed)
        teacher_seconds = time.perf_counter() - t0
        if args.teacher_state is not None:
            torch.save(teacher.state_dict(), args.teacher_state)
    teacher.eval()
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
    result = distill(
        student,
        teacher,
        data.x_train[proxy_idx],
        temperature=args.temperature,
        epochs=args.distill_epochs,
        lr=args.lr,
        seed=args.seed,
    )
    _, after_acc = evaluate(student, data.x_test, data.y_test)

    example = raw_test[:1].float()
    norm = {"mean": MNIST_MEAN, "std": MNIST_STD, "example_input": example}
    exports = {
        "teacher_fp32": export_compact(teacher, args.out, bits=32, name="teacher_fp32", **norm),
        "student_int8": export_compact(student, args.out, bits=8, name="student_int8", **norm),
        "student_fp32": export_compact(student, args.out, bits=32, name="student_fp32", **norm),
    }
    # Reference: the teacher saved the plain way, torch.jit.save(torch.jit.script(teacher)).
    plain_path = args.out / "teacher_plain_script.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch 2.x but works
        torch.jit.save(torch.jit.script(teacher), str(plain_path))

    torch.set_num_threads(1)
    rows: dict[str, dict] = {}
    timed: dict[str, tuple[torch.nn.Module, torch.Tensor]] = {}
    for key, info in exports.items():
        loaded = load_exported(info.torchscript_path)
        rows[key] = {**info.as_dict(), "file_test_accuracy": file_accuracy(loaded, raw_test, data.y_test)}
        timed[key] = (loaded, example)
    timed["teacher_eager"] = (teacher, data.x_test[:1])
    timed["student_eager"] = (student, data.x_test[:1])
    latency = latencies_us(timed, args.latency_runs)
    # oneDNN (mkldnn) convolutions cost ~150 us of fixed overhead per call at batch 1 on this
    # CPU; the native kernels do not, so time both.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "TF32 acceleration on top of oneDNN ..." notice
        with torch.backends.mkldnn.flags(enabled=False):
            native = latencies_us(timed, args.latency_runs)
    for key in exports:
        rows[key]["latency_us_batch1_1thread"] = latency[key]
        rows[key]["latency_us_batch1_1thread_no_onednn"] = native[key]
    teacher_bytes = rows["teacher_fp32"]["torchscript_bytes"]
    student_bytes = rows["student_int8"]["torchscript_bytes"]
    report = {
        "command_args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "teacher": {
            "model": args.teacher,
            "params": count_parameters(teacher),
            "train_epochs": args.teacher_epochs,
            "train_seconds": teacher_seconds,
            "loaded_from": str(args.teacher_state) if teacher_seconds == 0.0 else None,
            "test_accuracy": teacher_acc,
            "plain_torchscript_bytes": plain_path.stat().st_size,
            "eager_latency_us_batch1_1thread": latency["teacher_eager"],
            "eager_latency_us_batch1_1thread_no_onednn": native["teacher_eager"],
        },
        "student": {
            "config": {k: v for k, v in config.__dict__.items()},
            "params": count_parameters(student),
            "layers": [{**r, "weights": [list(s) for s in r["weights"]]} for r in describe(student)],
            "test_accuracy_before_distill": before_acc,
            "test_accuracy_after_distill": after_acc,
            "distill_losses": result.losses,
            "distill_seconds": result.seconds,
            "proxy_size": result.num_samples,
            "eager_latency_us_batch1_1thread": latency["student_eager"],
            "eager_latency_us_batch1_1thread_no_onednn": native["student_eager"],
        },
        "files": rows,
        "size_ratio_fp32_over_int8": teacher_bytes / student_bytes,
        "raw_size_ratio_fp32_over_int8": rows["teacher_fp32"]["raw_torchscript_bytes"] / rows["student_int8"]["raw_torchscript_bytes"],
        "accuracy_drop_points": 100 * (rows["teacher_fp32"]["file_test_accuracy"] - rows["student_int8"]["file_test_accuracy"]),
    }
    report["meets_target"] = (
        report["size_ratio_fp32_over_int8"] >= 20
        and report["accuracy_drop_points"] <= 1.0
        and teacher_acc > 0.9  # a diverged teacher would make the comparison meaningless
    )
    (args.out / "compact.json").write_text(json.dumps(report, indent=2))
    _print_table(report)
    return 0


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
            f"{row['latency_us_batch1_1thread']:.0f} ({row['latency_us_batch1_1thread_no_onednn']:.0f}) |"
        )
    teacher, student = report["teacher"], report["student"]
    print(
        f"in-memory fp32 models, latency us: teacher {teacher['eager_latency_us_batch1_1thread']:.0f} "
        f"({teacher['eager_latency_us_batch1_1thread_no_onednn']:.0f} oneDNN off), student "
        f"{student['eager_latency_us_batch1_1thread']:.0f} ({student['eager_latency_us_batch1_1thread_no_onednn']:.0f}); "
        f"teacher torch.jit.save(torch.jit.script(.)) file: {teacher['plain_torchscript_bytes']:,} bytes"
    )
    print(
        f"teacher {100 * teacher['test_accuracy']:.2f} %; student before distillation "
        f"{100 * student['test_accuracy_before_distill']:.2f} %, after {100 * student['test_accuracy_after_distill']:.2f} % "
        f"(in memory, fp32); distillation {student['distill_seconds']:.1f} s on {student['proxy_size']} proxy images"
    )
    print(
        f"size ratio teacher fp32 / student int8: {report['size_ratio_fp32_over_int8']:.1f}x "
        f"(plain torch.jit.save archives: {report['raw_size_ratio_fp32_over_int8']:.1f}x); accuracy drop "
        f"{report['accuracy_drop_points']:.2f} points; target (>= 20x, <= 1 point) met: {report['meets_target']}"
    )


if __name__ == "__main__":
    raise SystemExit(main())
