"""Turn a sweep's results.csv into plots (PNG), a markdown table per setting, and report.json.

Scoring rules
-------------
* A *setting* is everything that defines a run apart from its codec and its seed: the federation keys
  (``FEDERATION_KEYS``) and every run-config key that takes several values among the cells of one codec
  label (a grid axis such as ``lr`` or ``momentum``). A key a codec entry sets for itself alone (e.g.
  ``error-feedback = false``) belongs to the codec, not to the setting.
* Accuracy oscillates from round to round under partial participation, so each run is scored by the
  mean accuracy of its last ``LAST_ROUNDS`` rounds ("last-5 mean") beside its final round; gaps to FP32
  compare a run with the FP32 run of the same setting and seed over the same rounds.
* A cell is *ok* when its final loss is finite and no reply of any round was rejected.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["CodecSummary", "summarize", "write_report", "pareto_front", "load_rows", "setting_keys", "LAST_ROUNDS"]

#: Rounds averaged at the end of each run ("last-5 mean").
LAST_ROUNDS = 5
FP32_SPEC = "identity"
#: Prefix of the columns ``load_rows`` adds to each row: the cell's resolved run config.
CONFIG_PREFIX = "config."
#: Keys that define the federation itself: they split settings even when only a codec entry sets them.
FEDERATION_KEYS = (
    "model",
    "dataset",
    "partitioner",
    "num-supernodes",
    "num-server-rounds",
    "dirichlet-alpha",
    "classes-per-partition",
    "max-samples-per-client",
    "fraction-train",
)
#: Run-config keys that never define a setting: the codec pair, the seed, and local paths.
_NOT_SETTING = frozenset({"seed", "uplink-codec", "downlink-codec", "results-dir", "data-dir"})
#: Columns of results.csv that stand in for config keys when a row carries no config.
_COLUMN_KEYS = {
    "model": "model",
    "dataset": "dataset",
    "partitioner": "partitioner",
    "num_supernodes": "num-supernodes",
}
_LABEL_KEYS = ("model", "dataset", "partitioner", "num-supernodes")

Run = list[dict[str, str]]


@dataclass
class CodecSummary:
    """One codec in one setting, aggregated over its seeds (mean, and std over seeds where several).

    Accuracies are fractions; gaps are percentage points (codec minus FP32, per seed, then averaged).
    ``last5_*`` fields average each run's last ``last_rounds`` rounds first; ``final_*`` fields use the
    last round alone. ``ok`` is False when a cell ended with a non-finite loss or had rejected replies
    (``problem_cells`` names them), None when the table has no ``rejected`` column.
    """

    setting: str
    codec: str
    uplink_codec: str
    downlink_codec: str
    seeds: int
    rounds: int
    last_rounds: int
    final_accuracy: float
    final_accuracy_std: float
    last5_accuracy: float
    last5_accuracy_std: float
    gap_to_fp32_last5_points: float | None
    gap_to_fp32_final_points: float | None
    uplink_bytes: float
    downlink_bytes: float
    total_bytes: float
    uplink_ratio: float
    total_ratio: float
    uplink_bits_per_param: float | None
    uplink_payload_ratio: float | None
    target_accuracy: float | None
    uplink_bytes_to_target: float | None
    total_bytes_to_target: float | None
    seeds_reaching_target: int
    codec_time_share: float | None
    ok: bool | None
    rejected_replies: int | None
    problem_cells: list[str] = field(default_factory=list)
    setting_config: dict[str, str] = field(default_factory=dict)
    pareto: bool = False


def _f(row: Mapping[str, str], key: str) -> float:
    value = row.get(key, "")
    return float(value) if value not in ("", None) else math.nan


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.fmean(values) if values else math.nan


def _std(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _num_params(model: str, dataset: str) -> int | None:
    try:
        from fedsqueeze.models import build_model

        return sum(p.numel() for p in build_model(model, dataset or "mnist").state_dict().values())
    except Exception:  # unknown model: leave bits/param out
        return None


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points (bytes, accuracy) that no other point beats on both (fewer bytes, higher accuracy)."""
    front = []
    for i, (b, a) in enumerate(points):
        dominated = any((b2 <= b and a2 >= a) and (b2 < b or a2 > a) for j, (b2, a2) in enumerate(points) if j != i)
        if not dominated and not (math.isnan(b) or math.isnan(a)):
            front.append(i)
    return front


