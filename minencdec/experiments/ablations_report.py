"""report.md and its figures for `minencdec reproduce`, from the run's results.json.

    write_report(run_dir)   -> run_dir/report.md, claims.png, training.png, quality_vs_cost.png

The report takes the paper's claims one by one: the setting, what the paper reports, what
this run measured (per seed and averaged over the seeds, 95% bootstrap intervals over the
test examples) and whether it agrees; when it does not, the likely reason. Every number it
prints is in results.json (ablations.py writes it); accuracies are shown in points (x 100).
"""

from __future__ import annotations

import json
from pathlib import Path

from .ablations_scores import METRICS
from .report import _fmt, _metrics

VERDICT = {"agrees": "**agrees** with the paper", "against": "goes **against** the paper",
           "unresolved": "**cannot tell**: the interval holds 0",
           "negligible": "**shows no effect**: the whole interval is within a negligible distance of 0"}
MODELS = {"small": "small (decoder-only)", "large": "large (decoder-only)"}


def _scale(metric):
    """Accuracies in points, everything else as measured."""
    return 100.0 if metric.endswith("accuracy") else 1.0


def _digits(metric):
    return 1 if metric.endswith("accuracy") or metric == "chrf" else 3


def _value(triple, metric):
    return _fmt(triple, _scale(metric), _digits(metric))


def _plan_words(results) -> dict:
    p = results["plan"]
    tokens = p["train_steps"] * p["batch"] * p["seq_len"]
    return {**p, "arm_tokens": f"{tokens:,}"}


# ---------------------------------------------------------------------------- figures

