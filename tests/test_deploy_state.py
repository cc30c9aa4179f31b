"""A deployed node's state on disk (``state-dir``): saved after each reply, restored by a restarted node."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from flwr.serverapp.strategy import FedAvg
from flwr.supercore.task_identity import TaskIdentity
from test_strategy import FakeGrid, global_model, make_client

from fedsqueeze.client.mod import STATE_FEEDBACK, STATE_META, STATE_REFERENCE
from fedsqueeze.client.state import MANIFEST, STATE_DIR_KEY, NodeState, load_node_state, save_node_state
from fedsqueeze.protocol import DELTA, FULL, PAYLOAD_KEY, Downlink, arrays_to_tensors, tensors_to_arrays
from fedsqueeze.server.strategy import CompressedStrategy

NODES = [101, 102, 103]
RESTARTED = 102
UPLINK = "quantize(bits=8) | zstd"
NODE_KEY = 4  # the stable key (partition id) of the node that saves


@pytest.fixture(autouse=True)
def _task_identity() -> None:
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1


def _state(version: int, run_id: int = 7, seed: int = 0) -> NodeState:
    model = global_model(seed)
    residual = {f"residual/{k}": 0.01 * v for k, v in model.items()}
    return NodeState(run_id, NODE_KEY, version, model, UPLINK, {**residual, "codec/calls": torch.tensor(3)}, version)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_saved_state_loads_back_equal(tmp_path: Path) -> None:
    saved = _state(3)
    save_node_state(tmp_path, saved)
    loaded = load_node_state(tmp_path, 7, NODE_KEY, lambda v: v == 3)
    assert loaded is not None and loaded.version == 3 and loaded.uplink == UPLINK and loaded.feedback_version == 3
    assert _same(loaded.reference, saved.reference) and loaded.feedback is not None
    assert _same(loaded.feedback, saved.feedback)  # type: ignore[arg-type]
    names = {p.name for p in tmp_path.iterdir()}
    assert names == {MANIFEST, "reference-3.npz", "feedback-3.npz"}  # no temporary file left


def test_the_version_before_is_kept_and_older_ones_deleted(tmp_path: Path) -> None:
    for version in (1, 2, 3):
        save_node_state(tmp_path, _state(version, seed=version))
    assert sorted(p.name for p in tmp_path.glob("reference-*")) == ["reference-2.npz", "reference-3.npz"]
    assert [p.name for p in tmp_path.glob("feedback-*")] == ["feedback-3.npz"]
    older = load_node_state(tmp_path, 7, NODE_KEY, lambda v: v == 2)  # the server never got the reply made at 3
    newest = load_node_state(tmp_path, 7, NODE_KEY, lambda v: v >= 2)
    assert older is not None and older.version == 2 and _same(older.reference, global_model(2))
    assert newest is not None and newest.version == 3 and _same(newest.reference, global_model(3))
    assert load_node_state(tmp_path, 7, NODE_KEY, lambda v: v == 1) is None


def test_nothing_saved_or_another_runs_state_is_not_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert load_node_state(tmp_path / "missing", 7, NODE_KEY, lambda v: True) is None
    save_node_state(tmp_path, _state(2, run_id=6))
    with caplog.at_level(logging.INFO):
        assert load_node_state(tmp_path, 7, NODE_KEY, lambda v: True) is None
    assert "is of run 6, not 7" in caplog.text
    save_node_state(tmp_path, _state(1, run_id=7))  # a new run replaces the old run's files
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["feedback-1.npz", "reference-1.npz"]


def _truncate(folder: Path) -> None:
    path = folder / "reference-3.npz"
    path.write_bytes(path.read_bytes()[:100])


def _other_tensors(folder: Path) -> None:
    np.savez(folder / "reference-3.npz", *(v.numpy() + 1 for v in global_model().values()))


def _object_array(folder: Path) -> None:
    arrays = [np.array([{"a": 1}], dtype=object)] * 3
    np.savez(folder / "reference-3.npz", *arrays)  # loading it would need pickle


def _path_in_manifest(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["versions"][0]["file"] = "../reference-3.npz"
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _another_node(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["node"] = NODE_KEY + 1
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _foreign_format(folder: Path) -> None:
    (folder / MANIFEST).write_text(json.dumps({"format": "someone-else/9"}))


def _not_json(folder: Path) -> None:
    (folder / MANIFEST).write_bytes(b"{not json")


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (_truncate, "BadZipFile"),
        (_other_tensors, "has digest"),
        (_object_array, "allow_pickle"),
        (_path_in_manifest, "'versions' must be entries"),
        (_another_node, f"written by node {NODE_KEY + 1}, this is node {NODE_KEY}"),
        (_foreign_format, "expected format 'fedsqueeze-node-state/1', found 'someone-else/9'"),
        (_not_json, "JSONDecodeError"),
    ],
)
def test_a_damaged_state_is_refused_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, damage: object, says: str
) -> None:
    save_node_state(tmp_path, _state(3))
    damage(tmp_path)  # type: ignore[operator]
    with caplog.at_level(logging.ERROR):
        assert load_node_state(tmp_path, 7, NODE_KEY, lambda v: True) is None
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "unusable" in errors[0] and says in errors[0], errors
    save_node_state(tmp_path, _state(4))  # the node goes on, and its next save replaces the damaged state
    again = load_node_state(tmp_path, 7, NODE_KEY, lambda v: v == 4)
    assert again is not None and _same(again.reference, global_model())


# ---------------------------------------------------------------- through the compression mod
def test_a_state_of_another_architecture_is_not_reused(tmp_path: Path) -> None:
    """After a broadcast-compact switch the versions count from the student: the teacher's files must go."""
    save_node_state(tmp_path, _state(1))
    save_node_state(tmp_path, _state(2))
    # the same tensor names as the teacher's (a student pruned but not factored keeps them)
    student = NodeState(7, NODE_KEY, 1, global_model(5), UPLINK, arch="lenet5/mnist:compact(prune=0.5)")
    save_node_state(tmp_path, student)
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["reference-1.npz"]  # not the teacher's version 2
    loaded = load_node_state(tmp_path, 7, NODE_KEY, lambda v: True)
    assert loaded is not None and loaded.arch == student.arch and _same(loaded.reference, student.reference)


