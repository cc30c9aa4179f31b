"""fedsqueeze's ServerApp: any Flower strategy in CompressedStrategy, evaluated centrally, distilled on demand."""

from __future__ import annotations

from dataclasses import asdict
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

from fedsqueeze.compact_arch import parse_arch
from fedsqueeze.config import RunConfig
from fedsqueeze.data import load_dataset
from fedsqueeze.models import build_model, first_model
from fedsqueeze.protocol import arrays_to_tensors, tensors_to_arrays
from fedsqueeze.server.checkpoint import Checkpoint, RoundOffset, load_checkpoint, save_checkpoint
from fedsqueeze.server.results import ResultsWriter
from fedsqueeze.server.server_distiller import ServerDistiller
from fedsqueeze.server.strategy import UP, CompressedStrategy
from fedsqueeze.training import evaluate, set_weights

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


def make_strategy(run: RunConfig) -> Strategy:
    """Build the inner Flower strategy that the run config names.

    It reads ``strategy``, ``fraction-train``, ``fraction-evaluate``, ``min-train-nodes``,
    ``proximal-mu`` (fedprox) and ``server-lr`` (fedadam, fedyogi, fedadagrad: ``eta``;
    fedavgm: ``server_learning_rate``; 0 keeps Flower's default) and ``server-momentum`` (fedavgm).

    Raises
    ------
    ValueError
        If the strategy name is unknown.
    """
    name = run.strategy.lower()
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {run.strategy!r}; expected one of {', '.join(STRATEGIES)}")
    kwargs: dict[str, Any] = {
        "fraction_train": run.fraction_train,
        "fraction_evaluate": run.fraction_evaluate,
        "min_train_nodes": run.min_train_nodes,
        "min_evaluate_nodes": run.min_train_nodes,
        "min_available_nodes": run.min_train_nodes,
    }
    if name == "fedprox":
        kwargs["proximal_mu"] = run.proximal_mu
    elif name in ("fedadam", "fedyogi", "fedadagrad") and run.server_lr > 0:
        kwargs["eta"] = run.server_lr
    elif name == "fedavgm":
        kwargs["server_momentum"] = run.server_momentum
        if run.server_lr > 0:
            kwargs["server_learning_rate"] = run.server_lr
    return STRATEGIES[name](**kwargs)


def make_compressed_strategy(run: RunConfig, keep_client_models: bool = False) -> CompressedStrategy:
    """The inner strategy of :func:`make_strategy` wrapped with the run's codecs and settings."""
    return CompressedStrategy(
        make_strategy(run),
        uplink=run.uplink_codec,
        downlink=run.downlink_codec,
        initial={"seeded": "shared", "zeros": "zeros", "sent": "sent"}[run.initial_model],
        error_feedback=run.error_feedback,
        max_feedback_staleness=run.max_feedback_staleness,
        catchup_delta=run.catchup_codec or None,
        catchup_memory_bytes=int(run.catchup_memory_mb * 2**20),
        seed=run.seed,
        keep_client_models=keep_client_models,
        uplink_warmup_rounds=run.uplink_warmup_rounds,
        max_update_norm_ratio=run.max_update_norm_ratio,
    )


def _resumed(run: RunConfig, distiller: ServerDistiller | None) -> Checkpoint | None:
    """With ``resume = true``: the killed run's checkpoint in ``results-dir``, its files rewritten to match it.

    Raises
    ------
    ValueError
        If distillation is on (its state is not checkpointed), or see :func:`load_checkpoint`.
    """
    if not run.resume:
        return None
    if distiller is not None:
        raise ValueError("resume = true does not support server-side distillation (distill-every > 0)")
    checkpoint = load_checkpoint(run.results_dir, run.as_dict())
    checkpoint.results.resume_files()
    log(INFO, "fedsqueeze: resuming after round %d from %s", checkpoint.round, run.results_dir)
    return checkpoint


