"""The multi-seed comparison: per-seed reports (from csmpq.run_seed) ->
accuracy per method (mean ± std over seeds), budget used, paired
statistics of CSMPQ against each baseline, search times, and a plot.

Each seed fixes the data split, the initialisation and batch order of the
full-precision model, the fine-tuning / AdaRound batches and the random
allocations, so methods compared within one seed share everything but the
bits. Random allocations count once per seed (the mean of that seed's
draws) in the paired tests.
"""
from __future__ import annotations

from typing import Dict, List

import numpy as np

from .stats import paired, summary


def method_family(name: str) -> str:
    """'random3' -> 'random'; other names are their own family."""
    return "random" if name.startswith("random") else name


def per_seed_accuracy(report: dict) -> Dict[str, float]:
    """One accuracy per method family for one seed (random: mean of draws)."""
    grouped: Dict[str, List[float]] = {}
    for result in report["results"]:
        grouped.setdefault(method_family(result["method"]), []).append(result["accuracy"])
    return {family: float(np.mean(values)) for family, values in grouped.items()}


def aggregate(reports: List[dict]) -> dict:
    """Tables over seeds from a list of per-seed reports of one setting."""
    if not reports:
        raise ValueError("reports must hold at least one per-seed report")
    settings = {(r["model"], r["mode"], round(r["budget_mb"], 9)) for r in reports}
    if len(settings) != 1:
        raise ValueError(f"reports mix settings (model, mode, budget): {sorted(settings)}")
    per_seed = [per_seed_accuracy(r) for r in reports]
    families = [f for f in ("csmpq", "uniform", "hessian", "random") if all(f in s for s in per_seed)]
    methods = {}
    for family in families:
        sizes = [res["size_mb"] for r in reports for res in r["results"] if method_family(res["method"]) == family]
        bops_values = [res["bops"] for r in reports for res in r["results"] if method_family(res["method"]) == family]
        draws = [res["accuracy"] for r in reports for res in r["results"] if method_family(res["method"]) == family]
        methods[family] = dict(accuracy=summary([s[family] for s in per_seed]),
                               all_draws=summary(draws),
                               per_seed=[s[family] for s in per_seed],
                               size_mb=summary(sizes), budget_used=float(np.mean(sizes)) / reports[0]["budget_mb"],
                               min_budget_used=float(np.min(sizes)) / reports[0]["budget_mb"],
                               bops=summary(bops_values))
    comparisons = {}
    if len(reports) >= 2:
        for baseline in families:
            if baseline != "csmpq":
                comparisons[f"csmpq-{baseline}"] = paired(methods["csmpq"]["per_seed"], methods[baseline]["per_seed"])
    timing = {key: summary([r[key] for r in reports]) for key in
              ("score_seconds", "score_seconds_warm", "solve_seconds", "hessian_seconds", "hessian_solve_seconds")
              if all(key in r for r in reports)}
    fp = summary([r["fp_accuracy"] for r in reports])
    first = reports[0]
    return dict(model=first["model"], mode=first["mode"], width=first["width"], data=first["data"],
                budget_mb=first["budget_mb"], budget_fraction_of_8bit=first.get("budget_fraction_of_8bit"),
                seeds=[r["seed"] for r in reports], fp_accuracy=fp, methods=methods, comparisons=comparisons,
                timing=timing, settings=first["settings"])


def table(summary_report: dict) -> str:
    """The Markdown table of the aggregate: method, accuracy mean ± std over
    seeds, budget used, BOPs."""
    lines = ["| allocation | accuracy (mean ± std over seeds) | per seed | size (MB) | budget used | BOPs (G) |",
             "|---|---|---|---|---|---|"]
    fp = summary_report["fp_accuracy"]
    for name, m in summary_report["methods"].items():
        acc = m["accuracy"]
        label = name + (f" (mean of {m['all_draws']['n'] // acc['n']} draws per seed)" if name == "random" else "")
        seeds = ", ".join(f"{100 * a:.1f}" for a in m["per_seed"])
        lines.append(f"| {label} | {100 * acc['mean']:.2f} % ± {100 * acc['std']:.2f} | {seeds} | "
                     f"{m['size_mb']['mean']:.4f} | {100 * m['budget_used']:.1f} % (min {100 * m['min_budget_used']:.1f} %) | "
                     f"{m['bops']['mean'] / 1e9:.3f} |")
    lines.append(f"| full precision | {100 * fp['mean']:.2f} % ± {100 * fp['std']:.2f} | | | | |")
    return "\n".join(lines)


def comparison_table(summary_report: dict) -> str:
    lines = ["| CSMPQ minus | mean difference (points) | 95 % CI | paired t p | Wilcoxon p | wins/ties/losses |",
             "|---|---|---|---|---|---|"]
    for name, c in summary_report["comparisons"].items():
        lines.append(f"| {name.split('-', 1)[1]} | {100 * c['mean_difference']:+.2f} | "
                     f"[{100 * c['ci_low']:+.2f}, {100 * c['ci_high']:+.2f}] | {c['t_test_p']:.3f} | "
                     f"{c['wilcoxon_p']:.3f} | {c['wins']}/{c['ties']}/{c['losses']} |")
    return "\n".join(lines)


def timing_table(summary_report: dict) -> str:
    """Search cost per seed (mean ± std over seeds): CSMPQ's score and
    integer program against the Hessian-trace sensitivity and its program."""
    t = summary_report["timing"]
    lines = ["| step | seconds (mean ± std over seeds) |", "|---|---|"]
    names = dict(score_seconds="CSMPQ scores, first call (compilation included)",
                 score_seconds_warm="CSMPQ scores, compiled", solve_seconds="CSMPQ integer program",
                 hessian_seconds="Hessian traces (Hutchinson) + perturbations", hessian_solve_seconds="Hessian integer program")
    for key, label in names.items():
        if key in t:
            lines.append(f"| {label} | {t[key]['mean']:.3f} ± {t[key]['std']:.3f} |")
    return "\n".join(lines)


def plot(path: str, summary_report: dict) -> None:
    """Accuracy per method: each seed's value (dots, random: the seed's mean
    of draws) and mean ± std (bar and error bar)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary_report["methods"])
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 3.6))
    for i, name in enumerate(names):
        m = summary_report["methods"][name]
        ax.bar(i, 100 * m["accuracy"]["mean"], yerr=100 * m["accuracy"]["std"], color="#9ecae1", capsize=4)
        ax.plot([i] * len(m["per_seed"]), 100 * np.asarray(m["per_seed"]), "k.", alpha=0.7)
    low = min(min(m["per_seed"]) for m in summary_report["methods"].values())
    ax.set_ylim(max(0.0, 100 * low - 3), 100 * max(max(m["per_seed"]) for m in summary_report["methods"].values()) + 1)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{summary_report['model']} {summary_report['mode'].upper()}, {summary_report['budget_mb']:.3f} MB, "
                 f"{len(summary_report['seeds'])} seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
