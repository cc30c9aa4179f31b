"""Server-side distillation wired into the Flower apps: proxy holdout, client-model hook, compact export."""

from __future__ import annotations

import csv
import json
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity

import fedsqueeze.data.partitioning
from fedsqueeze.client import app as fedsqueeze_client
from fedsqueeze.client import compression_mod
from fedsqueeze.config import RunConfig, proxy_holdout
from fedsqueeze.data import Dataset, clear_caches, client_data, client_indices, normalisation
from fedsqueeze.models import build_model
from fedsqueeze.protocol import arrays_to_tensors, tensors_to_arrays
from fedsqueeze.server import export as export_module
from fedsqueeze.server.compact.lsq import weight_bits_of
from fedsqueeze.server.distill import proxy_split
from fedsqueeze.server.export import raw_pixels
from fedsqueeze.server.results import ResultsWriter
from fedsqueeze.server.server_distiller import (
    STRIDED_WIDTHS,
    ServerDistiller,
    compact_config,
    distill_config,
    export_onnx_too,
    measure_latency,
    student_arch,
    student_kind,
)
from fedsqueeze.server.strategy import CompressedStrategy
from fedsqueeze.simulation.run_cell import run_cell

# ----------------------------------------------------------------------------- proxy holdout


def test_client_data_holdout_leaves_out_exactly_the_proxy_images(mnist: Dataset, mnist_path: Path) -> None:
    kwargs: dict[str, Any] = {"partitioner": "iid", "seed": 4, "data_dir": mnist_path}
    plain = [client_indices("mnist", i, 3, **kwargs) for i in range(3)]  # fills the partition cache first
    held = [client_indices("mnist", i, 3, holdout=500, **kwargs) for i in range(3)]
    proxy, rest = proxy_split(len(mnist.y_train), 500, seed=4)

    joined = np.concatenate(held)
    assert len(np.unique(joined)) == len(joined)  # disjoint
    assert np.array_equal(np.sort(joined), rest.numpy())  # together exactly the non-proxy images
    assert not np.isin(proxy.numpy(), joined).any()
    assert np.array_equal(np.sort(np.concatenate(plain)), np.arange(len(mnist.y_train)))  # no holdout: all

    # Deterministic, also from a cold cache; client_data returns those very samples
    clear_caches(datasets=False)
    assert all(np.array_equal(a, client_indices("mnist", i, 3, holdout=500, **kwargs)) for i, a in enumerate(held))
    x, y = client_data("mnist", 1, 3, holdout=500, **kwargs)
    assert torch.equal(x, mnist.x_train[torch.from_numpy(held[1])]) and torch.equal(
        y, mnist.y_train[torch.from_numpy(held[1])]
    )
    # max_samples draws from the held partition only
    small = client_indices("mnist", 1, 3, holdout=500, max_samples=50, **kwargs)
    assert len(small) == 50 and np.isin(small, held[1]).all()
    # A different proxy size moves the split
    other = np.concatenate([client_indices("mnist", i, 3, holdout=600, **kwargs) for i in range(3)])
    assert len(other) == len(mnist.y_train) - 600


def test_client_data_rejects_a_bad_holdout(mnist_path: Path) -> None:
    with pytest.raises(ValueError, match="holdout must be an integer >= 0"):
        client_data("mnist", 0, 2, holdout=-1, data_dir=mnist_path)
    with pytest.raises(ValueError, match=r"holdout must be an integer in 1\.\.59999"):
        client_data("mnist", 0, 2, holdout=60_000, data_dir=mnist_path)


