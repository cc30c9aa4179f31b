"""fedsqueeze's ServerApp: any Flower strategy wrapped in CompressedStrategy, evaluated centrally, optionally distilled."""

from __future__ import annotations

from collections.abc import Mapping
from logging import INFO
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import (
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedMedian,
    FedProx,
    FedTrimmedAvg,
    FedYogi,
    Krum,
    Strategy,
)
from flwr.supercore import log

from fedsqueeze.data import load_dataset
from fedsqueeze.models import build_model
from fedsqueeze.protocol import arrays_to_tensors, proxy_holdout, resolve_run_config, tensors_to_arrays
from fedsqueeze.server.server_distiller import ServerDistiller
from fedsqueeze.server.results import ResultsWriter
from fedsqueeze.server.strategy import CompressedStrategy
from fedsqueeze.training import evaluate, get_weights, set_weights

__all__ = ["app", "STRATEGIES", "make_strategy"]

#: Values of the run-config key ``strategy`` and the Flower strategies they name.
STRATEGIES: dict[str, type[Strategy]] = {
    "fedavg": FedAvg,
    "fedprox": FedProx,
    "fedavgm": FedAvgM,
    "fedadam": FedAdam,
    "fedyogi": FedYogi,
    "fedadagrad": FedAdagrad,
    "fedmedian": FedMedian,
    "fedtrimmedavg": FedTrimmedAvg,
    "krum": Krum,
}

app = ServerApp()


def make_strategy(run: Mapping[str, Any]) -> Strategy:
    """Build the inner Flower strategy that the run config names.

    Parameters
    ----------
    run : Mapping[str, Any]
        Resolved run config; reads ``strategy``, ``fraction-train``, ``fraction-evaluate``,
        ``min-train-nodes``, ``proximal-mu`` (fedprox) and ``server-lr`` (fedadam,
        fedyogi, fedadagrad: ``eta``; fedavgm: ``server_learning_rate``; 0 keeps Flower's
        default).

    Raises
    ------
    ValueError
        If the strategy name is unknown.
    """
    name = str(run["strategy"]).lower()
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {run['strategy']!r}; expected one of {', '.join(STRATEGIES)}")
    min_nodes = int(run["min-train-nodes"])
    kwargs: dict[str, Any] = {
        "fraction_train": float(run["fraction-train"]),
        "fraction_evaluate": float(run["fraction-evaluate"]),
        "min_train_nodes": min_nodes,
        "min_evaluate_nodes": min_nodes,
        "min_available_nodes": min_nodes,
    }
    server_lr = float(run["server-lr"])
    if name == "fedprox":
        kwargs["proximal_mu"] = float(run["proximal-mu"])
    elif name in ("fedadam", "fedyogi", "fedadagrad") and server_lr > 0:
        kwargs["eta"] = server_lr
    elif name == "fedavgm" and server_lr > 0:
        kwargs["server_learning_rate"] = server_lr
    return STRATEGIES[name](**kwargs)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training with compressed updates and write the results.

    With ``distill-every`` > 0 the server also distils the aggregated global model into a
    compact student after every ``distill-every``-th round and after the last one (see
    :class:`~fedsqueeze.server.compaction.ServerDistiller`), on ``proxy-size`` training images
    that the clients leave out, and at the end exports the last student and the final global
    model to ``<results-dir>/compact/`` and writes ``compact.json`` and ``distill.csv``.
    """
    run = resolve_run_config(context.run_config)
    torch.set_num_threads(1)  # in a simulation the server shares the CPUs with the nodes' actors
    seed = int(run["seed"])
    torch.manual_seed(seed)
    model = build_model(str(run["model"]), str(run["dataset"]))
    initial = tensors_to_arrays(get_weights(model))
    data = load_dataset(str(run["dataset"]), str(run["data-dir"]) or None)
    distiller = (
        ServerDistiller(run, data, lambda: build_model(str(run["model"]), str(run["dataset"])))
        if proxy_holdout(run) > 0
        else None
    )

    strategy = CompressedStrategy(
        make_strategy(run),
        uplink=str(run["uplink-codec"]),
        downlink=str(run["downlink-codec"]),
        start_from_zero=bool(run["start-from-zero"]),
        error_feedback=bool(run["error-feedback"]),
        seed=seed,
        keep_client_models=distiller is not None and distiller.ensemble,
    )
    results = ResultsWriter(str(run["results-dir"]), run)
    log(INFO, "fedsqueeze: %s", strategy)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        set_weights(model, arrays_to_tensors(arrays))
        loss, accuracy = evaluate(model, data.x_test, data.y_test)
        if server_round == 0:
            results.log_initial(accuracy, loss)
            results.start_clock()
        else:
            traffic = [t for t in strategy.traffic if t.round == server_round]
            replies = sum(1 for t in traffic if t.direction == "up" and t.message_type == "train")
            rejected = sum(1 for r in strategy.rejections if r.round == server_round)
            results.log_round(server_round, accuracy, loss, traffic, replies, rejected,
                              strategy.client_seconds.get(server_round, (0.0, 0.0)))
            if distiller is not None and distiller.due(server_round):
                row = distiller.distill_round(server_round, model, strategy.client_models, accuracy)
                results.log_distillation(row)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    train_config = ConfigRecord({key: run[key] for key in ("local-epochs", "batch-size", "lr", "momentum")})
    strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=int(run["num-server-rounds"]),
        train_config=train_config,
        evaluate_fn=evaluate_global,
    )
    extra: dict[str, Any] = {}
    if distiller is not None and distiller.student is not None:
        extra["compact"] = distiller.export(results.dir)
        results.write_compact(extra["compact"])
    results.write_summary(
        strategy.rejections,
        uplink_codec=strategy.uplink.spec,
        downlink_codec=strategy.downlink.spec,
        **extra,
    )
