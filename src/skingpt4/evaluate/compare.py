"""Models head to head on the same images (`eval --model A --model B [--model C]`): paired differences with
bootstrap intervals, McNemar's exact test, and each model's fairness across skin-type groups.

Pairs are the same image answered by both models (the first repeat of each; images one model lacks are left out
and counted). For each pair of models, overall and per Fitzpatrick group:
- the difference in accuracy and in balanced accuracy (first model minus second), with a paired percentile
  bootstrap: each replicate redraws the images with replacement and scores both models on the same draw
  (`metrics.replicate_scores`, the definitions of metrics.json), so the interval reflects that both answered the
  same cases;
- McNemar's exact test on the discordant images (first right and second wrong, and the reverse): the two-sided
  exact binomial p-value of the smaller count among the discordant ones at one half.
Each model's fairness: its accuracy per known skin-type group, the gap (largest minus smallest) and DermoBench's
fairness score, 1 - (max - min) / max. An unmatched answer counts as wrong, as in metrics.json; label matching
(synonyms) was applied to every model's answers alike when they were scored.
"""

from __future__ import annotations

import json
from itertools import combinations
from pathlib import Path

import numpy as np
from scipy.stats import binomtest

from skingpt4.errors import InputError
from skingpt4.evaluate.metrics import SKIN_GROUPS, UNKNOWN, encode_rows, interval, replicate_scores, skin_group

PAIRED_METRICS = ("accuracy", "balanced_accuracy")


def compare(runs: dict[str, list[dict]], labels: list[str], *, n_boot: int = 1000, seed: int = 0, ci=0.95) -> dict:
    """The comparison of several models' prediction rows (as `evaluate_predictions` takes them, with "image";
    "repeat" 0 is used); JSON-serialisable (comparison.json)."""
    names = list(runs)
    rows = {name: {r["image"]: r for r in runs[name] if r.get("repeat", 0) == 0} for name in names}
    shared = sorted(set.intersection(*(set(r) for r in rows.values())))
    aligned = {name: [rows[name][image] for image in shared] for name in names}
    first = aligned[names[0]]
    y = encode_rows(first, labels)[0]
    preds = {name: encode_rows(aligned[name], labels)[1] for name in names}
    groups = np.array([skin_group(r.get("fitzpatrick")) for r in first])
    subsets = {"all": np.ones(len(shared), dtype=bool)}
    subsets.update({g: groups == g for g in [*SKIN_GROUPS, UNKNOWN] if (groups == g).any()})
    pairs = []
    for i, (a, b) in enumerate(combinations(names, 2)):
        found = {}
        for j, (subset, mask) in enumerate(subsets.items()):
            rng = np.random.default_rng([seed, i, j])
            found[subset] = paired(y[mask], preds[a][mask], preds[b][mask], len(labels), n_boot, rng, ci)
        pairs.append({"models": [a, b], "by_subset": found})
    return {
        "models": names,
        "n": len(shared),
        "left_out": {name: len(rows[name]) - len(shared) for name in names},
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": ci, "method": "paired percentile bootstrap over images"},
        "fairness": {name: fairness(y, preds[name], groups) for name in names},
        "pairs": pairs,
    }


def paired(y: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, n_labels: int, n_boot: int, rng, ci) -> dict:
    """Model A against model B on the same images: each one's accuracy and balanced accuracy, the differences
    (A - B) with paired bootstrap intervals, and McNemar's exact test."""

    def scored(W):  # both models on the same draws
        return [replicate_scores(W, y, pred, None, n_labels, ()) for pred in (pred_a, pred_b)]

    point_a, point_b = scored(np.ones((1, len(y))))
    reps = scored(rng.multinomial(len(y), np.full(len(y), 1 / len(y)), size=n_boot).astype(float)) if n_boot else None
    out = {"n": len(y)}
    for metric in PAIRED_METRICS:
        diffs = None if reps is None else reps[0][metric] - reps[1][metric]
        out[metric] = {
            "a": float(point_a[metric][0]),
            "b": float(point_b[metric][0]),
            "difference": interval(point_a[metric][0] - point_b[metric][0], diffs, ci),
        }
    out["mcnemar"] = mcnemar(pred_a == y, pred_b == y)
    return out


def mcnemar(right_a: np.ndarray, right_b: np.ndarray) -> dict:
    """McNemar's exact test: `a_only` images only A got right, `b_only` only B; two-sided exact binomial p."""
    a_only, b_only = int((right_a & ~right_b).sum()), int((~right_a & right_b).sum())
    p = binomtest(min(a_only, b_only), a_only + b_only, 0.5).pvalue if a_only + b_only else 1.0
    return {"a_only": a_only, "b_only": b_only, "p_value": float(p)}


