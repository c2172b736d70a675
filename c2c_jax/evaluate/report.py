"""The evaluation's outputs: summary.json's content with its statistics and verdict, the per-item CSV,
results.md (rows = methods, columns = benchmarks, like the paper's main table) and the plots."""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path

import numpy as np

from c2c_jax.c2c.controls import CONTROL_METHODS, SHARER_CONTROLS
from c2c_jax.evaluate.methods import ItemResult
from c2c_jax.evaluate.scoring import LETTERS
from c2c_jax.evaluate.settings import METHOD_LABELS, EvalSettings
from c2c_jax.evaluate.stats import BOOTSTRAP_RESAMPLES, bootstrap_interval, paired_comparison

logger = logging.getLogger(__name__)

CSV_FIELDS = ("id", "subject", "method", "gold", "prediction", "correct", "generated_text", "message",
              "prompt_tokens", "output_tokens", "ttft_ms", "latency_ms", "option_logits", "gold_logprob",
              "sharer_item")


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def summarise(settings: EvalSettings, models: dict, per_bench: dict, config) -> dict:
    """summary.json's content for the benchmarks in `per_bench` (those finished so far)."""
    accuracy, counts, skip_reasons, lat_bench = {}, {}, {}, {}
    for b, out in per_bench.items():
        accuracy[b], counts[b], skip_reasons[b], lat_bench[b] = {}, {}, {}, {}
        for m in settings.methods:
            rows = out["results"].get(m, [])
            skips = [s for s in out["skipped"] if m in s["methods"]]
            accuracy[b][m] = float(np.mean([r.correct for r in rows])) if rows else None
            counts[b][m] = dict(scored=len(rows), correct=int(sum(r.correct for r in rows)), skipped=len(skips),
                                unanswered=int(sum(r.prediction is None for r in rows)))
            reasons: dict[str, int] = {}
            for s in skips:
                reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
            skip_reasons[b][m] = reasons
            timed = [r for r in rows if r.latency_ms is not None]
            lat_bench[b][m] = dict(items=len(timed), ttft_ms=_mean(r.ttft_ms for r in timed),
                                   total_ms=_mean(r.latency_ms for r in timed))
    latency = {}
    for m in settings.methods:
        timed = [r for out in per_bench.values() for r in out["results"].get(m, []) if r.latency_ms is not None]
        latency[m] = dict(items=len(timed), batch_size=1, ttft_ms=_mean(r.ttft_ms for r in timed),
                          total_ms=_mean(r.latency_ms for r in timed))
    statistics = {b: _statistics(settings, out) for b, out in per_bench.items()}
    t2t_total = latency.get("t2t", {}).get("total_ms")
    speedup = {m: (t2t_total / v["total_ms"] if t2t_total and v["total_ms"] else None) for m, v in latency.items()}
    try:
        config_dict = json.loads(config.to_json_best_effort())
    except Exception:  # noqa: BLE001 -- the summary must not fail on an exotic config value
        config_dict = str(config)
    summary = dict(
        benchmarks=list(per_bench), pending_benchmarks=[b for b in settings.benchmarks if b not in per_bench],
        methods=list(settings.methods), answer_mode=settings.answer_mode,
        models=models, accuracy=accuracy, counts=counts, statistics=statistics,
        seeds=dict(seed=settings.seed, bootstrap=f"numpy default_rng({settings.seed}) per statistic, "
                   f"{BOOTSTRAP_RESAMPLES} resamples", noise_control=f"jax.random.key({settings.seed}) folded with "
                   "the batch index, then the sharer index"),
        skip_reasons=skip_reasons,
        skipped={b: out["skipped"] for b, out in per_bench.items()},
        latency=latency, latency_per_benchmark=lat_bench, speedup_vs_t2t=speedup,
        run_seconds={b: out["run_seconds"] for b, out in per_bench.items()},
        files=dict(csv={b: f"{b}.csv" for b in per_bench}, summary="summary.json", results="results.md",
                   plots=["accuracy.png", "answers.png"] + (["latency.png"] if settings.latency_items else [])),
        config=config_dict)
    summary["verdict"] = verdict(summary)
    return summary