def _node_contexts(state_dirs: dict[int, Path]) -> dict[int, Context]:
    return {
        n: Context(
            run_id=7,
            node_id=n,
            node_config={STATE_DIR_KEY: str(state_dirs[n])} if n in state_dirs else {},
            state=RecordDict(),
            run_config={},
        )
        for n in NODES
    }


class Federation:
    """A strategy and three nodes running the test ClientApp; rounds with a chosen sample of nodes."""

    def __init__(self, state_dirs: dict[int, Path]) -> None:
        self.state_dirs = state_dirs
        self.app, self.ctx = make_client(), _node_contexts(state_dirs)
        self.strategy = CompressedStrategy(FedAvg(), uplink=UPLINK, downlink="quantize(bits=8) | zstd")
        self.arrays = tensors_to_arrays(global_model())

    def round(self, server_round: int, sampled: list[int]) -> dict[int, Downlink]:
        messages = list(self.strategy.configure_train(server_round, self.arrays, ConfigRecord(), FakeGrid(sampled)))
        sent = {m.metadata.dst_node_id: Downlink.from_record(m.content[PAYLOAD_KEY]) for m in messages}
        new, _ = self.strategy.aggregate_train(
            server_round, [self.app(m, self.ctx[m.metadata.dst_node_id]) for m in messages]
        )
        assert new is not None
        self.arrays = new
        return sent

    def restart(self, node: int) -> None:
        """The node's process dies and starts again: its context.state is empty."""
        self.ctx[node] = _node_contexts(self.state_dirs)[node]


def test_a_restarted_node_with_a_state_dir_catches_up_with_a_delta(tmp_path: Path) -> None:
    fed = Federation({RESTARTED: tmp_path / "node"})
    assert {p.kind for p in fed.round(1, NODES).values()} == {FULL}
    fed.round(2, NODES)
    fed.restart(RESTARTED)
    fed.round(3, [101, 103])  # down while it restarts
    sent = fed.round(4, NODES)[RESTARTED]
    assert sent.kind == DELTA and sent.base == 2 and sent.version == 4
    assert fed.strategy.rejections == []  # it applied the catch-up to the model it saved
    reference = fed.strategy.downlink_state.reference
    held = arrays_to_tensors(fed.ctx[RESTARTED].state[STATE_REFERENCE])  # type: ignore[arg-type]
    assert reference is not None and all(torch.allclose(held[k], reference[k], atol=0.05) for k in held)
    assert STATE_FEEDBACK in fed.ctx[RESTARTED].state  # the residual came back too
    assert fed.ctx[RESTARTED].state[STATE_META]["version"] == 4  # type: ignore[index]


def test_without_a_state_dir_a_restarted_node_holds_nothing_and_writes_nothing(tmp_path: Path) -> None:
    fed = Federation({})
    fed.round(1, NODES)
    fed.restart(RESTARTED)
    fed.round(2, NODES)
    assert [(r.round, r.node_id) for r in fed.strategy.rejections] == [(2, RESTARTED)]
    assert "holds none" in fed.strategy.rejections[0].reason
    assert fed.round(3, NODES)[RESTARTED].kind == FULL
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_state_dir_makes_the_node_hold_nothing_not_crash(tmp_path: Path) -> None:
    fed = Federation({RESTARTED: tmp_path})
    fed.round(1, NODES)
    fed.restart(RESTARTED)
    _foreign_format(tmp_path)
    fed.round(2, NODES)  # it answers "holds none", as without a state dir
    assert [(r.round, r.node_id) for r in fed.strategy.rejections] == [(2, RESTARTED)]
    assert fed.round(3, NODES)[RESTARTED].kind == FULL and len(fed.strategy.rejections) == 1
    assert json.loads((tmp_path / MANIFEST).read_text())["versions"][-1]["version"] == 3
