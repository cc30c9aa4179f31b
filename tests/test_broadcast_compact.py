"""broadcast-compact: the architecture string, the model switch on nodes and server, and a simulation."""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp.strategy import FedAvg, FedAvgM
from flwr.supercore.task_identity import TaskIdentity

from fedsqueeze.client import CompressionMod, compression_mod
from fedsqueeze.client.mod import STATE_FEEDBACK, STATE_META, STATE_REFERENCE
from fedsqueeze.client.state_record import state_tensors as read_state
from fedsqueeze.codecs import parse
from fedsqueeze.compact_arch import ARCH_MAX_CHARS, StudentArch, build_student, count_parameters, parse_arch
from fedsqueeze.config import RunConfig
from fedsqueeze.data import Dataset
from fedsqueeze.models import build_model
from fedsqueeze.protocol import (
    ARCH_CONFIG_KEY,
    DELTA,
    FULL,
    PAYLOAD_KEY,
    Downlink,
    arrays_to_tensors,
    model_digest,
    tensors_to_arrays,
)
from fedsqueeze.server.compact import LowRankLinear
from fedsqueeze.server.server_distiller import ServerDistiller, compact_config, student_arch
from fedsqueeze.server.strategy import DOWN, CompressedStrategy
from fedsqueeze.simulation.run_cell import run_cell
from fedsqueeze.training import get_weights, set_weights

ARCH = "lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)"


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


# ----------------------------------------------------------------------------- the architecture string


@pytest.mark.parametrize(
    "arch",
    [
        StudentArch("lenet5", "mnist", 0, 12, 0.5),
        StudentArch("mcmahan-cnn", "mnist", 8, 32, 0.25),
        StudentArch("cifar-cnn", "cifar10", 0, 0, 0.0),
        StudentArch("lenet5", "cifar10", 4096, 1, 0.123456),
    ],
)
def test_the_architecture_string_round_trips(arch: StudentArch) -> None:
    text = str(arch)
    assert parse_arch(text) == arch
    assert str(parse_arch(text)) == text
    assert len(text) <= ARCH_MAX_CHARS


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "expected the form"),
        ("lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.50)", "expected the form"),  # not canonical
        ("lenet5/mnist:compact(linear_rank=12,conv_rank=0,prune=0.5)", "expected the form"),  # keys reordered
        ("lenet5/mnist:compact(conv_rank=0,linear_rank=012,prune=0.5)", "expected the form"),
        ("lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=1)", "expected the form"),
        ("lenet5/mnist:compact(conv_rank=-1,linear_rank=12,prune=0.5)", "expected the form"),
        ("lenet5/mnist:compact(conv_rank=0,linear_rank=99999,prune=0.5)", "expected the form"),
        ("lenet5/mnist:compact(conv_rank=0,linear_rank=5000,prune=0.5)", "linear_rank must be an integer in [0, 4096]"),
        ("lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5) ", "expected the form"),
        ("resnet/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)", "unknown model 'resnet'"),
        ("lenet5/svhn:compact(conv_rank=0,linear_rank=12,prune=0.5)", "unknown dataset 'svhn'"),
        ("__import__('os').system('true')", "expected the form"),
        ("lenet5/mnist:compact(conv_rank=0,linear_rank=12,prune=0.5)" + "x" * 200, "at most 128 characters"),
    ],
)
def test_bad_architecture_strings_are_refused(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(").replace("[", r"\[")):
        parse_arch(text)


def test_a_non_string_architecture_is_refused() -> None:
    with pytest.raises(ValueError, match="must be a string, got bytes"):
        parse_arch(ARCH.encode())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="more than 6 decimals"):
        StudentArch("lenet5", "mnist", 0, 12, 0.1234567)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"student-prune-ratio": 0.25, "student-conv-rank": 4, "student-linear-rank": 8},
        {"model": "mcmahan-cnn", "student-linear-rank": 32},
        {"model": "cifar-cnn", "dataset": "cifar10", "student-prune-ratio": 0.0},
    ],
)
def test_a_node_builds_exactly_the_server_student(overrides: dict[str, object]) -> None:
    """The server's student of a *trained* teacher and the node's student of the string agree in layout."""
    run = RunConfig.from_mapping({"distill-every": 2, "broadcast-compact": True, **overrides})
    torch.manual_seed(5)
    teacher = build_model(run.model, run.dataset)
    with torch.no_grad():  # weights unlike the node's placeholder teacher: pruning keeps other filters
        for p in teacher.parameters():
            p.mul_(torch.rand_like(p) * 3)
    server = build_student(teacher, compact_config(run))
    node = parse_arch(str(student_arch(run))).build()
    layout = {k: (tuple(v.shape), v.dtype) for k, v in server.state_dict().items()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in node.state_dict().items()} == layout
    assert count_parameters(node) == count_parameters(server) < count_parameters(teacher)
    # The node's student computes what the server's does once it holds its weights
    set_weights(node, get_weights(server))
    x = torch.randn(2, *({"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}[run.dataset]))
    assert torch.allclose(node.eval()(x), server.eval()(x), atol=1e-5)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"broadcast-compact": True}, "needs a student: set 'distill-every' > 0"),
        ({"broadcast-compact-lr": 0.0}, "'broadcast-compact-lr' must be > 0, got 0.0"),
    ],
)
def test_the_run_config_refuses_a_switch_it_cannot_make(overrides: dict[str, object], reason: str) -> None:
    with pytest.raises(ValueError, match=reason.replace("(", r"\(")):
        RunConfig.from_mapping(overrides)


