"""fedsqueeze's ClientApp: plain local training and evaluation, compressed by :func:`compression_mod`."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsqueeze.client.mod import ARCH_CONFIG_KEY, CompressionMod
from fedsqueeze.compact_arch import parse_arch
from fedsqueeze.config import RunConfig
from fedsqueeze.data import client_data_of_run, load_dataset
from fedsqueeze.data.partition_file import partition_meta, read_partition_file
from fedsqueeze.models import build_model, first_model
from fedsqueeze.protocol import (
    ARRAYS_KEY,
    CONFIG_KEY,
    METRICS_KEY,
    TRAIN_TIME_METRIC,
    arrays_to_tensors,
    tensors_to_arrays,
)
from fedsqueeze.training import evaluate as evaluate_model
from fedsqueeze.training import get_weights, set_weights
from fedsqueeze.training import train as train_model

__all__ = ["app", "first_model_of", "query", "DATA_FILE_KEY"]

#: Node-config key of a file holding this node's share of the data (see :mod:`fedsqueeze.data.partition_file`).
DATA_FILE_KEY = "data-file"


def first_model_of(context: Context) -> dict[str, torch.Tensor]:
    """The run's first model, built here from the run config's seed (the server checks its digest)."""
    run = RunConfig.from_mapping(context.run_config)
    return first_model(run.model, run.dataset, run.seed)


app = ClientApp(mods=[CompressionMod(initial_model=first_model_of)])


def _partition(context: Context) -> tuple[int, int]:
    """This node's partition from its node config (set by the simulation or ``--node-config``)."""
    node_config = context.node_config
    if "partition-id" not in node_config or "num-partitions" not in node_config:
        raise ValueError(
            "the node config needs 'partition-id' and 'num-partitions' (the simulation engine sets them; "
            f'for a SuperNode pass --node-config "partition-id=0 num-partitions=10"), got {dict(node_config)}'
        )
    return int(node_config["partition-id"]), int(node_config["num-partitions"])


def _own_data_file(
    context: Context, run: RunConfig, partition_id: int, num_partitions: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """This node's share from the file its node config names (``data-file``), checked against the run."""
    expected = partition_meta(run, partition_id, num_partitions, run.proxy_holdout())
    return read_partition_file(str(context.node_config[DATA_FILE_KEY]), expected)


def _setting(config: ConfigRecord, run: RunConfig, key: str) -> bool | int | float | str:
    """A training setting from the server's train config, else from the run config."""
    return config[key] if key in config else run[key]  # type: ignore[return-value]


def _empty_model(msg: Message, run: RunConfig) -> torch.nn.Module:
    """The run's model, or the compact student that the message's config names (``model-arch``)."""
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    arch_text = config.get(ARCH_CONFIG_KEY, "")
    if not arch_text:
        return build_model(run.model, run.dataset)
    arch = parse_arch(arch_text)  # type: ignore[arg-type]  # parse_arch refuses anything but a string
    if (arch.model, arch.dataset) != (run.model, run.dataset):
        raise ValueError(
            f"the server sent a student of {arch.model}/{arch.dataset}, but this run trains {run.model}/{run.dataset}"
        )
    return arch.build()


def _model_from(msg: Message, run: RunConfig) -> torch.nn.Module:
    model = _empty_model(msg, run)
    arrays = msg.content[ARRAYS_KEY]
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"the message's {ARRAYS_KEY!r} record must be an ArrayRecord, found {type(arrays).__name__}")
    set_weights(model, arrays_to_tensors(arrays))
    return model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition and reply with the local model."""
    torch.set_num_threads(1)
    run = RunConfig.from_mapping(context.run_config)
    config = msg.content.config_records.get(CONFIG_KEY, ConfigRecord())
    partition_id, num_partitions = _partition(context)
    if DATA_FILE_KEY in context.node_config:  # an edge node with its own share (no partitioning here)
        x, y = _own_data_file(context, run, partition_id, num_partitions)[:2]
    else:
        x, y = client_data_of_run(run, partition_id, num_partitions)
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
        seed=run.seed * 1_000_003 + server_round * 1_009 + partition_id,
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
    run = RunConfig.from_mapping(context.run_config)
    partition_id, num_partitions = _partition(context)
    if DATA_FILE_KEY in context.node_config:
        x, y = _own_data_file(context, run, partition_id, num_partitions)[2:]
    else:
        data = load_dataset(run.dataset, run.data_dir or None)
        x, y = data.x_test[partition_id::num_partitions], data.y_test[partition_id::num_partitions]
    model = _model_from(msg, run)
    loss, accuracy = evaluate_model(model, x, y)
    metrics = MetricRecord({"num-examples": len(x), "eval-loss": loss, "eval-acc": accuracy})
    return Message(RecordDict({METRICS_KEY: metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Queries: the compression mod answers the server's one-time stable-key query before this runs.

    Flower calls mods only for message types that have a handler, so the handler must exist;
    any other query gets an error reply.
    """
    return Message(Error(0, "fedsqueeze's ClientApp answers no queries but the compression mod's"), reply_to=msg)