# ---------------------------------------------------------------- loading


def _json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _cell_configs(out: Path) -> dict[str, dict[str, Any]]:
    """Each cell's resolved run config: the run's own (summary.json) over the cell's, else grid.json's."""
    configs: dict[str, dict[str, Any]] = {}
    for cell in _json(out / "grid.json").get("cells", []):
        configs[cell["id"]] = {**cell.get("config", {}), "num-supernodes": cell.get("num_supernodes")}
    cells_dir = out / "cells"
    for cell_dir in sorted(cells_dir.iterdir()) if cells_dir.is_dir() else []:
        marker = _json(cell_dir / "cell.json")
        if not marker:
            continue
        resolved = _json(cell_dir / "summary.json").get("config", {})
        configs[cell_dir.name] = {
            **marker.get("config", {}),
            **resolved,
            "num-supernodes": marker.get("num_supernodes"),
        }
    return configs


def load_rows(out: Path, ignore_keys: Iterable[str] = ()) -> list[dict[str, str]]:
    """The rows of ``out/results.csv``, each with its cell's run config as ``config.<key>`` columns.

    results.csv holds only a few config keys; the full config comes from ``out/cells/<cell>/``
    (summary.json's resolved config over cell.json's) or, without cell folders, from ``out/grid.json``.
    Rows of a cell found in neither keep the results.csv columns alone. Keys in ``ignore_keys`` are
    left out, so they never split settings (e.g. a default that changed between cells of one sweep
    and cannot matter in it).
    """
    out = Path(out)
    with open(out / "results.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    configs = _cell_configs(out)
    ignored = set(ignore_keys)
    for row in rows:
        config = configs.get(row.get("cell", ""), {})
        row.update({CONFIG_PREFIX + k: "" if v is None else str(v) for k, v in config.items() if k not in ignored})
    return rows


def _runs(rows: list[dict[str, str]]) -> dict[str, Run]:
    runs: dict[str, Run] = defaultdict(list)
    for row in rows:
        runs[row["cell"]].append(row)
    for cell_rows in runs.values():
        cell_rows.sort(key=lambda r: int(r["round"]))
    return runs


# ---------------------------------------------------------------- settings


def _run_config(run: Run) -> dict[str, str]:
    """A run's config (kebab-case keys, string values): results.csv columns, overlaid by ``config.*``."""
    first = run[0]
    config = {key: first[col] for col, key in _COLUMN_KEYS.items() if col in first}
    config.update({k[len(CONFIG_PREFIX) :]: v for k, v in first.items() if k.startswith(CONFIG_PREFIX)})
    return {k: v for k, v in config.items() if k not in _NOT_SETTING}


def setting_keys(runs: Mapping[str, Run]) -> list[str]:
    """The config keys that define a setting: ``FEDERATION_KEYS`` present, then every grid axis.

    An axis is a key with several values among the runs of one codec label; seed, codec specs and
    paths never count.
    """
    values: dict[tuple[str, str], set[str]] = defaultdict(set)
    present: set[str] = set()
    for run in runs.values():
        for key, value in _run_config(run).items():
            values[(run[0]["codec"], key)].add(value)
            present.add(key)
    axes = sorted({key for (_, key), seen in values.items() if len(seen) > 1} - set(FEDERATION_KEYS))
    return [k for k in FEDERATION_KEYS if k in present] + axes


def _settings(runs: Mapping[str, Run]) -> dict[str, tuple[str, dict[str, str]]]:
    """Cell -> (setting label, setting config). The label names the usual keys, then any other that varies."""
    keys = setting_keys(runs)
    configs = {cell: _run_config(run) for cell, run in runs.items()}
    setting_of = {cell: {k: config.get(k, "") for k in keys} for cell, config in configs.items()}
    varying = [k for k in keys if len({s[k] for s in setting_of.values()}) > 1 and k not in _LABEL_KEYS]
    labels = {}
    for cell, setting in setting_of.items():
        base = [f"{setting[k]} clients" if k == "num-supernodes" else setting[k] for k in _LABEL_KEYS if setting.get(k)]
        extra = ", ".join(f"{k}={setting[k]}" for k in varying)
        labels[cell] = (" / ".join(base) or "all") + (f" · {extra}" if extra else "")
    return {cell: (labels[cell], setting_of[cell]) for cell in runs}


# ---------------------------------------------------------------- per-run numbers


def _window(run: Run) -> Run:
    return run[-LAST_ROUNDS:]


def _last_mean(run: Run) -> float:
    """Mean accuracy over the run's last ``LAST_ROUNDS`` rounds (all of them if it has fewer)."""
    return _mean([_f(r, "accuracy") for r in _window(run)])


def _gaps(run: Run, fp32: Run | None) -> tuple[float, float]:
    """(last-5 gap, final gap) in points against the FP32 run of the same seed, over the same rounds.

    NaN where the FP32 run lacks any of those rounds.
    """
    if fp32 is None:
        return math.nan, math.nan
    by_round = {r["round"]: _f(r, "accuracy") for r in fp32}
    window = [r["round"] for r in _window(run)]
    last = math.nan
    if all(k in by_round for k in window):
        last = 100 * (_last_mean(run) - _mean([by_round[k] for k in window]))
    final = math.nan
    if run[-1]["round"] in by_round:
        final = 100 * (_f(run[-1], "accuracy") - by_round[run[-1]["round"]])
    return last, final


def _problem(run: Run) -> str | None:
    """Why a run is not ok (non-finite final loss, rejected replies), or None when it is."""
    loss = _f(run[-1], "loss")
    rejected = sum(_f(r, "rejected") for r in run)
    reasons = []
    if not math.isfinite(loss):
        reasons.append(f"final loss {loss}")
    if rejected > 0:
        reasons.append(f"{rejected:.0f} rejected replies")
    return f"{run[0]['cell']} ({', '.join(reasons)})" if reasons else None


# ---------------------------------------------------------------- per-codec numbers


def _traffic(runs_: list[Run], n_params: int | None) -> dict[str, Any]:
    """Bytes (means over seeds), compression ratios, bits per parameter and the codec's share of client time."""

    def total(key: str) -> float:
        return _mean([sum(_f(x, key) for x in r) for r in runs_])

    up, down, up32, down32, replies = (
        total(k) for k in ("uplink_bytes", "downlink_bytes", "uplink_fp32_bytes", "downlink_fp32_bytes", "replies")
    )
    encode = [sum(_f(x, "client_encode_seconds") for x in r) for r in runs_]
    train = [sum(_f(x, "client_train_seconds") for x in r) for r in runs_]
    share = _mean([e / (e + t) for e, t in zip(encode, train, strict=True) if e + t > 0])
    bits = payload_ratio = None
    if n_params and replies > 0:
        bits = 8 * up / replies / n_params
        payload = total("uplink_payload_bytes")
        if payload > 0:  # codec blobs alone against 4 bytes per parameter per reply
            payload_ratio = 4 * n_params * replies / payload
    return {
        "uplink_bytes": up,
        "downlink_bytes": down,
        "total_bytes": up + down,
        "uplink_ratio": up32 / up,
        "total_ratio": (up32 + down32) / (up + down),
        "uplink_bits_per_param": bits,
        "uplink_payload_ratio": payload_ratio,
        "codec_time_share": None if math.isnan(share) else share,
    }


def _to_target(runs_: list[Run], target: float) -> dict[str, Any]:
    """Cumulative bytes at the first round whose accuracy reaches ``target``, averaged over the seeds that do."""
    up, total = [], []
    for r in runs_:
        hit = next((x for x in r if _f(x, "accuracy") >= target), None)
        if hit is not None:
            up.append(_f(hit, "cumulative_uplink_bytes"))
            total.append(_f(hit, "cumulative_bytes"))
    return {
        "target_accuracy": target,
        "uplink_bytes_to_target": _mean(up) if up else None,
        "total_bytes_to_target": _mean(total) if total else None,
        "seeds_reaching_target": len(up),
    }


def _accuracy(runs_: list[Run], fp32_by_seed: Mapping[str, Run]) -> dict[str, Any]:
    """Final and last-5 accuracies (mean, std over seeds) and the gaps to FP32 of the same seed."""
    finals = [_f(r[-1], "accuracy") for r in runs_]
    lasts = [_last_mean(r) for r in runs_]
    gaps = [_gaps(r, fp32_by_seed.get(r[0]["seed"])) for r in runs_]
    last_gaps = [g for g, _ in gaps if not math.isnan(g)]
    final_gaps = [g for _, g in gaps if not math.isnan(g)]
    return {
        "final_accuracy": _mean(finals),
        "final_accuracy_std": _std(finals),
        "last5_accuracy": _mean(lasts),
        "last5_accuracy_std": _std(lasts),
        "gap_to_fp32_last5_points": _mean(last_gaps) if last_gaps else None,
        "gap_to_fp32_final_points": _mean(final_gaps) if final_gaps else None,
    }


def _health(runs_: list[Run]) -> dict[str, Any]:
    """Whether every run ended with finite loss and no rejected replies (None: no ``rejected`` column)."""
    problems = [p for p in (_problem(r) for r in runs_) if p is not None]
    rejected = [sum(_f(x, "rejected") for x in r) for r in runs_]
    known = not any(math.isnan(v) for v in rejected)
    return {
        "ok": (not problems) if (known or problems) else None,
        "rejected_replies": int(sum(rejected)) if known else None,
        "problem_cells": problems,
    }


def _is_fp32(run: Run) -> bool:
    return run[0]["uplink_codec"] == FP32_SPEC and run[0]["downlink_codec"] == FP32_SPEC


def _summarize_setting(
    setting: str, config: dict[str, str], codecs: Mapping[str, list[Run]], target: float | None
) -> list[CodecSummary]:
    """Summaries of every codec of one setting, the Pareto frontier (uplink bytes, last-5 mean) marked."""
    baseline = next((runs_ for runs_ in codecs.values() if _is_fp32(runs_[0])), None)
    fp32_by_seed = {r[0]["seed"]: r for r in baseline} if baseline else {}
    if target is None:  # FP32's last-5 mean minus a point, else the best codec's
        lasts = {name: _mean([_last_mean(r) for r in runs_]) for name, runs_ in codecs.items()}
        target = (_mean([_last_mean(r) for r in baseline]) if baseline else max(lasts.values())) - 0.01
    first = next(iter(codecs.values()))[0][0]
    n_params = _num_params(first["model"], first["dataset"])
    summaries = []
    for name, runs_ in codecs.items():
        rounds = int(runs_[0][-1]["round"])
        summaries.append(
            CodecSummary(
                setting=setting,
                codec=name,
                setting_config=dict(config),
                uplink_codec=runs_[0][0]["uplink_codec"],
                downlink_codec=runs_[0][0]["downlink_codec"],
                seeds=len(runs_),
                rounds=rounds,
                last_rounds=min(len(r[-LAST_ROUNDS:]) for r in runs_),
                **_accuracy(runs_, fp32_by_seed),
                **_traffic(runs_, n_params),
                **_to_target(runs_, target),
                **_health(runs_),
            )
        )
    for i in pareto_front([(s.uplink_bytes, s.last5_accuracy) for s in summaries]):
        summaries[i].pareto = True
    return summaries


def _group(rows: list[dict[str, str]]) -> dict[str, tuple[dict[str, str], dict[str, list[Run]]]]:
    """Setting label -> (setting config, codec label -> its runs, one per seed), in table order."""
    runs = _runs(rows)
    settings = _settings(runs)
    groups: dict[str, tuple[dict[str, str], dict[str, list[Run]]]] = {}
    for cell, run in runs.items():
        label, config = settings[cell]
        groups.setdefault(label, (config, defaultdict(list)))[1][run[0]["codec"]].append(run)
    return groups


def summarize(rows: list[dict[str, str]], target: float | None = None) -> list[CodecSummary]:
    """Aggregate the results table per (setting, codec); see the module docstring for the rules.

    ``rows`` are results.csv rows, best read with ``load_rows`` so that each carries its cell's full
    run config (settings then tell every grid axis apart). ``target`` is the accuracy whose
    bytes-to-reach are reported; ``None`` uses, in each setting, the FP32 baseline's mean last-5
    accuracy minus one point (or the best codec's if there is no FP32 baseline).
    """
    summaries: list[CodecSummary] = []
    for setting, (config, codecs) in _group(rows).items():
        summaries.extend(_summarize_setting(setting, config, codecs, target))
    return summaries


# ---------------------------------------------------------------- markdown


def _bytes(n: float | None) -> str:
    if n is None or math.isnan(n):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def _pct(mean: float, std: float, seeds: int) -> str:
    return f"{100 * mean:.2f}" + (f" ± {100 * std:.2f}" if seeds > 1 else "")


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _header(group: list[CodecSummary]) -> list[str]:
    target = f"{100 * (group[0].target_accuracy or 0):.1f}%"
    last = f"last-{group[0].last_rounds} mean"
    columns = [
        "codec",
        "seeds",
        "ok",
        f"{last} acc. (%)",
        "final acc. (%)",
        f"gap to FP32, {last} (pts)",
        "gap to FP32, final (pts)",
        "uplink",
        "total (up+down)",
        "uplink ratio",
        "total ratio",
        "uplink bits/param",
        "uplink payload ratio",
        f"uplink to {target}",
        f"total to {target}",
        "codec share of client time",
        f"Pareto ({last})",
    ]
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _table_row(s: CodecSummary) -> str:
    reach = f" ({s.seeds_reaching_target}/{s.seeds})" if s.seeds_reaching_target < s.seeds else ""
    ok = {True: "yes", False: "**no**", None: "?"}[s.ok]
    cells = [
        s.codec,
        str(s.seeds),
        ok,
        _pct(s.last5_accuracy, s.last5_accuracy_std, s.seeds),
        _pct(s.final_accuracy, s.final_accuracy_std, s.seeds),
        _opt(s.gap_to_fp32_last5_points, "+.2f"),
        _opt(s.gap_to_fp32_final_points, "+.2f"),
        _bytes(s.uplink_bytes),
        _bytes(s.total_bytes),
        f"{s.uplink_ratio:.1f}x",
        f"{s.total_ratio:.1f}x",
        _opt(s.uplink_bits_per_param, ".3f"),
        _opt(s.uplink_payload_ratio, ".1f") + ("x" if s.uplink_payload_ratio is not None else ""),
        _bytes(s.uplink_bytes_to_target) + reach,
        _bytes(s.total_bytes_to_target) + reach,
        "-" if s.codec_time_share is None else f"{100 * s.codec_time_share:.1f}%",
        "yes" if s.pareto else "",
    ]
    return "| " + " | ".join(cells) + " |"


def _health_line(group: list[CodecSummary]) -> str:
    problems = [p for s in group for p in s.problem_cells]
    if problems:
        return "Cells not ok (non-finite final loss or rejected replies): " + "; ".join(problems) + "."
    if any(s.ok is None for s in group):
        return "Rejected replies unknown (no `rejected` column); every final loss is finite."
    return "Every cell ended with finite loss and no rejected replies."


def markdown_table(summaries: list[CodecSummary]) -> str:
    """One markdown table per setting, with a line on the cells that are not ok."""
    lines = []
    for setting in dict.fromkeys(s.setting for s in summaries):
        group = [s for s in summaries if s.setting == setting]
        lines += [f"### {setting} ({group[0].rounds} rounds)", "", *_header(group)]
        lines += [_table_row(s) for s in group]
        lines += ["", _health_line(group), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------- plots


def _accuracy_plot(plt: Any, group: list[CodecSummary], group_runs: Mapping[str, list[Run]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    for index, s in enumerate(group):
        cell_runs = group_runs[s.codec]
        n = min(len(r) for r in cell_runs)
        x = [_mean([_f(r[i], "cumulative_uplink_bytes") for r in cell_runs]) for i in range(n)]
        y = [100 * _mean([_f(r[i], "accuracy") for r in cell_runs]) for i in range(n)]
        # 20 distinct colours, then dashed lines: every codec stays tellable from the others
        style = {"color": plt.cm.tab20(index % 20), "linestyle": "-" if index < 20 else "--"}
        (line,) = ax.plot(x, y, marker=".", markersize=4, label=s.codec, **style)
        if s.pareto:
            ax.plot(
                x[-1:],
                [100 * s.last5_accuracy],
                marker="*",
                markersize=16,
                color=line.get_color(),
                markeredgecolor="black",
            )
    front = sorted((s.uplink_bytes, 100 * s.last5_accuracy) for s in group if s.pareto)
    if front:
        ax.plot(
            *zip(*front, strict=True),
            linestyle="--",
            color="black",
            linewidth=1,
            label=f"Pareto frontier (last-{group[0].last_rounds} mean)",
        )
    ax.set_xscale("log")
    ax.set_xlabel("cumulative uplink bytes (log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"Accuracy vs uplink bytes: {group[0].setting}")
    low = min(100 * min(s.final_accuracy, s.last5_accuracy) for s in group)
    ax.set_ylim(max(0, low - 10) if math.isfinite(low) else 0, 100)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bytes_plot(plt: Any, group: list[CodecSummary], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 6))
    width = 0.4
    xs = range(len(group))
    ax.bar([i - width / 2 for i in xs], [s.uplink_bytes / s.rounds for s in group], width, label="uplink")
    ax.bar([i + width / 2 for i in xs], [s.downlink_bytes / s.rounds for s in group], width, label="downlink")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), [s.codec for s in group], rotation=40, ha="right", fontsize=8)
    ax.set_ylabel("bytes per round, all clients (log scale)")
    ax.set_title(f"Bytes per round: {group[0].setting}")
    ax.legend()
    ax.grid(True, axis="y", which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _plots(rows: list[dict[str, str]], summaries: list[CodecSummary], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _group(rows)
    paths = []
    settings = list(dict.fromkeys(s.setting for s in summaries))
    for index, setting in enumerate(settings):
        group = [s for s in summaries if s.setting == setting]
        suffix = "" if len(settings) == 1 else f"_{index + 1}"
        paths += [out_dir / f"accuracy_vs_uplink{suffix}.png", out_dir / f"bytes_per_round{suffix}.png"]
        _accuracy_plot(plt, group, groups[setting][1], paths[-2])
        _bytes_plot(plt, group, paths[-1])
    return paths


def write_report(out: Path, target: float | None = None, ignore_keys: Iterable[str] = ()) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and PNG plots into ``out`` from ``out/results.csv``.

    report.json holds ``summaries`` (``CodecSummary`` fields), ``problem_cells`` (every cell that is
    not ok, with the reason), ``last_rounds`` (the window of the last-5 means) and ``plots``.
    """
    out = Path(out)
    rows = load_rows(out, ignore_keys)
    if not rows:
        raise ValueError(f"{out / 'results.csv'} has no rows: run the sweep first")
    summaries = summarize(rows, target)
    plots = _plots(rows, summaries, out)
    md = [
        "# fedsqueeze sweep report",
        "",
        f"From `{out / 'results.csv'}` ({len(rows)} rows).",
        "",
        f"Accuracy: the last-{LAST_ROUNDS} mean averages each run's last {LAST_ROUNDS} rounds (then mean ± std "
        "over seeds); gaps are to FP32 of the same setting and seed over the same rounds, in points. "
        "ok: every cell ended with finite loss and no rejected replies. Pareto: uplink bytes vs last-5 mean.",
        "",
    ]
    md.append(markdown_table(summaries))
    md += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(md))
    report = {
        "last_rounds": LAST_ROUNDS,
        "summaries": [asdict(s) for s in summaries],
        "problem_cells": [p for s in summaries for p in s.problem_cells],
        "plots": [p.name for p in plots],
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