def test_student_arch_refuses_sensitivity_pruning() -> None:
    run = RunConfig.from_mapping({"distill-every": 2, "student-prune-method": "sensitivity"})
    with pytest.raises(ValueError, match="needs 'student-prune-method' = 'norm'"):
        student_arch(run)


# ----------------------------------------------------------------------------- the switch on a node


def teacher_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return get_weights(build_model("lenet5"))


def student_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return get_weights(parse_arch(ARCH).build())


def node_context(node_id: int = 42) -> Context:
    return Context(run_id=7, node_id=node_id, node_config={}, state=RecordDict(), run_config={})


def state_tensors(ctx: Context, key: str) -> dict[str, torch.Tensor]:
    record = ctx.state[key]
    assert isinstance(record, ArrayRecord), f"{key} is a {type(record).__name__}"
    return read_state(record)


def train_message(down: Downlink, node_id: int = 42) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    content[PAYLOAD_KEY] = down.to_record()
    return Message(content, dst_node_id=node_id, message_type="train")


def arch_app(seen: list[dict[str, object]]) -> ClientApp:
    """A ClientApp that builds the model the config names (as fedsqueeze's does) and nudges it; its nodes
    can build the run's first model (the teacher's weights) themselves."""
    app = ClientApp(mods=[CompressionMod(initial_model=lambda _: teacher_weights())])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        config = msg.content["config"]
        arch = str(config.get(ARCH_CONFIG_KEY, ""))
        model = parse_arch(arch).build() if arch else build_model("lenet5")
        received = arrays_to_tensors(msg.content.array_records["arrays"])
        set_weights(model, received)  # raises unless names and shapes match exactly
        seen.append({"arch": arch, "params": count_parameters(model)})
        local = {k: v + 0.01 * (context.node_id % 7 + 1) for k, v in received.items()}
        metrics = MetricRecord({"num-examples": 5})
        return Message(RecordDict({"arrays": tensors_to_arrays(local), "metrics": metrics}), reply_to=msg)

    return app


def test_a_node_switches_models_drops_the_old_residual_and_checks_the_digest() -> None:
    seen: list[dict[str, object]] = []
    app, ctx = arch_app(seen), node_context()
    uplink = "topk(ratio=0.1) | quantize(bits=8) | zstd"
    # Round 1: the full teacher; the lossy uplink leaves a residual of the teacher's layout
    first = Downlink(FULL, 1, -1, [parse("zstd").encode(teacher_weights())], uplink)
    assert not app(train_message(first), ctx).has_error()
    assert "residual/fc1.weight" in set(state_tensors(ctx, STATE_FEEDBACK))
    # Round 2: the switch, the student in full with its architecture and digest
    student = student_weights()
    switch = Downlink(FULL, 2, -1, [parse("zstd").encode(student)], uplink, arch=ARCH, digest=model_digest(student))
    reply = app(train_message(switch), ctx)
    assert not reply.has_error(), reply.error.reason if reply.has_error() else ""
    assert seen[-1] == {"arch": ARCH, "params": count_parameters(parse_arch(ARCH).build())}
    held = state_tensors(ctx, STATE_REFERENCE)
    assert model_digest(held) == model_digest(student)
    assert ctx.state[STATE_META]["arch"] == ARCH
    residual_names = set(state_tensors(ctx, STATE_FEEDBACK))
    # The residual of the teacher was dropped: the new one has the student's layout only
    assert "residual/fc1.reduce.weight" in residual_names and "residual/fc1.weight" not in residual_names