def fairness(y: np.ndarray, pred: np.ndarray, groups: np.ndarray) -> dict:
    """Accuracy overall and per known skin-type group, the gap (largest minus smallest) and DermoBench's score
    1 - gap / max."""
    accuracy = {g: float((pred[groups == g] == y[groups == g]).mean()) for g in SKIN_GROUPS if (groups == g).any()}
    out = {"accuracy": float((pred == y).mean()), "accuracy_by_group": accuracy, "gap": None}
    out["dermobench_fairness"] = None
    if len(accuracy) >= 2:
        top, bottom = max(accuracy.values()), min(accuracy.values())
        out["gap"] = top - bottom
        out["dermobench_fairness"] = 1 - (top - bottom) / top if top > 0 else None
    return out


def head_to_head(folders: dict[str, Path], out: Path, n_boot: int) -> str:
    """Compare the models evaluated into `folders` (name -> that model's `eval` output folder, same manifest and
    label set): comparison.json, comparison.md and comparison.png in `out`; returns the summary table."""
    from skingpt4.evaluate.run import PredictionFile

    runs, labels, seed = {}, None, 0
    for name, folder in folders.items():
        config = json.loads((folder / "run.json").read_text(encoding="utf-8"))
        if labels is not None and config["labels"] != labels:
            raise InputError(f"{folder}: another label set than the first model's; compare runs on one label set")
        labels, seed = config["labels"], config["seed"]
        latest = PredictionFile(folder / "predictions.jsonl").latest().values()
        runs[name] = [r for r in latest if not r.get("error") and r.get("label") is not None]
    result = compare(runs, labels, n_boot=n_boot, seed=seed)
    (out / "comparison.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(result)
    (out / "comparison.md").write_text(table, encoding="utf-8")
    plot(result, {name: folder / "metrics.json" for name, folder in folders.items()}, out / "comparison.png")
    return table


def _cell(entry: dict) -> str:
    low_high = f" [{entry['ci'][0]:+.3f}, {entry['ci'][1]:+.3f}]" if entry.get("ci") else ""
    return f"{entry['value']:+.3f}{low_high}"


def markdown(result: dict) -> str:
    """The comparison as Markdown tables: each model, then each pair overall and by skin-type group."""
    lines = [f"# Models head to head ({result['n']} images answered by every model)", ""]
    lines += ["| model | accuracy | skin-type gap (max - min) | DermoBench fairness |", "|---|---|---|---|"]
    for name in result["models"]:
        fair = result["fairness"][name]
        gap = "-" if fair["gap"] is None else f"{fair['gap']:.3f}"
        score = "-" if fair["dermobench_fairness"] is None else f"{fair['dermobench_fairness']:.3f}"
        lines.append(f"| {name} | {fair['accuracy']:.3f} | {gap} | {score} |")
    head = ("A vs B", "images", "accuracy A - B [95% CI]", "balanced accuracy A - B", "A only right", "B only right")
    lines += ["", "| " + " | ".join([*head, "McNemar exact p"]) + " |", "|---" * (len(head) + 1) + "|"]
    for pair in result["pairs"]:
        a, b = pair["models"]
        for subset, found in pair["by_subset"].items():
            m = found["mcnemar"]
            lines.append(
                f"| {a} vs {b} ({subset}) | {found['n']} | {_cell(found['accuracy']['difference'])} | "
                f"{_cell(found['balanced_accuracy']['difference'])} | {m['a_only']} | {m['b_only']} | "
                f"{m['p_value']:.4g} |"
            )
    return "\n".join(lines) + "\n"


def plot(result: dict, metrics_files: dict[str, Path], path: Path) -> None:
    """Each model's accuracy per skin-type group side by side, with its own bootstrap interval (metrics.json)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = [g for g in SKIN_GROUPS if any(g in result["fairness"][m]["accuracy_by_group"] for m in metrics_files)]
    width = 0.8 / len(metrics_files)
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for i, (name, file) in enumerate(metrics_files.items()):
        by_group = json.loads(file.read_text(encoding="utf-8")).get("by_skin_type", {}).get("groups", {})
        values, errors = [], [[], []]
        for group in groups:
            entry = by_group.get(group, {}).get("accuracy") or {"value": float("nan"), "ci": None}
            values.append(entry["value"])
            low, high = entry["ci"] or (entry["value"], entry["value"])
            errors[0].append(entry["value"] - low)
            errors[1].append(high - entry["value"])
        ax.bar(np.arange(len(groups)) + i * width, values, width, yerr=errors, capsize=3, label=name)
    ax.set_xticks(np.arange(len(groups)) + width * (len(metrics_files) - 1) / 2, [f"Fitzpatrick {g}" for g in groups])
    ax.set_ylabel("accuracy (95% CI)")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