def _statistics(settings: EvalSettings, out: dict) -> dict:
    """One benchmark's statistics per method (see the module docstring); every bootstrap starts from
    `default_rng(seed)`, so a number does not depend on which other methods ran."""
    rows = {m: {r.id: r for r in out["results"].get(m, [])} for m in settings.methods}
    choices = out["num_choices"]
    scored = sorted(set().union(*(set(r) for r in rows.values()))) if rows else []
    stats = dict(chance=float(np.mean([1 / choices[i] for i in scored])) if scored else None, methods={})
    letters = LETTERS[: max(choices.values(), default=0)]

    def compare(m: str, reference: str) -> dict | None:
        if m == reference or reference not in rows or not rows[reference] or not rows[m]:
            return None
        common = sorted(set(rows[m]) & set(rows[reference]))
        return paired_comparison([rows[m][i].correct for i in common], [rows[reference][i].correct for i in common],
                                 np.random.default_rng(settings.seed))

    def answers_of(rs: list[ItemResult]) -> dict:
        """Share of each predicted letter (and of no answer) among `rs`."""
        if not rs:
            return {}
        return {**{L: sum(r.prediction == L for r in rs) / len(rs) for L in letters},
                "none": sum(r.prediction is None for r in rs) / len(rs)}

    # The gold letters' shares, to read the answer distribution against.
    gold = {i: r.gold for by_id in rows.values() for i, r in by_id.items()}
    stats["gold_letters"] = {L: sum(g == L for g in gold.values()) / len(gold) for L in letters} if gold else {}
    for m, by_id in rows.items():
        rs = list(by_id.values())
        correct = [r.correct for r in rs]
        logprobs = [r.gold_logprob for r in rs if r.gold_logprob is not None]
        low, high = bootstrap_interval(correct, np.random.default_rng(settings.seed))
        entry = dict(items=len(rs), accuracy=float(np.mean(correct)) if rs else None,
                     low=low if rs else None, high=high if rs else None,
                     vs_receiver=compare(m, "receiver"),
                     vs_c2c=compare(m, "c2c") if m in CONTROL_METHODS else None,
                     answers=answers_of(rs),
                     gold_logprob=float(np.mean(logprobs)) if logprobs else None)
        if logprobs:
            entry["gold_logprob_low"], entry["gold_logprob_high"] = bootstrap_interval(
                logprobs, np.random.default_rng(settings.seed))
        stats["methods"][m] = entry
    return stats


def _beyond(comparison: dict | None) -> int:
    """+1 / -1 when the paired difference's interval lies above / below zero, else 0."""
    if not comparison or comparison["difference"] is None:
        return 0
    return 1 if comparison["low"] > 0 else -1 if comparison["high"] < 0 else 0


def _pp(comparison: dict) -> str:
    return (f"{100 * comparison['difference']:+.1f} pp [{100 * comparison['low']:+.1f}, "
            f"{100 * comparison['high']:+.1f}]")


def verdict(summary: dict) -> str:
    """One line: what the run shows, from the paired differences to the receiver alone and the controls."""
    clauses, at_chance = [], True
    for b in summary["benchmarks"]:
        stats = summary["statistics"][b]
        methods = stats["methods"]
        if "receiver" not in methods or not methods["receiver"]["items"]:
            continue
        receiver = methods["receiver"]
        at_chance &= receiver["low"] <= stats["chance"] <= receiver["high"]
        found = []
        for m, entry in methods.items():
            direction = _beyond(entry["vs_receiver"])
            if not direction:
                continue
            text = f"{m} {_pp(entry['vs_receiver'])}"
            if m == "c2c" and direction > 0:
                controls = {c: methods[c] for c in SHARER_CONTROLS if c in methods and methods[c]["items"]}
                if not controls:
                    text += " (no controls run: a format effect cannot be ruled out)"
                else:
                    matched = [c for c, e in controls.items() if _beyond(e["vs_c2c"]) >= 0]
                    text += (f", but {', '.join(matched)} {'does' if len(matched) == 1 else 'do'} not fall below "
                             "it: not the sharer's content" if matched else ", above every control: the sharer's "
                             "content helps")
            elif m in CONTROL_METHODS and m not in SHARER_CONTROLS and entry["vs_c2c"]:
                text += f" ({_pp(entry['vs_c2c'])} vs c2c)"
            found.append(text)
        if found:
            clauses.append(f"{b}: " + "; ".join(found) + f" ({receiver['items']} items)")
    gates = summary.get("models", {}).get("fuser_gates_open") or []
    closed = " (every gate of the fuser is closed, so C2C and its controls are the receiver alone)" \
        if gates and not any(g[0] for g in gates) else ""
    if not clauses:
        if not any(summary["statistics"][b]["methods"].get("receiver", {}).get("items") for b in summary["benchmarks"]):
            return "Verdict: no receiver-alone run to compare with (add 'receiver' to eval.methods)."
        prefix = "pipeline check at this model size: the receiver is at chance and " if at_chance else ""
        return f"Verdict: {prefix}no method differs from the receiver alone beyond its 95% interval{closed}."
    return "Verdict: " + "; ".join(clauses) + closed + "."


def write_csv(path: Path, results: dict) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for rows in results.values():
            for r in rows:
                writer.writerow(r.row())


def _fmt(value, spec: str, suffix: str = "") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:{spec}}{suffix}"