def test_a_node_refuses_a_bad_switch() -> None:
    student = student_weights()
    blob = parse("zstd").encode(student)
    cases = [
        (Downlink(FULL, 2, -1, [blob], "identity", arch=ARCH, digest="0" * 64), "digest mismatch"),
        (Downlink(FULL, 2, -1, [blob], "identity", arch="lenet5:compact()", digest=""), "bad student architecture"),
    ]
    for down, reason in cases:
        seen: list[dict[str, object]] = []
        reply = arch_app(seen)(train_message(down), node_context())
        assert reply.has_error() and reply.error.code == ErrorCode.MOD_FAILED_PRECONDITION
        assert reason in str(reply.error.reason) and seen == []


def test_a_delta_for_the_student_against_a_teacher_reference_is_refused() -> None:
    """A node that holds the old model must get the switched model in full, never a delta on the old one."""
    ctx, seen = node_context(), list[dict[str, object]]()
    app = arch_app(seen)
    first = Downlink(FULL, 1, -1, [parse("zstd").encode(teacher_weights())], "identity")
    assert not app(train_message(first), ctx).has_error()
    delta = {k: torch.zeros_like(v) for k, v in student_weights().items()}
    reply = app(train_message(Downlink(DELTA, 2, 1, [parse("zstd").encode(delta)], "identity", arch=ARCH)), ctx)
    assert reply.has_error() and "this node holds none" in str(reply.error.reason)


# ----------------------------------------------------------------------------- the switch on the server


class Grid:
    """The part of a Grid that Flower's strategies and the stable node order use; nodes answer the hello."""

    def __init__(self, node_ids: list[int], contexts: dict[int, Context]) -> None:
        self.node_ids, self.contexts = node_ids, contexts

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        return [compression_mod(m, self.contexts[m.metadata.dst_node_id], lambda *_: None) for m in messages]  # type: ignore[arg-type,return-value]


def run_round(
    strategy: CompressedStrategy, server_round: int, arrays: object, nodes: list[int], ctx: dict[int, Context]
) -> tuple[object, list[Message]]:
    app = arch_app([])
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord(), Grid(nodes, ctx)))  # type: ignore[arg-type]
    sent = [copy.copy(m) for m in messages]
    replies = [app(m, ctx[m.metadata.dst_node_id]) for m in messages]
    new, _ = strategy.aggregate_train(server_round, replies)
    return (new if new is not None else arrays), sent


@pytest.mark.parametrize("initial", ["sent", "shared"])
def test_the_strategy_switches_every_node_and_a_late_node_too(initial: str) -> None:
    """Every node gets the switched model in full, also one absent at the switch and one that built
    the run's first model itself (a regression: it was sent a delta against that first model)."""
    nodes, late = [101, 102, 103], 104
    ctx = {i: node_context(i) for i in [*nodes, late]}
    inner = FedAvgM(server_momentum=0.9, min_available_nodes=1, min_train_nodes=1)
    strategy = CompressedStrategy(
        inner,
        uplink="topk(ratio=0.2) | quantize(bits=8) | zstd",
        downlink="quantize(bits=8) | zstd",
        initial=initial,
    )
    arrays: object = tensors_to_arrays(teacher_weights())
    for server_round in (1, 2):
        arrays, sent = run_round(strategy, server_round, arrays, nodes, ctx)
        assert strategy.rejections == []
    assert {Downlink.from_record(m.content[PAYLOAD_KEY]).kind for m in sent} == {DELTA}  # type: ignore[arg-type]
    student = student_weights()
    strategy.switch_model(student, ARCH, {"lr": 0.02})
    arrays, sent = run_round(strategy, 3, arrays, nodes, ctx)  # Flower hands it the old model's arrays
    assert strategy.switched_at == 3 and strategy.rejections == []
    for msg in sent:
        down = Downlink.from_record(msg.content[PAYLOAD_KEY])  # type: ignore[arg-type]
        assert down.kind == FULL and down.arch == ARCH and down.digest == model_digest(student)
        assert Downlink.from_record(msg.content[PAYLOAD_KEY]).folded["config"]["lr"] == 0.02  # type: ignore[arg-type]
    assert inner.momentum_vector is not None and len(inner.momentum_vector) == len(student)  # started over
    new = arrays_to_tensors(arrays)  # type: ignore[arg-type]
    assert {k: v.shape for k, v in new.items()} == {k: v.shape for k, v in student.items()}
    assert sum(v.numel() for v in new.values()) == count_parameters(parse_arch(ARCH).build())

    arrays, sent = run_round(strategy, 4, arrays, nodes, ctx)  # up-to-date nodes: deltas on the student
    assert all(Downlink.from_record(m.content[PAYLOAD_KEY]).kind == DELTA for m in sent)  # type: ignore[arg-type]
    arrays, sent = run_round(strategy, 5, arrays, [*nodes, late], ctx)  # absent at the switch: gets it in full
    downs = {m.metadata.dst_node_id: Downlink.from_record(m.content[PAYLOAD_KEY]) for m in sent}  # type: ignore[arg-type]
    assert downs[late].kind == FULL and downs[late].arch == ARCH
    assert strategy.rejections == []
    assert ctx[late].state[STATE_META]["arch"] == ARCH


