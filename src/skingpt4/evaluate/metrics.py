"""Diagnostic metrics with bootstrap intervals, by skin type, plus consistency, latency and calibration.

Every scalar comes as ``{"value": x, "ci": [lo, hi]}``. The interval is a seeded percentile bootstrap over cases:
each replicate redraws the rows with replacement. A replicate is written as a vector of draw counts (how many
times each row was drawn), so one matrix product scores all replicates at once instead of a thousand calls per
metric. With all counts set to one, the same code gives the point estimate, so values and intervals can never
disagree on a definition.

Conventions, chosen to match the ISIC challenge scorer (``isic-challenge-scoring``):

- An unmatched prediction (``None``) counts as wrong for the true class and is predicted for no class.
- Balanced accuracy is the mean per-class recall over the classes present in the truth.
- One-vs-rest AUROC is the Mann-Whitney probability that a positive outscores a negative, ties counting one half
  (as ``sklearn.metrics.roc_auc_score``). It is given for the classes with both positives and negatives, and the
  macro value is their mean.
- From probabilities, ties count against the model: the true label is in the top k only if fewer than k labels
  score at least as high. Top-1 then matches the scorer's argmax, where a tie at the maximum is "undecided".

A metric that is undefined (a precision with no predictions of that class, say) is ``None``. In a replicate it
is left out of the percentiles.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
from sklearn.metrics import confusion_matrix

from skingpt4.errors import InputError

SKIN_GROUPS = {"I-II": (1, 2), "III-IV": (3, 4), "V-VI": (5, 6)}
UNKNOWN = "unknown"
UNMATCHED = "unmatched"
GROUP_METRICS = ("accuracy", "balanced_accuracy", "auroc_macro")
_CELLS_PER_CHUNK = 4_000_000  # replicates x rows held at once; bounds memory on large sets


# ---------------------------------------------------------------------------------------------------------------
# Encoding rows


def encode_rows(rows: list[dict], labels: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Truth and prediction as label indices (-1 = unmatched), and a row x label score matrix if all rows have one."""
    if not rows:
        raise InputError("no cases to evaluate: the prediction set is empty")
    index = {label: i for i, label in enumerate(labels)}
    if len(index) != len(labels):
        raise InputError("the label set has duplicates")
    unknown = sorted({str(r["label"]) for r in rows if r["label"] not in index})
    if unknown:
        raise InputError(f"true labels missing from the label set: {', '.join(unknown[:10])}")
    bad = sorted(
        {str(r["prediction"]) for r in rows if r.get("prediction") is not None and r["prediction"] not in index}
    )
    if bad:
        raise InputError(f"predictions outside the label set (map them to None for unmatched): {', '.join(bad[:10])}")
    y = np.array([index[r["label"]] for r in rows])
    pred = np.array([-1 if r.get("prediction") is None else index[r["prediction"]] for r in rows])
    # Probabilities exist in choice mode only; a mixed set is scored as if none had them rather than half-ranked.
    if all(r.get("probs") is not None for r in rows):
        scores = np.array([[float(r["probs"].get(label, 0.0)) for label in labels] for r in rows])
    else:
        scores = None
    return y, pred, scores


def skin_group(value) -> str:
    """A type 1-6, or a group name itself (sets like DDI record only the group)."""
    if value is None:
        return UNKNOWN
    for name, types in SKIN_GROUPS.items():
        if value in types or value == name:
            return name
    raise InputError(f"Fitzpatrick skin type must be 1-6, a group (I-II, III-IV, V-VI) or missing, not {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Scores for a batch of replicates: W is (replicates x rows) of draw counts


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    # nanmean warns on all-NaN slices; an all-undefined replicate is simply undefined.
    defined = ~np.isnan(a)
    total = np.where(defined, a, 0).sum(axis=axis)
    return _ratio(total, defined.sum(axis=axis).astype(float))


def _auroc(W: np.ndarray, positive: np.ndarray, score: np.ndarray) -> np.ndarray:
    """Weighted Mann-Whitney AUROC per replicate: P(positive outscores negative), ties one half."""
    order = np.argsort(score, kind="stable")
    ranked = score[order]
    starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])  # first row of each distinct score
    drawn = W.T[order]  # rows x replicates: summing along rows is the fast direction for reduceat and cumsum
    is_pos = positive[order, None]
    pos = np.add.reduceat(drawn * is_pos, starts, axis=0)  # distinct scores (ascending) x replicates
    neg = np.add.reduceat(drawn * ~is_pos, starts, axis=0)
    neg_below = np.cumsum(neg, axis=0) - neg
    wins = (pos * (neg_below + 0.5 * neg)).sum(axis=0)
    return _ratio(wins, pos.sum(axis=0) * neg.sum(axis=0))