def _interval(entry: dict | None, scale: float = 100, spec: str = ".1f") -> str:
    if not entry or entry.get("accuracy") is None:
        return "–"
    return f"{scale * entry['accuracy']:{spec}} [{scale * entry['low']:{spec}}, {scale * entry['high']:{spec}}]"


def _comparison_cell(comparison: dict | None) -> str:
    if not comparison or comparison["difference"] is None:
        return "–"
    return f"{_pp(comparison)}, p={comparison['p_mcnemar']:.2g}"


def results_markdown(summary: dict) -> str:
    """The paper's main-table layout (rows = methods, columns = benchmarks: accuracy % with its 95% interval),
    then the paired differences, the answer distribution, the gold letter's log-probability and the verdict."""
    benches, methods = summary["benchmarks"], summary["methods"]
    models, stats = summary["models"], summary["statistics"]
    lines = ["# C2C evaluation", ""]
    desc = [f"answer mode `{summary['answer_mode']}`"]
    if models.get("receiver"):
        desc.append(f"receiver `{models['receiver']}`")
    if models.get("sharer"):
        desc.append(f"sharer `{models['sharer']}`")
    if models.get("fusers"):
        inputs = models.get("fuser_sharer_inputs") or ["real"] * len(models["fusers"])
        gates = models.get("fuser_gates_open") or [None] * len(models["fusers"])
        desc.append("C2C: " + ", ".join(
            f"`{s}` via fuser `{f}`" + (f" ({g[0]} of {g[1]} gates open)" if g else "")
            + (f" (trained control: sharer input `{i}`)" if i != "real" else "")
            for s, f, i, g in zip(models["c2c_sharers"], models["fusers"], inputs, gates)))
    lines += ["; ".join(desc) + ".", ""]
    header = ["Method", *benches, "TTFT (ms)", "Latency (ms)", "Speedup vs T2T"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|")
    for m in methods:
        acc = [_interval(stats[b]["methods"].get(m)) for b in benches]
        lat = summary["latency"][m]
        cells = [METHOD_LABELS[m], *acc, _fmt(lat["ttft_ms"], ".1f"), _fmt(lat["total_ms"], ".1f"),
                 _fmt(summary["speedup_vs_t2t"][m], ".2f", "x")]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("| Chance | " + " | ".join(_fmt(None if stats[b]["chance"] is None else 100 * stats[b]["chance"],
                                                   ".1f") for b in benches) + " | | | |")
    lines += ["", "Accuracy in % on the scored items, [95% percentile bootstrap interval]; chance = the mean of "
              "1 / options. Latency: batch size 1, mean over the first items of each benchmark, after a warm-up "
              "call; text-to-text counts both stages; the controls are not timed (a control runs C2C's computation "
              "on other inputs).", ""]

    lines += ["## Paired differences", "",
              "Accuracy of each method minus the receiver alone (and, for the controls, minus C2C) on the same "
              "items, in percentage points [95% bootstrap interval], with McNemar's exact p-value.", ""]
    header = ["Method"] + [f"{b}: vs receiver" for b in benches]
    controls = [m for m in methods if m in CONTROL_METHODS]
    if controls and "c2c" in methods:
        header += [f"{b}: vs C2C" for b in benches]
    lines += ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for m in methods:
        cells = [METHOD_LABELS[m]] + [_comparison_cell(stats[b]["methods"].get(m, {}).get("vs_receiver"))
                                      for b in benches]
        if controls and "c2c" in methods:
            cells += [_comparison_cell(stats[b]["methods"].get(m, {}).get("vs_c2c")) for b in benches]
        lines.append("| " + " | ".join(cells) + " |")

    lines += ["", "## Answer distribution", "",
              "Share of each predicted letter (%), against the gold letters' share; a method that answers one "
              "letter to everything scores that letter's gold share.", ""]
    for b in benches:
        letters = list(stats[b]["gold_letters"])
        header = ["Method", *letters, "none"]
        lines += [f"**{b}**", "", "| " + " | ".join(header) + " |",
                  "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
        lines.append("| Gold | " + " | ".join(f"{100 * stats[b]['gold_letters'][L]:.0f}" for L in letters) + " | |")
        for m in methods:
            shares = stats[b]["methods"].get(m, {}).get("answers") or {}
            lines.append("| " + " | ".join([METHOD_LABELS[m]] + [_fmt(None if L not in shares else 100 * shares[L],
                                                                       ".0f") for L in letters + ["none"]]) + " |")
        lines.append("")

    if any(stats[b]["methods"].get(m, {}).get("gold_logprob") is not None for b in benches for m in methods):
        lines += ["## Log-probability of the gold letter", "",
                  "Mean over items of log p(gold letter | prompt) over the whole vocabulary [95% interval]; "
                  "it moves even when accuracy sits at chance.", "",
                  "| Method | " + " | ".join(benches) + " |", "|:---|" + "---:|" * len(benches)]
        for m in methods:
            cells = []
            for b in benches:
                e = stats[b]["methods"].get(m, {})
                cells.append("–" if e.get("gold_logprob") is None else
                             f"{e['gold_logprob']:.3f} [{e['gold_logprob_low']:.3f}, {e['gold_logprob_high']:.3f}]")
            lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + " |")
        lines.append("")

    for b in benches:
        parts = [f"{m}: {summary['counts'][b][m]['scored']} scored, {summary['counts'][b][m]['skipped']} skipped"
                 for m in methods]
        lines.append(f"- **{b}**: " + "; ".join(parts))
    lines += ["", f"Seeds: {summary['seeds']['seed']} (bootstrap and the noise control).", "", summary["verdict"]]
    return "\n".join(lines) + "\n"


def write_plots(summary: dict, output_dir: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    benches, methods, stats = summary["benchmarks"], summary["methods"], summary["statistics"]
    fig = Figure(figsize=(max(6.0, 1.2 * len(benches) * max(1, len(methods) / 3) + 3), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    width = 0.8 / len(methods)
    x = np.arange(len(benches))
    for j, m in enumerate(methods):
        entries = [stats[b]["methods"].get(m) or {} for b in benches]
        values = np.array([100 * (e.get("accuracy") or 0.0) for e in entries])
        errors = np.array([[100 * (e["accuracy"] - e["low"]) if e.get("accuracy") is not None else 0.0
                            for e in entries],
                           [100 * (e["high"] - e["accuracy"]) if e.get("accuracy") is not None else 0.0
                            for e in entries]])
        bars = ax.bar(x + (j - (len(methods) - 1) / 2) * width, values, width, yerr=errors, capsize=2,
                      label=METHOD_LABELS[m], error_kw=dict(linewidth=0.8))
        ax.bar_label(bars, fmt="%.1f", fontsize=6, padding=2)
    for i, b in enumerate(benches):  # chance, per benchmark
        if stats[b]["chance"] is not None:
            ax.hlines(100 * stats[b]["chance"], i - 0.45, i + 0.45, colors="black", linestyles="dashed",
                      linewidth=1, label="chance" if i == 0 else None)
    ax.set_xticks(x, benches)
    ax.set_ylabel("accuracy (%), 95% interval")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    ax.set_title(f"Accuracy ({summary['answer_mode']})")
    fig.tight_layout()
    fig.savefig(output_dir / "accuracy.png", dpi=120)

    # Answer distribution: one panel per benchmark, one stacked bar per method (and the gold letters).
    fig = Figure(figsize=(max(6.0, 0.7 * (len(methods) + 1) * len(benches) + 2.5), 4.2))
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(1, len(benches), sharey=True, squeeze=False)[0])
    for ax, b in zip(axes, benches):
        letters = list(stats[b]["gold_letters"]) + ["none"]
        rows = [("Gold", stats[b]["gold_letters"])] + [(METHOD_LABELS[m], stats[b]["methods"].get(m, {}).get("answers")
                                                         or {}) for m in methods]
        bottom = np.zeros(len(rows))
        for k, L in enumerate(letters):
            share = np.array([100 * r.get(L, 0.0) for _, r in rows])
            color = "lightgray" if L == "none" else f"C{k}"
            ax.bar(np.arange(len(rows)), share, 0.7, bottom=bottom, label=L, color=color)
            bottom += share
        ax.set_xticks(np.arange(len(rows)), [name for name, _ in rows], rotation=60, ha="right", fontsize=7)
        ax.set_title(b)
    axes[0].set_ylabel("share of answers (%)")
    axes[-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0, title="answer")
    fig.suptitle("Answer distribution")
    fig.tight_layout()
    fig.savefig(output_dir / "answers.png", dpi=120)

    timed = [m for m in methods if summary["latency"][m]["items"]]
    if not timed:  # eval.latency_items=0: nothing was timed, and an empty plot would say nothing
        return
    fig = Figure(figsize=(max(6.0, 1.2 * len(timed) + 3), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(timed))
    ttft = [summary["latency"][m]["ttft_ms"] or 0.0 for m in timed]
    total = [summary["latency"][m]["total_ms"] or 0.0 for m in timed]
    ax.bar(x - 0.2, ttft, 0.4, label="time to first token")
    ax.bar(x + 0.2, total, 0.4, label="total")
    ax.set_xticks(x, [METHOD_LABELS[m] for m in timed])
    ax.set_ylabel("ms per item (batch size 1)")
    # Outside the axes: text-to-text's bars are the tallest and a legend inside would cover them.
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.set_title("Latency")
    fig.tight_layout()
    fig.savefig(output_dir / "latency.png", dpi=120)