def _distil_or_adopt(
    run: RunConfig,
    distiller: ServerDistiller,
    strategy: CompressedStrategy,
    server_round: int,
    model: torch.nn.Module,
    accuracy: float,
    results: ResultsWriter,
) -> torch.nn.Module:
    """Distil the global ``model`` (or, after a model switch, adopt it as the student); return the global model.

    With ``broadcast-compact`` the first distillation before the last round switches the federated
    model to the FP32 student: the returned model is then an empty student built from its
    architecture string (the one nodes build), which evaluates the global model from then on, and
    the nodes train it with ``broadcast-compact-lr``.
    """
    if strategy.arch:
        results.log_distillation(distiller.adopt_round(server_round, model, accuracy))
        return model
    results.log_distillation(distiller.distill_round(server_round, model, strategy.client_models, accuracy))
    if not run.broadcast_compact or server_round >= run.num_server_rounds:
        return model
    weights, arch = distiller.switch_weights(server_round)
    strategy.switch_model(weights, arch, {"lr": run.broadcast_compact_lr})
    return parse_arch(arch).build().eval()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run federated training with compressed updates and write the results.

    With ``distill-every`` > 0 the server also distils the aggregated global model into a
    compact student after every ``distill-every``-th round and after the last one (see
    :class:`~fedsqueeze.server.server_distiller.ServerDistiller`), on ``proxy-size`` training images
    that the clients leave out, and at the end exports the last student and the final global
    model to ``<results-dir>/compact/`` and writes ``compact.json`` and ``distill.csv``. With
    ``broadcast-compact`` the first distilled student (before the last round) becomes the model
    that is broadcast and trained from the next round on (see :func:`_distil_or_adopt`).
    """
    run = RunConfig.from_mapping(context.run_config)
    torch.set_num_threads(1)  # in a simulation the server shares the CPUs with the nodes' actors
    torch.manual_seed(run.seed)
    model = build_model(run.model, run.dataset)
    initial = first_model(run.model, run.dataset, run.seed)
    data = load_dataset(run.dataset, run.data_dir or None)
    distiller = (
        ServerDistiller(run, data, lambda: build_model(run.model, run.dataset)) if run.proxy_holdout() > 0 else None
    )
    checkpoint = _resumed(run, distiller)
    if checkpoint is None:
        strategy = make_compressed_strategy(run, keep_client_models=distiller is not None and distiller.ensemble)
        results = ResultsWriter(run.results_dir, run.as_dict())
    else:
        strategy, results, initial_arrays = checkpoint.strategy, checkpoint.results, checkpoint.arrays
    done = checkpoint.round if checkpoint is not None else 0  # rounds a killed run completed
    log(INFO, "fedsqueeze: %s", strategy)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        nonlocal model
        server_round += done if server_round > 0 else 0  # Flower counts a resumed run's rounds from 1
        set_weights(model, arrays_to_tensors(arrays))
        loss, accuracy = evaluate(model, data.x_test, data.y_test)
        if server_round == 0 and done == 0:
            results.log_initial(accuracy, loss)
            results.start_clock()
        elif server_round > 0:  # (a resumed run's round 0 is the checkpoint's model: logged already)
            traffic = [t for t in strategy.traffic if t.round == server_round]
            replies = sum(1 for t in traffic if t.direction == UP and t.message_type == "train")
            rejected = sum(1 for r in strategy.rejections if r.round == server_round)
            results.log_round(
                server_round,
                accuracy,
                loss,
                traffic,
                replies,
                rejected,
                strategy.client_seconds.get(server_round, (0.0, 0.0)),
                strategy.downlink_state.lag,
            )
            if distiller is not None and distiller.due(server_round):
                model = _distil_or_adopt(run, distiller, strategy, server_round, model, accuracy, results)
            save_checkpoint(server_round, arrays, strategy, results)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    train_config = ConfigRecord({key: run[key] for key in ("local-epochs", "batch-size", "lr", "momentum")})
    RoundOffset(strategy, done).start(
        grid=grid,
        initial_arrays=tensors_to_arrays(initial) if checkpoint is None else initial_arrays,
        num_rounds=max(run.num_server_rounds - done, 0),
        timeout=run.round_timeout,
        train_config=train_config,
        evaluate_fn=evaluate_global,
    )
    extra: dict[str, Any] = {}
    if distiller is not None and distiller.student is not None:
        extra["compact"] = distiller.export(results.dir)
        results.write_compact(extra["compact"])
    results.write_summary(
        strategy.rejections,
        guard_events=[asdict(g) for g in strategy.guard_events],
        uplink_codec=strategy.uplink.spec,
        downlink_codec=strategy.downlink.spec,
        **extra,
    )