def test_evaluate_messages_name_the_switched_architecture() -> None:
    nodes = [101, 102]
    ctx = {i: node_context(i) for i in nodes}
    strategy = CompressedStrategy(FedAvg(fraction_evaluate=1.0, min_available_nodes=1), downlink="zstd")
    arrays, _ = run_round(strategy, 1, tensors_to_arrays(teacher_weights()), nodes, ctx)
    before = list(strategy.configure_evaluate(1, arrays, ConfigRecord(), Grid(nodes, ctx)))  # type: ignore[arg-type]
    assert before and all(ARCH_CONFIG_KEY not in m.content["config"] for m in before)
    strategy.switch_model(student_weights(), ARCH)
    arrays, _ = run_round(strategy, 2, arrays, nodes, ctx)
    after = list(strategy.configure_evaluate(2, arrays, ConfigRecord(), Grid(nodes, ctx)))  # type: ignore[arg-type]
    assert after and all(m.content["config"][ARCH_CONFIG_KEY] == ARCH for m in after)
    assert all(r.direction == DOWN for r in strategy.traffic if r.message_type == "evaluate" and r.round == 2)


def test_the_student_module_holds_factored_layers() -> None:
    """The string builds the factored student, not the dense teacher."""
    student = parse_arch(ARCH).build()
    assert isinstance(student.fc1, LowRankLinear) and student.training


# ----------------------------------------------------------------------------- end to end


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.mark.slow  # Flower's simulation engine (Ray)
def test_broadcast_compact_runs_end_to_end(tmp_path: Path, mnist_path: Path) -> None:
    results = tmp_path / "results"
    overrides = {
        "num-server-rounds": 4,
        "max-samples-per-client": 300,
        "data-dir": str(mnist_path),
        "results-dir": str(results),
        "min-train-nodes": 4,
        "partitioner": "iid",
        "local-epochs": 2,
        "distill-every": 2,
        "distill-epochs": 1,
        "proxy-size": 500,
        "broadcast-compact": True,
    }
    run_cell(overrides, num_supernodes=4)

    rounds = {int(r["round"]): r for r in _read_csv(results / "rounds.csv")}
    distilled = _read_csv(results / "distill.csv")
    messages = _read_csv(results / "messages.csv")
    report = json.loads((results / "compact.json").read_text())
    arch = str(student_arch(RunConfig.from_mapping(overrides)))
    student_params = count_parameters(parse_arch(arch).build())

    # Distilled at round 2 and switched; round 4's row is the federated student itself
    assert [int(r["round"]) for r in distilled] == [2, 4]
    assert int(distilled[0]["student_params"]) == student_params and int(distilled[0]["teachers"]) == 1
    assert int(distilled[1]["student_params"]) == student_params and int(distilled[1]["teachers"]) == 0
    assert report["student"]["broadcast_after_round"] == 2 and report["student"]["arch"] == arch
    assert report["student"]["params"] == student_params < report["teacher"]["params"]
    assert all(int(r["replies"]) == 4 and int(r["rejected"]) == 0 for r in rounds.values())
    # Every node got the student in full at round 3; the replies from round 3 on are the student's size
    down3 = [m for m in messages if m["round"] == "3" and m["direction"] == "down" and m["message_type"] == "train"]
    assert len(down3) == 4 and {m["kind"] for m in down3} == {"full"}
    up = {r: [m for m in messages if m["round"] == str(r) and m["direction"] == "up"] for r in (2, 4)}
    # (their FP32 size shrank by the parameters the student lacks, up to its two more tensors and longer names)
    shrink = 4 * (report["teacher"]["params"] - student_params)
    fp32 = {r: sorted(int(m["fp32_bytes"]) for m in up[r]) for r in (2, 4)}
    assert all(abs(before - after - shrink) < 4000 for before, after in zip(fp32[2], fp32[4], strict=True)), fp32
    # Bytes per round shrink with the model, both ways
    for direction in ("uplink_bytes", "downlink_bytes"):
        assert int(rounds[4][direction]) < int(rounds[2][direction]), direction
    assert float(rounds[4]["accuracy"]) > 0.5  # the switched model learns on: far above chance