def test_proxy_holdout_and_configs_follow_the_run_config() -> None:
    run = RunConfig()
    assert proxy_holdout(run) == 0  # distillation off by default: clients keep every image
    on = RunConfig.from_mapping({"distill-every": 2, "proxy-size": 700, "student-conv-rank": 3, "student-bits": 32})
    assert proxy_holdout(on) == 700
    config = distill_config(on)
    assert (config.every_n_rounds, config.proxy_size, config.epochs) == (2, 700, on["distill-epochs"])
    student = compact_config(on)
    assert (student.conv_rank, student.linear_rank, student.bits) == (3, on["student-linear-rank"], 32)
    assert compact_config(run).conv_rank is None  # 0 keeps convolutions dense
    with pytest.raises(ValueError, match="'proxy-size' > 0"):
        proxy_holdout({**on.as_dict(), "proxy-size": 0})
    with pytest.raises(ValueError, match="'distill-every' must be >= 0"):
        proxy_holdout({**on.as_dict(), "distill-every": -1})
    with pytest.raises(ValueError, match="bits must be 8 or 32"):
        compact_config({**on.as_dict(), "student-bits": 4})
    with pytest.raises(ValueError, match="'student-linear-rank' must be >= 0"):
        compact_config({**on.as_dict(), "student-linear-rank": -2})
    with pytest.raises(ValueError, match="distillation is off"):
        distill_config(run)
    assert (config.soft_weight, config.hint_weight) == (1.0, 0.0)  # soft labels only unless asked
    hinted = distill_config({**on, "distill-hint-weight": 0.5, "distill-soft-weight": 0})
    assert (hinted.soft_weight, hinted.hint_weight) == (0.0, 0.5)
    with pytest.raises(ValueError, match="'distill-hint-weight' must be float"):
        distill_config({**on, "distill-hint-weight": "0.5"})
    with pytest.raises(ValueError, match="both 0"):
        distill_config({**on, "distill-soft-weight": 0.0})


def _pixel_dataset(num_train: int, num_test: int) -> Dataset:
    """A small random MNIST-shaped dataset whose images are normalised integer pixels (as load_dataset gives)."""
    generator = torch.Generator().manual_seed(0)
    (mean,), (std,) = normalisation("mnist")

    def images(n: int) -> torch.Tensor:
        return (torch.randint(0, 256, (n, 1, 28, 28), generator=generator).float() / 255.0 - mean) / std

    labels = torch.randint(0, 10, (num_train + num_test,), generator=generator)
    return Dataset("mnist", images(num_train), labels[:num_train], images(num_test), labels[num_train:])