def replicate_scores(
    W: np.ndarray, y: np.ndarray, pred: np.ndarray, scores: np.ndarray | None, n_labels: int, top_k
) -> dict:
    """Every metric for each replicate (row of W); keys name the metric, per-class ones hold (replicates x labels)."""
    truth = np.eye(n_labels)[y]  # one-hot rows x labels
    predicted = np.zeros((len(y), n_labels))
    matched = pred >= 0
    predicted[matched, pred[matched]] = 1
    n = W.sum(axis=1)
    support = W @ truth
    n_pred = W @ predicted
    tp = W @ (truth * predicted)
    recall = _ratio(tp, support)
    out = {
        "accuracy": tp.sum(axis=1) / n,
        "unmatched": W @ (~matched).astype(float) / n,
        "balanced_accuracy": _nanmean(recall, axis=1),
        "precision": _ratio(tp, n_pred),
        "recall": recall,
        "f1": _ratio(2 * tp, n_pred + support),
    }
    if scores is not None:
        true_score = scores[np.arange(len(y)), y][:, None]
        rank = (scores >= true_score).sum(axis=1)  # 1 + labels tied with or above the truth: ties count against
        for k in top_k:
            if k <= n_labels:
                out[f"top_{k}"] = W @ (rank <= k).astype(float) / n
        auroc = np.column_stack([_auroc(W, y == c, scores[:, c]) for c in range(n_labels)])
        out["auroc"] = auroc
        out["auroc_macro"] = _nanmean(auroc, axis=1)
    return out


def _replicates(y, pred, scores, n_labels: int, top_k, n_boot: int, rng: np.random.Generator) -> dict:
    """Scores for n_boot bootstrap replicates, drawn in chunks so that memory stays bounded."""
    n = len(y)
    chunk = max(1, _CELLS_PER_CHUNK // n)
    parts = []
    for start in range(0, n_boot, chunk):
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=min(chunk, n_boot - start)).astype(float)
        parts.append(replicate_scores(W, y, pred, scores, n_labels, top_k))
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]} if parts else {}


# ---------------------------------------------------------------------------------------------------------------
# From arrays to JSON


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


def interval(value, reps: np.ndarray | None, ci: float) -> dict:
    """{"value", "ci"}: percentile interval over the replicates where the metric is defined."""
    out = {"value": _num(value), "ci": None}
    if reps is not None:
        defined = reps[~np.isnan(reps)]
        if out["value"] is not None and defined.size:
            tail = 100 * (1 - ci) / 2
            out["ci"] = [float(v) for v in np.percentile(defined, [tail, 100 - tail])]
    return out


class _Estimates:
    """Point estimates and bootstrap replicates of one set of rows, with accessors that yield JSON intervals."""

    def __init__(self, y, pred, scores, n_labels, top_k, n_boot, rng, ci):
        self.n = len(y)
        self.ci = ci
        self.point = {
            k: v[0] for k, v in replicate_scores(np.ones((1, len(y))), y, pred, scores, n_labels, top_k).items()
        }
        self.reps = _replicates(y, pred, scores, n_labels, top_k, n_boot, rng) if n_boot > 0 else {}

    def get(self, key: str, column: int | None = None) -> dict:
        value, reps = self.point[key], self.reps.get(key)
        if column is not None:
            value, reps = value[column], None if reps is None else reps[:, column]
        return interval(value, reps, self.ci)


# ---------------------------------------------------------------------------------------------------------------
# The public entry points


