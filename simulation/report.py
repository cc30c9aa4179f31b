"""Turn a sweep's results.csv into plots (PNG), a markdown table per setting, and report.json."""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["CodecSummary", "summarize", "write_report", "pareto_front"]

SETTING_KEYS = ("model", "dataset", "partitioner", "num_supernodes")
FP32_SPEC = "identity"


@dataclass
class CodecSummary:
    """One codec in one setting, aggregated over its seeds (mean, and std where several)."""

    setting: str
    codec: str
    uplink_codec: str
    downlink_codec: str
    seeds: int
    rounds: int
    final_accuracy: float
    final_accuracy_std: float
    gap_to_fp32_points: float | None
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
    pareto: bool = False


def _f(row: dict[str, str], key: str) -> float:
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


def load_rows(out: Path) -> list[dict[str, str]]:
    with open(Path(out) / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _runs(rows: list[dict[str, str]]) -> dict[str, list[dict[str, str]]]:
    runs: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        runs[row["cell"]].append(row)
    for cell_rows in runs.values():
        cell_rows.sort(key=lambda r: int(r["round"]))
    return runs


def summarize(rows: list[dict[str, str]], target: float | None = None) -> list[CodecSummary]:
    """Aggregate the results table per (setting, codec).

    ``target`` is the accuracy whose bytes-to-reach are reported; ``None`` uses the FP32
    baseline's mean final accuracy minus one point in each setting (or the best codec's if
    there is no FP32 baseline).
    """
    runs = _runs(rows)
    by_setting: dict[str, dict[str, list[list[dict[str, str]]]]] = defaultdict(lambda: defaultdict(list))
    for cell_rows in runs.values():
        first = cell_rows[0]
        setting = " / ".join(f"{first[k]}" for k in SETTING_KEYS)
        by_setting[setting][first["codec"]].append(cell_rows)
    summaries: list[CodecSummary] = []
    for setting, codecs in by_setting.items():
        baseline = next(
            (runs_ for runs_ in codecs.values() if runs_[0][0]["uplink_codec"] == FP32_SPEC and runs_[0][0]["downlink_codec"] == FP32_SPEC),
            None,
        )
        fp32_by_seed = {r[0]["seed"]: r for r in baseline} if baseline else {}
        finals = {name: _mean([_f(r[-1], "accuracy") for r in runs_]) for name, runs_ in codecs.items()}
        setting_target = target
        if setting_target is None:
            ref = _mean([_f(r[-1], "accuracy") for r in baseline]) if baseline else max(finals.values())
            setting_target = ref - 0.01
        first = next(iter(codecs.values()))[0][0]
        n_params = _num_params(first["model"], first["dataset"])
        setting_summaries = []
        for name, runs_ in codecs.items():
            accs = [_f(r[-1], "accuracy") for r in runs_]
            gaps = []
            for r in runs_:
                base = fp32_by_seed.get(r[0]["seed"])
                if base is not None:
                    same_round = [b for b in base if b["round"] == r[-1]["round"]]
                    if same_round:
                        gaps.append(100 * (_f(r[-1], "accuracy") - _f(same_round[0], "accuracy")))
            up = [sum(_f(x, "uplink_bytes") for x in r) for r in runs_]
            down = [sum(_f(x, "downlink_bytes") for x in r) for r in runs_]
            up32 = [sum(_f(x, "uplink_fp32_bytes") for x in r) for r in runs_]
            down32 = [sum(_f(x, "downlink_fp32_bytes") for x in r) for r in runs_]
            replies = [sum(_f(x, "replies") for x in r) for r in runs_]
            to_target_up, to_target_total = [], []
            for r in runs_:
                hit = next((x for x in r if _f(x, "accuracy") >= setting_target), None)
                if hit is not None:
                    to_target_up.append(_f(hit, "cumulative_uplink_bytes"))
                    to_target_total.append(_f(hit, "cumulative_bytes"))
            encode = [sum(_f(x, "client_encode_seconds") for x in r) for r in runs_]
            train = [sum(_f(x, "client_train_seconds") for x in r) for r in runs_]
            share = _mean([e / (e + t) for e, t in zip(encode, train) if e + t > 0])
            bits = payload_ratio = None
            if n_params and _mean(replies) > 0:
                bits = 8 * _mean(up) / _mean(replies) / n_params
                payload = _mean([sum(_f(x, "uplink_payload_bytes") for x in r) for r in runs_])
                if payload > 0:  # codec blobs alone against 4 bytes per parameter per reply
                    payload_ratio = 4 * n_params * _mean(replies) / payload
            setting_summaries.append(
                CodecSummary(
                    setting=setting, codec=name, uplink_codec=runs_[0][0]["uplink_codec"], downlink_codec=runs_[0][0]["downlink_codec"],
                    seeds=len(runs_), rounds=int(runs_[0][-1]["round"]),
                    final_accuracy=_mean(accs), final_accuracy_std=_std(accs),
                    gap_to_fp32_points=_mean(gaps) if gaps else None,
                    uplink_bytes=_mean(up), downlink_bytes=_mean(down), total_bytes=_mean(up) + _mean(down),
                    uplink_ratio=_mean(up32) / _mean(up), total_ratio=(_mean(up32) + _mean(down32)) / (_mean(up) + _mean(down)),
                    uplink_bits_per_param=bits, uplink_payload_ratio=payload_ratio, target_accuracy=setting_target,
                    uplink_bytes_to_target=_mean(to_target_up) if to_target_up else None,
                    total_bytes_to_target=_mean(to_target_total) if to_target_total else None,
                    seeds_reaching_target=len(to_target_up),
                    codec_time_share=None if math.isnan(share) else share,
                )
            )
        for i in pareto_front([(s.uplink_bytes, s.final_accuracy) for s in setting_summaries]):
            setting_summaries[i].pareto = True
        summaries.extend(setting_summaries)
    return summaries


def _bytes(n: float | None) -> str:
    if n is None or math.isnan(n):
        return "-"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def markdown_table(summaries: list[CodecSummary]) -> str:
    lines = []
    for setting in dict.fromkeys(s.setting for s in summaries):
        group = [s for s in summaries if s.setting == setting]
        target = group[0].target_accuracy
        lines += [
            f"### {setting} ({group[0].rounds} rounds)",
            "",
            f"| codec | seeds | final acc. (%) | gap to FP32 (pts) | uplink | total (up+down) | uplink ratio | total ratio | uplink bits/param | uplink payload ratio | uplink to {100 * (target or 0):.1f}% | total to {100 * (target or 0):.1f}% | codec share of client time | Pareto |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for s in group:
            acc = f"{100 * s.final_accuracy:.2f}" + (f" ± {100 * s.final_accuracy_std:.2f}" if s.seeds > 1 else "")
            gap = "-" if s.gap_to_fp32_points is None else f"{s.gap_to_fp32_points:+.2f}"
            bits = "-" if s.uplink_bits_per_param is None else f"{s.uplink_bits_per_param:.3f}"
            payload = "-" if s.uplink_payload_ratio is None else f"{s.uplink_payload_ratio:.1f}x"
            reach = f" ({s.seeds_reaching_target}/{s.seeds})" if s.seeds_reaching_target < s.seeds else ""
            share = "-" if s.codec_time_share is None else f"{100 * s.codec_time_share:.1f}%"
            lines.append(
                f"| {s.codec} | {s.seeds} | {acc} | {gap} | {_bytes(s.uplink_bytes)} | {_bytes(s.total_bytes)} | {s.uplink_ratio:.1f}x | {s.total_ratio:.1f}x | {bits} | {payload} | "
                f"{_bytes(s.uplink_bytes_to_target)}{reach} | {_bytes(s.total_bytes_to_target)}{reach} | {share} | {'yes' if s.pareto else ''} |"
            )
        lines.append("")
    return "\n".join(lines)


def _plots(rows: list[dict[str, str]], summaries: list[CodecSummary], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(rows)
    paths = []
    settings = list(dict.fromkeys(s.setting for s in summaries))
    for index, setting in enumerate(settings):
        group = [s for s in summaries if s.setting == setting]
        suffix = "" if len(settings) == 1 else f"_{index + 1}"
        fig, ax = plt.subplots(figsize=(9, 6))
        for index, s in enumerate(group):
            cell_runs = [r for r in runs.values() if r[0]["codec"] == s.codec and " / ".join(r[0][k] for k in SETTING_KEYS) == setting]
            n = min(len(r) for r in cell_runs)
            x = [_mean([_f(r[i], "cumulative_uplink_bytes") for r in cell_runs]) for i in range(n)]
            y = [100 * _mean([_f(r[i], "accuracy") for r in cell_runs]) for i in range(n)]
            # 20 distinct colours, then dashed lines: every codec stays tellable from the others
            style = {"color": plt.cm.tab20(index % 20), "linestyle": "-" if index < 20 else "--"}
            (line,) = ax.plot(x, y, marker=".", markersize=4, label=s.codec, **style)
            if s.pareto:
                ax.plot(x[-1:], y[-1:], marker="*", markersize=16, color=line.get_color(), markeredgecolor="black")
        front = sorted((s.uplink_bytes, 100 * s.final_accuracy) for s in group if s.pareto)
        if front:
            ax.plot(*zip(*front), linestyle="--", color="black", linewidth=1, label="Pareto frontier (final)")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes (log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Accuracy vs uplink bytes: {setting}")
        low = min(100 * s.final_accuracy for s in group)
        ax.set_ylim(max(0, low - 10), 100)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        path = out_dir / f"accuracy_vs_uplink{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)

        fig, ax = plt.subplots(figsize=(9, 6))
        width = 0.4
        xs = range(len(group))
        up = [s.uplink_bytes / s.rounds for s in group]
        down = [s.downlink_bytes / s.rounds for s in group]
        ax.bar([i - width / 2 for i in xs], up, width, label="uplink")
        ax.bar([i + width / 2 for i in xs], down, width, label="downlink")
        ax.set_yscale("log")
        ax.set_xticks(list(xs), [s.codec for s in group], rotation=40, ha="right", fontsize=8)
        ax.set_ylabel("bytes per round, all clients (log scale)")
        ax.set_title(f"Bytes per round: {setting}")
        ax.legend()
        ax.grid(True, axis="y", which="both", alpha=0.3)
        path = out_dir / f"bytes_per_round{suffix}.png"
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(out: Path, target: float | None = None) -> dict[str, Any]:
    """Write ``report.md``, ``report.json`` and PNG plots into ``out`` from ``out/results.csv``."""
    out = Path(out)
    rows = load_rows(out)
    if not rows:
        raise ValueError(f"{out / 'results.csv'} has no rows: run the sweep first")
    summaries = summarize(rows, target)
    plots = _plots(rows, summaries, out)
    md = ["# fedsqueeze sweep report", "", f"From `{out / 'results.csv'}` ({len(rows)} rows).", ""]
    md.append(markdown_table(summaries))
    md += ["", *[f"![{p.stem}]({p.name})" for p in plots], ""]
    (out / "report.md").write_text("\n".join(md))
    report = {"summaries": [asdict(s) for s in summaries], "plots": [p.name for p in plots]}
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