# ----------------------------------------------------------------------------- the distiller's side


def test_the_distiller_hands_over_its_fp32_student_and_then_adopts_the_federated_one(mnist: Dataset) -> None:
    """With LSQ on, the switch still takes the FP32 student; later rounds fine-tune the federated student."""
    small = Dataset("mnist", mnist.x_train[:2000], mnist.y_train[:2000], mnist.x_test[:500], mnist.y_test[:500])
    run = RunConfig.from_mapping(
        {
            "distill-every": 2,
            "broadcast-compact": True,
            "proxy-size": 256,
            "distill-epochs": 1,
            "student-weight-bits": 4,
            "student-qat-epochs": 1,
        }
    )
    distiller = ServerDistiller(run, small, lambda: build_model("lenet5"))
    torch.manual_seed(0)
    teacher = build_model("lenet5")
    distiller.distill_round(2, teacher)
    weights, arch = distiller.switch_weights(2)
    assert arch == str(student_arch(run)) and distiller.switched_round == 2
    fp32 = parse_arch(arch).build()
    set_weights(fp32, weights)  # plain FP32 tensors of exactly the built layout (no LSQ steps)
    assert all(v.dtype == torch.float32 for v in weights.values())

    before = {k: v.clone() for k, v in fp32.state_dict().items()}
    row = distiller.adopt_round(4, fp32, global_accuracy=0.5)
    assert row["round"] == 4 and row["teachers"] == 1 and row["proxy_samples"] == 256
    assert row["student_params"] >= count_parameters(fp32)  # LSQ adds its step sizes
    assert row["teacher_params"] == count_parameters(teacher)
    assert distiller.student is not fp32 and distiller.last_round == 4
    assert all(torch.equal(v, before[k]) for k, v in fp32.state_dict().items())  # the global model is untouched


def test_switch_weights_needs_broadcast_compact_and_a_distillation(mnist: Dataset) -> None:
    small = Dataset("mnist", mnist.x_train[:1000], mnist.y_train[:1000], mnist.x_test[:100], mnist.y_test[:100])
    off = ServerDistiller(
        RunConfig.from_mapping({"distill-every": 2, "proxy-size": 128}), small, lambda: build_model("lenet5")
    )
    assert off.arch is None
    with pytest.raises(RuntimeError, match="broadcast-compact is off or no distillation ran"):
        off.switch_weights(2)


def test_a_reply_of_the_old_model_after_the_switch_is_rejected() -> None:
    """A node that ignores the switch and replies with the old layout is dropped, with the reason."""
    nodes = [101, 102]
    ctx = {i: node_context(i) for i in nodes}
    strategy = CompressedStrategy(FedAvg(min_available_nodes=1, min_train_nodes=1), downlink="zstd")
    arrays, _ = run_round(strategy, 1, tensors_to_arrays(teacher_weights()), nodes, ctx)
    strategy.switch_model(student_weights(), ARCH)
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), Grid(nodes, ctx)))  # type: ignore[arg-type]
    stale = [
        Message(
            RecordDict({"arrays": tensors_to_arrays(teacher_weights()), "metrics": MetricRecord({"num-examples": 5})}),
            reply_to=m,
        )
        for m in messages
    ]
    new, _ = strategy.aggregate_train(2, stale)
    assert len(strategy.rejections) == 2
    assert all("array names differ" in r.reason for r in strategy.rejections)
    assert new is not None  # the round keeps the student, not the old model Flower still holds
    assert {k: v.shape for k, v in arrays_to_tensors(new).items()} == {k: v.shape for k, v in student_weights().items()}