def evaluate_predictions(
    rows: list[dict], labels: list[str], *, top_k=(1, 3, 5), n_boot: int = 1000, seed: int = 0, ci: float = 0.95
) -> dict:
    """All metrics of one prediction set; the dict is JSON-serialisable (it is ``metrics.json``).

    rows: {"label": true label (in labels), "prediction": a label or None (unmatched), "probs": {label: p} or None
    (choice mode), "fitzpatrick": 1-6 or None}. With n_boot=0 the intervals are None.
    """
    labels = list(labels)
    y, pred, scores = encode_rows(rows, labels)
    groups = np.array([skin_group(r.get("fitzpatrick")) for r in rows])
    est = _Estimates(y, pred, scores, len(labels), top_k, n_boot, np.random.default_rng(seed), ci)
    out = {
        "n": len(rows),
        "labels": labels,
        "has_probs": scores is not None,
        "bootstrap": {"n_boot": n_boot, "seed": seed, "ci": ci, "method": "percentile bootstrap over cases"},
        "unmatched": {"count": int((pred < 0).sum()), "share": est.get("unmatched")},
        "accuracy": est.get("accuracy"),
        "balanced_accuracy": est.get("balanced_accuracy"),
        "per_class": _per_class(est, y, labels),
        "confusion": _confusion(y, pred, labels),
    }
    if scores is not None:
        out["top_k"] = {key[4:]: est.get(key) for key in est.point if key.startswith("top_")}
        out["auroc"] = {
            "per_class": {label: est.get("auroc", c) for c, label in enumerate(labels) if _both_classes(y, c)},
            "macro": est.get("auroc_macro"),
        }
    out["by_skin_type"] = _by_skin_type(y, pred, scores, groups, labels, n_boot, seed, ci)
    return out


def _both_classes(y: np.ndarray, c: int) -> bool:
    return 0 < int((y == c).sum()) < len(y)


def _per_class(est: _Estimates, y: np.ndarray, labels: list[str]) -> dict:
    return {
        label: {
            "support": int((y == c).sum()),
            **{metric: est.get(metric, c) for metric in ("precision", "recall", "f1")},
        }
        for c, label in enumerate(labels)
    }


def _confusion(y: np.ndarray, pred: np.ndarray, labels: list[str]) -> dict:
    """Rows are the truth, columns the prediction; the last row and column are "unmatched" (its row stays zero)."""
    n = len(labels)
    matrix = confusion_matrix(y, np.where(pred < 0, n, pred), labels=list(range(n + 1)))
    return {"labels": [*labels, UNMATCHED], "matrix": matrix.tolist()}


def _by_skin_type(y, pred, scores, groups, labels, n_boot, seed, ci) -> dict:
    """Core metrics per Fitzpatrick group (each group resampled on its own), and the best-minus-worst gap."""
    found = {}
    for i, name in enumerate([*SKIN_GROUPS, UNKNOWN]):
        mask = groups == name
        if mask.any():
            sub_scores = None if scores is None else scores[mask]
            rng = np.random.default_rng([seed, i + 1])  # a stream per group, independent of the overall one
            found[name] = _Estimates(y[mask], pred[mask], sub_scores, len(labels), (), n_boot, rng, ci)
    result = {name: _group_summary(est) for name, est in found.items()}
    known = {name: est for name, est in found.items() if name != UNKNOWN}
    return {"groups": result, "gap": {m: g for m in GROUP_METRICS if (g := _gap(known, m, ci)) is not None}}


def _group_summary(est: _Estimates) -> dict:
    out = {"n": est.n, "accuracy": est.get("accuracy"), "balanced_accuracy": est.get("balanced_accuracy")}
    if "auroc_macro" in est.point and not math.isnan(est.point["auroc_macro"]):
        out["auroc_macro"] = est.get("auroc_macro")
    return out


def _gap(groups: dict, metric: str, ci: float) -> dict | None:
    """Best minus worst group. Best and worst are fixed from the point estimates, and the interval is over their
    independent replicates, so it can include zero (a max-minus-min per replicate could never be below zero)."""
    values = {name: est.point[metric] for name, est in groups.items() if not math.isnan(est.point.get(metric, np.nan))}
    if len(values) < 2:
        return None
    best, worst = max(values, key=values.get), min(values, key=values.get)
    reps = None
    if metric in groups[best].reps:
        reps = groups[best].reps[metric] - groups[worst].reps[metric]
    return {**interval(values[best] - values[worst], reps, ci), "best": best, "worst": worst}