def _export_with(run: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    data = _pixel_dataset(300, 64)
    distiller = ServerDistiller(run, data, lambda: build_model("lenet5", "mnist"))
    torch.manual_seed(0)
    distiller.distill_round(1, build_model("lenet5", "mnist"))
    return distiller.export(tmp_path)


@pytest.mark.parametrize("latency", [None, False])
def test_export_times_nothing_unless_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, latency: bool | None
) -> None:
    def no_timing(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("latency was measured although distill-latency is off")

    monkeypatch.setattr(export_module, "latencies_us", no_timing)
    overrides: dict[str, Any] = {"distill-every": 1, "distill-epochs": 1, "proxy-size": 100, "num-server-rounds": 1}
    if latency is not None:
        overrides["distill-latency"] = latency
    report = _export_with(RunConfig.from_mapping(overrides), tmp_path)
    for entry in (report["teacher"], report["student"]):
        assert entry["latency_us_batch1_1thread"] is None and entry["latency_us_batch1_1thread_no_onednn"] is None
        assert 0.0 <= entry["file_test_accuracy"] <= 1.0
    assert report["distill"]["measure_latency"] is False


def test_export_times_both_files_when_asked(tmp_path: Path) -> None:
    run = RunConfig.from_mapping(
        {"distill-every": 1, "distill-epochs": 1, "proxy-size": 100, "num-server-rounds": 1, "distill-latency": True}
    )
    report = _export_with(run, tmp_path)
    for entry in (report["teacher"], report["student"]):
        assert entry["latency_us_batch1_1thread"] > 0 and entry["latency_us_batch1_1thread_no_onednn"] > 0
    assert report["distill"]["measure_latency"] is True


def _needs_onnx() -> None:
    """Skip where onnx/onnxruntime are missing, except in CI (the test extra installs them: there it fails)."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("onnx/onnxruntime not installed: pip install 'fedsqueeze[onnx]' (in CI this fails instead)")


def test_export_writes_onnx_files_when_asked(tmp_path: Path) -> None:
    _needs_onnx()
    run = RunConfig.from_mapping(
        {"distill-every": 1, "distill-epochs": 1, "proxy-size": 100, "num-server-rounds": 1, "distill-onnx": True}
    )
    report = _export_with(run, tmp_path)
    for entry in (report["teacher"], report["student"]):
        assert (tmp_path / entry["onnx_file"]).stat().st_size == entry["onnx_bytes"]
        assert entry["onnx_file"].endswith(".onnx") and entry["onnx_latency_us_batch1_1thread"] is None
        assert abs(entry["onnx_test_accuracy"] - entry["file_test_accuracy"]) <= 0.02  # same weights, 64 images
        assert (tmp_path / entry["onnx_packed_file"]).stat().st_size == entry["onnx_packed_bytes"]
        assert (
            entry["onnx_packed_file"].endswith("_packed.onnx")
            and entry["onnx_packed_latency_us_batch1_1thread"] is None
        )
        assert abs(entry["onnx_packed_test_accuracy"] - entry["file_test_accuracy"]) <= 0.02
    assert report["distill"]["onnx"] is True
    assert report["onnx_packed_size_ratio"] == report["teacher"]["onnx_bytes"] / report["student"]["onnx_packed_bytes"]
    assert (
        "onnx_file"
        not in _export_with(RunConfig.from_mapping({**run.as_dict(), "distill-onnx": False}), tmp_path / "b")["student"]
    )


# ----------------------------------------------------------------------------- student-arch


def test_student_arch_is_checked_where_it_is_read() -> None:
    assert RunConfig().student_arch == "pruned" and student_kind({}) == "pruned"
    assert student_kind({"student-arch": "strided"}) == "strided"
    with pytest.raises(ValueError, match=r"'student-arch' must be one of \('pruned', 'strided'\), got 'tiny'"):
        RunConfig.from_mapping({"student-arch": "tiny"})
    with pytest.raises(ValueError, match=r"'student-arch' must be one of .*, got 'Strided'"):
        student_kind({"student-arch": "Strided"})
    with pytest.raises(ValueError, match="'student-arch' must be str"):
        RunConfig.from_mapping({"student-arch": 1})
    with pytest.raises(ValueError, match="'broadcast-compact' = true needs 'student-arch' = 'pruned'.*got 'strided'"):
        RunConfig.from_mapping({"student-arch": "strided", "broadcast-compact": True, "distill-every": 1})
    with pytest.raises(ValueError, match="'broadcast-compact' = true needs 'student-arch' = 'pruned'.*got 'strided'"):
        student_arch({"model": "lenet5", "dataset": "mnist", "student-arch": "strided"})
    with pytest.raises(ValueError, match="'student-prune-method' must be 'norm' with 'student-arch' = 'strided'"):
        student_kind({"student-arch": "strided", "student-prune-method": "sensitivity"})
    with pytest.raises(ValueError, match="'distill-hint-weight' must be 0 with 'student-arch' = 'strided'"):
        student_kind({"student-arch": "strided", "distill-hint-weight": 0.5})
    # The distiller reads it: a strided run with hints is refused before any training
    run = RunConfig.from_mapping({"distill-every": 1, "student-arch": "strided", "distill-hint-weight": 1.0})
    with pytest.raises(ValueError, match="'distill-hint-weight' must be 0"):
        ServerDistiller(run, _pixel_dataset(20, 4), lambda: build_model("lenet5", "mnist"))


def _weight_only(student: torch.nn.Module) -> torch.nn.Module:
    """The student with its LSQ activation quantisers bypassed: the function a packed ONNX file computes."""
    from test_onnx_packed import _weight_only as bypassed  # imported here: that module skips without onnx

    return bypassed(student)


@pytest.mark.parametrize("weight_bits", [4, 0])
def test_strided_student_exports_a_packed_file_that_predicts_as_the_student(tmp_path: Path, weight_bits: int) -> None:
    _needs_onnx()
    from fedsqueeze.server.onnx_export import OnnxRuntimeModel

    # LSQ 4-bit, or (bits 0) the float student exported with float32 weights: the file is then the student itself
    run = RunConfig.from_mapping(
        {"distill-every": 1, "distill-epochs": 2, "proxy-size": 200, "num-server-rounds": 1, "distill-onnx": True,
         "student-arch": "strided", "student-weight-bits": weight_bits, "student-qat-epochs": 1,
         "student-bits": 8 if weight_bits else 32}
    )  # fmt: skip
    data = _pixel_dataset(300, 64)
    distiller = ServerDistiller(run, data, lambda: build_model("lenet5", "mnist"))
    torch.manual_seed(0)
    distiller.distill_round(1, build_model("lenet5", "mnist"))
    report = distiller.export(tmp_path)
    student, entry = distiller.student, report["student"]
    assert student is not None and entry["student_arch"] == "strided"
    assert [name for name, _ in student.named_children()] == ["conv1", "relu1", "conv2", "relu2", "flatten", "fc"]
    assert weight_bits_of(student) == ({"conv1": 4, "conv2": 4, "fc": 4} if weight_bits else {})
    packed = tmp_path / entry["onnx_packed_file"]
    # 5,994 weights against 61,706: a tenth of the teacher's file in float32, 4-bit packing makes it far less
    smaller = 20 if weight_bits else 8
    assert packed.stat().st_size == entry["onnx_packed_bytes"] < report["teacher"]["onnx_bytes"] / smaller
    if weight_bits:  # 4-bit weights packed two to a byte, against int8 containers and activation Q/DQ pairs
        assert entry["onnx_packed_bytes"] < 0.6 * entry["onnx_bytes"]
    logits = OnnxRuntimeModel(packed)(raw_pixels(data.x_test, *normalisation("mnist")).float())
    with torch.no_grad():
        expected = _weight_only(student)(data.x_test) if weight_bits else student(data.x_test)
    torch.testing.assert_close(logits, expected, atol=1e-4 * float(expected.abs().max()), rtol=0)
    assert torch.equal(logits.argmax(1), expected.argmax(1))
    assert entry["onnx_packed_test_accuracy"] == float((logits.argmax(1) == data.y_test).float().mean())


def test_strided_student_takes_the_datasets_shape() -> None:
    generator = torch.Generator().manual_seed(0)
    images, labels = torch.randn(120, 3, 32, 32, generator=generator), torch.randint(0, 10, (120,), generator=generator)
    data = Dataset("cifar10", images[:100], labels[:100], images[100:], labels[100:])
    run = RunConfig.from_mapping(
        {"dataset": "cifar10", "model": "cifar-cnn", "distill-every": 1, "distill-epochs": 1, "proxy-size": 50,
         "num-server-rounds": 1, "student-arch": "strided"}
    )  # fmt: skip
    distiller = ServerDistiller(run, data, lambda: build_model("cifar-cnn", "cifar10"))
    row = distiller.distill_round(1, build_model("cifar-cnn", "cifar10"))
    assert distiller.student is not None
    shapes = {k: tuple(v.shape) for k, v in distiller.student.state_dict().items() if k.endswith("weight")}
    side = ((32 - 5) // 2 + 1 - 5) // 2 + 1  # two 5x5 stride-2 convs without padding: 32 -> 14 -> 5
    first, second = STRIDED_WIDTHS
    assert shapes == {"conv1.weight": (first, 3, 5, 5), "conv2.weight": (second, first, 5, 5),
                      "fc.weight": (10, second * side * side)}  # fmt: skip
    assert row["student_params"] == sum(p.numel() for p in distiller.student.parameters()) < row["teacher_params"]


def test_distill_latency_must_be_a_bool() -> None:
    assert measure_latency({}) is False and measure_latency({"distill-latency": True}) is True
    with pytest.raises(ValueError, match="'distill-latency' must be bool .* got 'yes'"):
        measure_latency({"distill-latency": "yes"})
    assert export_onnx_too({}) is False and export_onnx_too({"distill-onnx": True}) is True
    with pytest.raises(ValueError, match="'distill-onnx' must be bool"):
        export_onnx_too({"distill-onnx": 1})


def test_client_app_leaves_the_proxy_images_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The ClientApp asks client_data for the holdout that the server's proxy set takes."""
    seen: list[dict[str, Any]] = []

    class Stop(Exception):
        pass

    def fake_client_data(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs)
        raise Stop

    # the ClientApp reaches client_data through data.client_data_of_run
    monkeypatch.setattr(fedsqueeze.data.partitioning, "client_data", fake_client_data)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    msg = Message(RecordDict(), dst_node_id=5, message_type="train")
    for run_config, holdout in (({}, 0), ({"distill-every": 1, "proxy-size": 800}, 800)):
        context = Context(
            run_id=7,
            node_id=5,
            node_config={"partition-id": 0, "num-partitions": 2},
            state=RecordDict(),
            run_config=run_config,
        )
        with pytest.raises(Stop):
            fedsqueeze_client.train(msg, context)
        assert seen[-1]["holdout"] == holdout


# ----------------------------------------------------------------------------- strategy hook


from test_strategy import FakeGrid  # noqa: E402 - the Grid stand-in the strategy tests share


def test_strategy_keeps_the_round_client_models_only_when_asked() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    nodes = [11, 12]
    weights = {"w": torch.zeros(3, 4), "b": torch.zeros(3)}
    client = ClientApp(mods=[compression_mod])

    @client.train()
    def _local(msg: Message, context: Context) -> Message:
        local = {k: v + context.node_id for k, v in arrays_to_tensors(msg.content["arrays"]).items()}
        metrics = MetricRecord({"num-examples": 1})
        return Message(RecordDict({"arrays": tensors_to_arrays(local), "metrics": metrics}), reply_to=msg)

    for keep in (True, False):
        strategy = CompressedStrategy(FedAvg(), uplink="identity", downlink="identity", keep_client_models=keep)
        for server_round in (1, 2):
            messages = strategy.configure_train(
                server_round, tensors_to_arrays(weights), ConfigRecord(), FakeGrid(nodes)
            )
            replies = [
                client(
                    m,
                    Context(
                        run_id=7, node_id=m.metadata.dst_node_id, node_config={}, state=RecordDict(), run_config={}
                    ),
                )
                for m in messages
            ]
            arrays, _ = strategy.aggregate_train(server_round, replies)
            assert arrays is not None
            if keep:  # this round's two models, no more
                got = sorted(float(m["w"][0, 0]) for m in strategy.client_models)
                assert got == [11.0, 12.0]
                assert all(set(m) == set(weights) for m in strategy.client_models)
            else:
                assert strategy.client_models == []


def test_results_writer_logs_distillations_and_forgets_stale_files(tmp_path: Path) -> None:
    (tmp_path / "distill.csv").write_text("old\n")
    (tmp_path / "compact.json").write_text("{}")
    writer = ResultsWriter(tmp_path, {})
    assert not (tmp_path / "distill.csv").exists() and not (tmp_path / "compact.json").exists()
    with pytest.raises(ValueError, match="lacks"):
        writer.log_distillation({"round": 1})


# ----------------------------------------------------------------------------- end to end


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # Flower's simulation engine (Ray)
def test_simulation_distils_and_exports_a_compact_student(tmp_path: Path, mnist: Dataset, mnist_path: Path) -> None:
    results = tmp_path / "results"
    overrides = {
        "num-server-rounds": 2,
        "max-samples-per-client": 300,
        "data-dir": str(mnist_path),
        "results-dir": str(results),
        "min-train-nodes": 3,
        "local-epochs": 2,
        "uplink-codec": "topk(ratio=0.1) | quantize(bits=8) | zstd",
        "downlink-codec": "quantize(bits=8) | zstd",
        "distill-every": 1,
        "distill-epochs": 1,
        "distill-ensemble": True,
        "proxy-size": 500,
    }
    run_cell(overrides, num_supernodes=3)

    rounds = _read_csv(results / "rounds.csv")
    distilled = _read_csv(results / "distill.csv")
    report = json.loads((results / "compact.json").read_text())
    summary = json.loads((results / "summary.json").read_text())

    # One distillation per round, each from the global model and the three client models
    assert [int(r["round"]) for r in distilled] == [1, 2]
    for row, round_row in zip(distilled, rounds, strict=False):
        assert int(row["teachers"]) == 4 and int(row["proxy_samples"]) == 500
        assert int(row["student_params"]) < int(row["teacher_params"])
        assert float(row["global_accuracy"]) == pytest.approx(float(round_row["accuracy"]))
    assert summary["config"]["distill-every"] == 1 and summary["num_rounds"] == 2

    teacher, student = report["teacher"], report["student"]
    assert student["params"] < teacher["params"] and student["bits"] == 8 and teacher["bits"] == 32
    assert student["round"] == 2 and student["teachers"] == 4
    assert report["size_ratio"] == pytest.approx(teacher["torchscript_bytes"] / student["torchscript_bytes"])
    assert report["size_ratio"] > 5
    for entry in (teacher, student):
        assert (results / entry["torchscript_file"]).stat().st_size == entry["torchscript_bytes"]
        assert (results / entry["safetensors_file"]).stat().st_size == entry["safetensors_bytes"]
        assert entry["latency_us_batch1_1thread"] is None  # timing is opt-in (distill-latency)
    assert summary["compact"] == report

    # The exported student is self-contained: torch.jit.load alone, raw pixels in
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        loaded = torch.jit.load(str(results / student["torchscript_file"]))
    mean, std = normalisation("mnist")
    raw = raw_pixels(mnist.x_test, mean, std)
    with torch.inference_mode():
        predictions = torch.cat([loaded(raw[i : i + 128]).argmax(1) for i in range(0, len(raw), 128)])
    accuracy = float((predictions == mnist.y_test).float().mean())
    assert accuracy == pytest.approx(student["file_test_accuracy"])
    assert accuracy > 0.2  # 10 classes: twice chance after two short rounds
    assert teacher["file_test_accuracy"] == pytest.approx(float(rounds[-1]["accuracy"]), abs=2e-3)