def _save(fig, axes, path: Path, legend_size: int) -> None:
    """Grid and legend on every panel, then the PNG."""
    import matplotlib.pyplot as plt
    for a in axes:
        a.grid(alpha=0.3)
        a.legend(fontsize=legend_size)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figures(run: Path, results: dict) -> list[str]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # 1. every claim's advantage, oriented so that right of 0 is the paper's direction
    groups = [("nats/token (PrefixLM or next-line NLL)", ("prefix_nll", "next_line_nll")),
              ("accuracy points", ("play_accuracy", "review_accuracy")), ("chrF", ("chrf",))]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5), gridspec_kw={"width_ratios": [2, 1, 1]})
    for ax, (unit, names) in zip(axes, groups):
        labels = []
        for claim in results["claims"]:
            for row in claim["results"]:
                if row["metric"] not in names:
                    continue
                y, k = len(labels), _scale(row["metric"])
                d, lo, hi = (x * k for x in row["pooled"])
                ax.errorbar([d], [y], xerr=[[d - lo], [hi - d]], fmt="o", color="k", capsize=3)
                for seed, v in row["per_seed"].items():
                    ax.plot([v["advantage"][0] * k], [y], "x", color="C0" if seed == "0" else "C1")
                labels.append(f"{claim['key']} ({row['metric']})")    # titles: report.md
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set(xlabel=f"advantage, {unit}  (> 0: as the paper)")
        ax.grid(alpha=0.3, axis="x")
    fig.suptitle("Each claim: mean over seeds with 95% bootstrap interval (o), single seeds (x)", fontsize=10)
    fig.tight_layout()
    fig.savefig(run / "claims.png", dpi=110)
    plt.close(fig)

    # 2. validation loss of pretraining and of every arm
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for size in ("small", "large"):
        _, _, vs, vl = _metrics(run / f"pretrain-{size}" / "metrics.jsonl")
        ax[0].plot(vs, vl, "o-", label=f"{size} (causal LM)")
    for i, arm in enumerate(a["name"] for a in results["arms"]):
        for seed in results["plan"]["seeds"]:
            _, _, vs, vl = _metrics(run / f"seed-{seed}" / arm / "metrics.jsonl")
            ax[1].plot(vs, vl, "o-" if seed == results["plan"]["seeds"][0] else "x--", color=f"C{i}",
                       label=f"{arm} (seed {seed})", ms=4)
    ax[0].set(title="pretraining, validation plays", xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    ax[1].set(title="arms: validation loss of each objective (UL2's is on its own denoising task)",
              xlabel="optimizer step", ylabel="cross-entropy (nats/token)")
    _save(fig, ax, run / "training.png", legend_size=6)

    # 3. quality against cost: the unbalanced claim's picture
    cost, mean = results["cost"], results["summary"]["mean over seeds"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for i, name in enumerate(n for n in cost if not n.startswith("ratio")):
        value, lo, hi = mean[name]["prefix_nll"]
        for a, x in zip(ax, (cost[name]["generation_gflops"], cost[name]["generation_ms"])):
            a.errorbar([x], [value], yerr=[[value - lo], [hi - value]], fmt="os^v"[i % 4], capsize=4,
                       label=MODELS.get(name, name))
    ax[0].set(xlabel="GFLOPs per next line (from the configs)", ylabel="held-out PrefixLM NLL (lower is better)")
    ax[1].set(xlabel="ms per next line (measured, batch 1)", ylabel="held-out PrefixLM NLL (lower is better)")
    _save(fig, ax, run / "quality_vs_cost.png", legend_size=8)
    return ["claims.png", "training.png", "quality_vs_cost.png"]


# ---------------------------------------------------------------------------- text

def write_report(run) -> Path:
    run = Path(run)
    results = json.loads((run / "results.json").read_text())
    figures(run, results)
    words = _plan_words(results)
    lines = _header(results, words)
    lines += ["## The claims, at a glance", "",
              "| claim | the paper | this run: advantage, mean over seeds [95% interval] | verdict |",
              "|---|---|---|---|"]
    for c in results["claims"]:
        measured = "; ".join(f"{METRICS[r['metric']][0]} {_value(r['pooled'], r['metric'])}" for r in c["results"])
        verdicts = "; ".join(r["verdict"] for r in c["results"])
        lines.append(f"| {c['title']} | {c['paper'].format(**words)} | {measured} | {verdicts} |")
    lines += ["", "An advantage is positive when the arm the paper favours does better: lower NLL, higher accuracy "
              "(in points) or chrF.", "", "![every claim](claims.png)", ""]
    for i, c in enumerate(results["claims"], 1):
        lines += _claim(i, c, results, words)
    lines += _all_models(results) + _samples(results) + _time(results)
    (run / "report.md").write_text("\n".join(lines) + "\n")
    return run / "report.md"


def _header(results, words) -> list[str]:
    p, d, m = results["plan"], results["data"], results["models"]
    seeds = ", ".join(map(str, p["seeds"]))
    return ["# The paper's ablations on tiny models trained from scratch", "",
            f"Command: `{results['command']}`; backend {results['backend']}; seeds {seeds} (each arm and classifier "
            f"trained once per seed; the pretrained toys are shared, seed {p['pretrain_seed']}).", "",
            f"**Models.** Two Gemma 2 decoder-only toys pretrained from scratch on {len(d['plays']['train'])} "
            f"training plays ({p['pretrain_steps']} steps of {p['batch']} x {p['seq_len']} tokens): small (width "
            f"{m['small']['width']}, {m['small']['layers']} layers, {m['small']['parameters']:,} parameters) and "
            f"large (width {m['large']['width']}, {m['large']['layers']} layers, {m['large']['parameters']:,}). "
            f"One tokenizer ({d['vocab_size']:,} pieces) trained on the training plays and the training reviews.", "",
            f"**Arms.** Each encoder-decoder is adapted from them (paper section 3.2: cross-attention copied in a "
            f"balanced pair, random in an unbalanced one) and trained {p['train_steps']} steps of {p['batch']} x "
            f"{p['seq_len']} tokens ({words['arm_tokens']} tokens) at learning rate {p['train_lr']}; PrefixLM+KD "
            f"distils from the encoder's source. Classifiers: {p['cls_steps']} steps of {p['cls_batch']} examples "
            f"of up to {p['cls_len']} tokens at {p['cls_lr']}, the same for every model and task.", "",
            f"**Held out.** Test: {len(d['plays']['test'])} whole plays ({d['test_rows']} rows for the PrefixLM "
            f"loss: the first half read, the second scored; {d['next_lines'][2]} next lines, the first "
            f"{p['gen_examples']} also generated greedily for chrF), the {d['reviews'][2]} published test "
            f"reviews and {d['passages'][2]} passages for the which-play task (its {d['passages'][0]} training "
            f"passages come from earlier scenes of the same {len(d['plays']['validation'])} validation plays, "
            "which no arm or pretraining read). Validation: those plays' middle passages, and "
            f"{d['reviews'][1]} reviews, only reported. No test example was trained on or used to choose anything; the plan was fixed before the "
            "run. Intervals are 95% bootstrap intervals over the test examples: they do not cover the spread "
            "over pretraining runs, which the seeds share.", ""]


def _claim(i, c, results, words) -> list[str]:
    lines = [f"## {i}. {c['title']}", "", f"**Setting.** {c['setting'].format(**words)}", "",
             f"**The paper** (T5Gemma, arXiv 2504.06225): {c['paper'].format(**words)}", "",
             f"| metric | seed | {c['better']} | {c['worse']} | advantage [95% interval] |", "|---|---|---|---|---|"]
    for r in c["results"]:
        k, n = _scale(r["metric"]), _digits(r["metric"])
        for seed, v in r["per_seed"].items():
            lines.append(f"| {METRICS[r['metric']][0]} | {seed} | {v['better'] * k:.{n}f} | {v['worse'] * k:.{n}f} "
                         f"| {_value(v['advantage'], r['metric'])} |")
        lines.append(f"| {METRICS[r['metric']][0]} | mean | | | **{_value(r['pooled'], r['metric'])}** |")
    lines.append("")
    for r in c["results"]:
        same = "every seed points the same way" if r["seeds_same_sign"] else "the seeds disagree in sign"
        lines.append(f"- {METRICS[r['metric']][0]}: this run {VERDICT[r['verdict']]} ({same}).")
    if any(r["verdict"] != "agrees" for r in c["results"]):
        lines.append(f"- Likely reason where it does not agree: {c['why'].format(**words)}")
    if c["key"] == "unbalanced" and "ratio large-small / small-small" in results["cost"]:
        r = results["cost"]["ratio large-small / small-small"]
        lines.append(f"- Cost, large-small over small-small: {r['generation_gflops']:.2f}x the FLOPs per next line "
                     f"and {r['generation_ms']:.2f}x the measured time (see the table below and "
                     "quality_vs_cost.png).")
    return lines + [""]


def _all_models(results) -> list[str]:
    mean, cost = results["summary"]["mean over seeds"], results["cost"]
    first = results["summary"][str(results["plan"]["seeds"][0])]
    lines = ["## Every model (test splits, mean over seeds, 95% intervals)", "",
             "| model | PrefixLM NLL | next-line NLL | chrF | which-play accuracy | sentiment accuracy | "
             "macro-F1 (play / sentiment), first seed |", "|---|---|---|---|---|---|---|"]
    for name, row in mean.items():
        acc = [_value(row[m], m) if m in row else "-" for m in ("play_accuracy", "review_accuracy")]
        f1 = " / ".join(_fmt(first[name][k]) for k in ("plays_macro_f1", "reviews_macro_f1") if k in first[name])
        lines.append(f"| {MODELS.get(name, name)} | {_value(row['prefix_nll'], 'prefix_nll')} | "
                     f"{_value(row['next_line_nll'], 'next_line_nll')} | {_value(row['chrf'], 'chrf')} | {acc[0]} "
                     f"| {acc[1]} | {f1 or '-'} |")
    major = results["summary"]["majority class"]
    lines += [f"| majority class (play {major['plays']['class']}; {major['reviews']['class']}) | | | | "
              f"{_value(major['plays']['accuracy'], 'play_accuracy')} | "
              f"{_value(major['reviews']['accuracy'], 'review_accuracy')} | |", "",
              f"Accuracies in points. Which play: passages from the {len(results['data']['plays']['validation'])} "
              "validation plays, the first part of each play to train the classifier, the last to test it.", "",
              "The decoder-only toys had their pretraining only (no arm budget): they are references, not arms.", "",
              "| model | parameters | GFLOPs per next line | ms per next line | GFLOPs per review |",
              "|---|---|---|---|---|"]
    for name, c in cost.items():
        if not name.startswith("ratio"):
            lines.append(f"| {MODELS.get(name, name)} | {c['parameters']:,} | {c['generation_gflops']:.4f} | "
                         f"{c['generation_ms']:.1f} | {c['classification_gflops']:.4f} |")
    return lines + ["", "![quality against cost](quality_vs_cost.png)", "", "![training curves](training.png)", ""]


def _samples(results) -> list[str]:
    seed = str(results["plan"]["seeds"][0])
    runs = results["scores"][seed]
    lines = ["## Samples (a held-out play, greedy, first seed)", ""]
    for i, s in enumerate(runs["small-small"]["samples"]):
        lines += [f"**{i + 1}.** …{s['input'][-120:]!r}", f"- reference: {s['target']!r}"]
        lines += [f"- {name}: {runs[name]['samples'][i]['generated']!r}"
                  for name in ("small", "small-small", "small-small-ul2", "large-small-warmup-short")]
        lines.append("")
    return lines


def _time(results) -> list[str]:
    t = results["time"]
    load = t["load_average"]
    lines = [f"## Time: {t['minutes']:.1f} minutes on {t['cores']} cores ({t['sessions']} session(s), started "
             f"{t['date']}; 1-minute load average {load['min']:.2f} to {load['max']:.2f}, mean "
             f"{load['mean']:.2f})", "", "| stage | minutes |", "|---|---|"]
    lines += [f"| {k} | {v:.1f} |" for k, v in t["stage_minutes"].items()]
    return lines