def consistency(runs: list[list[str | None]], *, n_boot: int = 1000, seed: int = 0, ci: float = 0.95) -> dict:
    """Agreement of K repeated answers per case (the paper's consistency ratio, Fig. 4c).

    ``ratio`` (the headline): per case, the share of its K answers equal to its most frequent answer, averaged
    over cases. ``pairwise``: per case, the share of its K(K-1)/2 answer pairs that agree, averaged over cases.
    An unmatched answer (None) agrees with nothing. The paper gives 93.73% for 45 cases x 10 runs without a
    definition. With that design the modal ratio moves in steps of 1/450 and cannot be 93.73% (421/450 = 93.56%,
    422/450 = 93.78%). The pairwise one can (1898/2025 = 93.728%), so both are reported. Intervals resample cases.
    """
    if not runs:
        raise InputError("no cases for consistency")
    if any(len(answers) < 2 for answers in runs):
        raise InputError("consistency needs at least two runs per case")
    modal, pairwise = [], []
    for answers in runs:
        counts = Counter(a for a in answers if a is not None)
        k = len(answers)
        modal.append(max(counts.values(), default=0) / k)
        pairwise.append(sum(c * (c - 1) for c in counts.values()) / (k * (k - 1)))
    per_case = np.column_stack([modal, pairwise])
    rng = np.random.default_rng(seed)
    reps = None
    if n_boot > 0:
        n = len(runs)
        W = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)
        reps = W @ per_case / n
    sizes = sorted({len(a) for a in runs})
    return {
        "n_cases": len(runs),
        "runs_per_case": sizes[0] if len(sizes) == 1 else sizes,
        "ratio": interval(per_case[:, 0].mean(), None if reps is None else reps[:, 0], ci),
        "pairwise": interval(per_case[:, 1].mean(), None if reps is None else reps[:, 1], ci),
        "all_agree": sum(m == 1.0 for m in modal) / len(runs),
        "definition": "ratio: share of a case's runs giving its most frequent answer, averaged over cases; "
        "pairwise: share of agreeing run pairs, averaged over cases; unmatched answers agree with nothing",
    }


def latency(seconds: list[float]) -> dict:
    """Median, 95th percentile (numpy's linear interpolation) and mean of per-case seconds."""
    if not seconds:
        return {"n": 0, "p50": None, "p95": None, "mean": None}
    s = np.asarray(seconds, dtype=float)
    return {
        "n": len(s),
        "p50": float(np.percentile(s, 50)),
        "p95": float(np.percentile(s, 95)),
        "mean": float(s.mean()),
    }


def calibration(rows: list[dict], *, n_bins: int = 10) -> dict | None:
    """Reliability of the top probability: rows with probs are binned by confidence = max prob (equal-width bins,
    the last one closed); correct = the top label is the truth, a tie at the top counting as wrong. ECE is the
    case-weighted mean of |accuracy - confidence| over bins. None when no row has probabilities."""
    scored = [r for r in rows if r.get("probs")]
    if not scored:
        return None
    conf, correct = [], []
    for r in scored:
        top = max(r["probs"].values())
        winners = [label for label, p in r["probs"].items() if p == top]
        conf.append(float(top))
        correct.append(winners == [r["label"]])
    conf_a, correct_a = np.array(conf), np.array(correct, dtype=float)
    which = np.minimum((conf_a * n_bins).astype(int), n_bins - 1)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        acc = float(correct_a[mask].mean()) if count else None
        mean_conf = float(conf_a[mask].mean()) if count else None
        if count:
            ece += count / len(scored) * abs(acc - mean_conf)
        bins.append({"lo": b / n_bins, "hi": (b + 1) / n_bins, "n": count, "confidence": mean_conf, "accuracy": acc})
    return {"n": len(scored), "bins": bins, "ece": ece}
