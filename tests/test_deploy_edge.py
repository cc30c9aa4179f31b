"""The SuperNode side runs without the server, the simulation, Ray, matplotlib or Flower Datasets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.deployment import REPO_ROOT, load_deploy_script

from fedsqueeze.config import RunConfig
from fedsqueeze.data.partition_file import partition_meta, read_partition_file, write_partition_file

#: What an edge node need not install or import.
FORBIDDEN = (
    "fedsqueeze.server",
    "fedsqueeze.simulation",
    "ray",
    "matplotlib",
    "flwr_datasets",
    "datasets",
    "torchvision",
    "pandas",
    "pyarrow",
)

# Runs in a fresh interpreter: train one round on a partition file, then list what got imported. (A finder
# that refuses imports cannot be used: torch probes optional packages with find_spec and breaks on it.)
EDGE_SCRIPT = """
import json, sys
FORBIDDEN = {forbidden!r}
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
import fedsqueeze.client.app as client_app
from fedsqueeze.client import compression_mod
from fedsqueeze.models import first_model
from fedsqueeze.protocol import tensors_to_arrays
TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
run_config = json.loads({run_config!r})
node_config = {{"data-file": {data_file!r}, "partition-id": 1, "num-partitions": 2}}
context = Context(run_id=7, node_id=5, node_config=node_config, state=RecordDict(), run_config=run_config)
content = RecordDict({{"arrays": tensors_to_arrays(first_model("lenet5", "mnist", 0)),
                      "config": ConfigRecord({{"server-round": 1, "local-epochs": 1}})}})
msg = Message(content, dst_node_id=5, message_type="train")
reply = client_app.train(msg, context)
loaded = sorted(m for m in sys.modules if m == "fedsqueeze.client.mod" or m.startswith(FORBIDDEN))
print(json.dumps({{"num_examples": reply.content["metrics"]["num-examples"], "modules": loaded}}))
"""


def _cut(tmp_path: Path, run: RunConfig) -> Path:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(12, 1, 28, 28, generator=g), torch.randint(0, 10, (12,), generator=g)
    meta = partition_meta(run, 1, 2, run.proxy_holdout())
    return write_partition_file(tmp_path / "p.npz", meta, x, y, x[:4], y[:4])


def test_a_partition_file_round_trips_and_refuses_other_settings(tmp_path: Path) -> None:
    run = RunConfig(max_samples_per_client=12)
    path = _cut(tmp_path, run)
    x, y, x_test, y_test = read_partition_file(path, partition_meta(run, 1, 2, 0))
    assert x.shape == (12, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64 and len(x_test) == 4
    with pytest.raises(ValueError, match=r"seed: expected 3, found 0.*partition-id: expected 0, found 1"):
        read_partition_file(path, partition_meta(RunConfig(max_samples_per_client=12, seed=3), 0, 2, 0))


def test_the_supernode_side_trains_from_its_file_without_server_simulation_or_heavy_packages(tmp_path: Path) -> None:
    run = RunConfig(max_samples_per_client=12, batch_size=4)
    path = _cut(tmp_path, run)
    script = EDGE_SCRIPT.format(forbidden=FORBIDDEN, run_config=json.dumps(run.as_dict()), data_file=str(path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["num_examples"] == 12
    assert not [m for m in result["modules"] if m.startswith(FORBIDDEN)], result["modules"]
    assert "fedsqueeze.client.mod" in result["modules"]


def test_make_partitions_gives_each_node_exactly_its_client_data(tmp_path: Path, mnist_path: Path) -> None:
    from fedsqueeze.data import client_data

    spec = __import__("importlib.util").util.spec_from_file_location(
        "make_partitions", REPO_ROOT / "deploy" / "make_partitions.py"
    )
    module = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(module)
    run = module.run_config(f'max-samples-per-client=50 data-dir="{mnist_path}"')
    paths = module.make_partitions(run, 2, tmp_path)
    x, y, _, _ = read_partition_file(paths[1], partition_meta(run, 1, 2, 0))
    want_x, want_y = client_data("mnist", 1, 2, seed=run.seed, max_samples=50, data_dir=mnist_path)
    assert torch.equal(x, want_x) and torch.equal(y, want_y)


def test_deploy_script_is_loadable() -> None:
    assert load_deploy_script().DeploySettings(workdir=Path("."), app_dir=Path(".")).address == "127.0.0.1:9500"
