"""fedsqueeze's ClientApp: plain local training and evaluation, compressed by :func:`compression_mod`."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsqueeze.client.mod import compression_mod
from fedsqueeze.data import client_data, load_dataset
from fedsqueeze.models import build_model
from fedsqueeze.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    TRAIN_TIME_METRIC,
    arrays_to_tensors,
    proxy_holdout,
    resolve_run_config,
    tensors_to_arrays,
)
from fedsqueeze.training import evaluate as evaluate_model
from fedsqueeze.training import get_weights, set_weights
from fedsqueeze.training import train as train_model

__all__ = ["app"]

app = ClientApp(mods=[compression_mod])


def _partition(context: Context) -> tuple[int, int]:
    """This node's partition from its node config (set by the simulation or ``--node-config``)."""
    node_config = context.node_config
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            "the node config needs 'partition-id' and 'num-partitions' (the simulation engine sets them; "
            f"for a SuperNode pass --node-config \"partition-id=0 num-partitions=10\"), got {dict(node_config)}"
        )
    return int(node_config["partition-id"]), int(node_config["num-partitions"])


def _setting(config: ConfigRecord, run: dict, key: str) -> bool | int | float | str:
    """A training setting from the server's train config, else from the run config."""
    return config[key] if key in config else run[key]  # type: ignore[return-value]


def _model_from(msg: Message, run: dict) -> torch.nn.Module:
    model = build_model(str(run["model"]), str(run["dataset"]))
    arrays = msg.content[ARRAYS_KEY]
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"the message's {ARRAYS_KEY!r} record must be an ArrayRecord, found {type(arrays).__name__}")
    set_weights(model, arrays_to_tensors(arrays))
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition and reply with the local model."""
    torch.set_num_threads(1)
    run = resolve_run_config(context.run_config)
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    partition_id, num_partitions = _partition(context)
    max_samples = int(run["max-samples-per-client"])
    x, y = client_data(
        str(run["dataset"]),
        partition_id,
        num_partitions,
        partitioner=str(run["partitioner"]),
        alpha=float(run["dirichlet-alpha"]),
        classes_per_partition=int(run["classes-per-partition"]),
        seed=int(run["seed"]),
        max_samples=max_samples if max_samples > 0 else None,
        holdout=proxy_holdout(run),  # the server's distillation proxy images: never on a node
        data_dir=str(run["data-dir"]) or None,
    )
    model = _model_from(msg, run)
    server_round = int(config.get("server-round", 0))  # type: ignore[arg-type]
    start = time.perf_counter()
    loss = train_model(
        model,
        x,
        y,
        epochs=int(_setting(config, run, "local-epochs")),
        batch_size=int(_setting(config, run, "batch-size")),
        lr=float(_setting(config, run, "lr")),
        momentum=float(_setting(config, run, "momentum")),
        seed=int(run["seed"]) * 1_000_003 + server_round * 1_009 + partition_id,
        proximal_mu=float(config.get("proximal-mu", 0.0)),  # type: ignore[arg-type]
    )
    content = RecordDict(
        {
            ARRAYS_KEY: tensors_to_arrays(get_weights(model)),
            METRICS_KEY: MetricRecord(
                {"num-examples": len(x), "train-loss": loss, TRAIN_TIME_METRIC: time.perf_counter() - start}
            ),
        }
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's share of the test set (an even split)."""
    torch.set_num_threads(1)
    run = resolve_run_config(context.run_config)
    partition_id, num_partitions = _partition(context)
    data = load_dataset(str(run["dataset"]), str(run["data-dir"]) or None)
    x, y = data.x_test[partition_id::num_partitions], data.y_test[partition_id::num_partitions]
    model = _model_from(msg, run)
    loss, accuracy = evaluate_model(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-acc": accuracy})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)
