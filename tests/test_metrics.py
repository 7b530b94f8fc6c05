"""Metrics against hand-computed values, sklearn, a brute-force Mann-Whitney count and the ISIC challenge scorer."""

from __future__ import annotations

import json
import warnings
from itertools import product

import numpy as np
import pandas as pd
import pytest
from isic_challenge_scoring import metrics as isic_metrics
from isic_challenge_scoring.classification import ClassificationMetric, ClassificationScore
from sklearn.metrics import balanced_accuracy_score, precision_recall_fscore_support, roc_auc_score

from skingpt4.errors import InputError
from skingpt4.evaluate.metrics import calibration, consistency, evaluate_predictions, latency

# Open mode, labels A-D; D is never the truth. (true label, answer, Fitzpatrick type)
OPEN = [
    ("A", "A", 1),
    ("A", "A", 2),
    ("A", None, 3),
    ("A", None, 5),
    ("B", "B", 1),
    ("B", "B", 4),
    ("B", "A", 6),
    ("C", "C", 2),
    ("C", "D", None),
    ("C", "C", 3),
    ("C", "C", 6),
]
LABELS = ["A", "B", "C", "D"]

# Choice mode, labels A-C: (truth, probabilities of A, B, C). Row 2 ties B/C at the top, row 3 ties A/B.
CHOICE = [
    ("A", (0.6, 0.3, 0.1)),
    ("A", (0.2, 0.4, 0.4)),
    ("B", (0.4, 0.4, 0.2)),
    ("B", (0.1, 0.7, 0.2)),
    ("C", (0.3, 0.3, 0.4)),
    ("C", (0.5, 0.1, 0.4)),
]


def open_rows():
    return [{"label": t, "prediction": p, "probs": None, "fitzpatrick": f} for t, p, f in OPEN]


def choice_rows(labels=("A", "B", "C")):
    rows = []
    for truth, probs in CHOICE:
        p = dict(zip(labels, probs))
        top = [k for k, v in p.items() if v == max(probs)]
        rows.append({"label": truth, "prediction": top[0] if len(top) == 1 else None, "probs": p, "fitzpatrick": None})
    return rows


@pytest.fixture(scope="module")
def open_metrics():
    return evaluate_predictions(open_rows(), LABELS, n_boot=200, seed=1)


def test_accuracy_unmatched_and_balanced_accuracy_by_hand(open_metrics):
    m = open_metrics
    assert m["n"] == 11
    # Correct: rows 1, 2, 5, 6, 8, 10, 11 -> 7 of 11; the two unmatched (rows 3, 4) count as wrong.
    assert m["accuracy"]["value"] == pytest.approx(7 / 11)
    assert m["unmatched"]["count"] == 2
    assert m["unmatched"]["share"]["value"] == pytest.approx(2 / 11)
    # Recall A = 2/4, B = 2/3, C = 3/4; D is absent from the truth and left out: (1/2 + 2/3 + 3/4) / 3 = 23/36.
    assert m["balanced_accuracy"]["value"] == pytest.approx(23 / 36)
    assert "top_k" not in m and "auroc" not in m and m["has_probs"] is False


def test_per_class_precision_recall_f1_by_hand(open_metrics):
    pc = open_metrics["per_class"]
    # A: answered on rows 1, 2, 7 (TP 2) -> P 2/3; support 4 -> R 1/2; F1 = 2TP / (answered + support) = 4/7.
    assert pc["A"]["support"] == 4
    assert (pc["A"]["precision"]["value"], pc["A"]["recall"]["value"]) == pytest.approx((2 / 3, 1 / 2))
    assert pc["A"]["f1"]["value"] == pytest.approx(4 / 7)
    # B: answered on rows 5, 6 (both right) -> P 1; R 2/3; F1 = 4 / (2 + 3) = 0.8.
    assert (pc["B"]["precision"]["value"], pc["B"]["recall"]["value"], pc["B"]["f1"]["value"]) == pytest.approx(
        (1, 2 / 3, 0.8)
    )
    # C: answered on rows 8, 10, 11 (all right) -> P 1; R 3/4; F1 = 6 / (3 + 4) = 6/7.
    assert (pc["C"]["precision"]["value"], pc["C"]["recall"]["value"], pc["C"]["f1"]["value"]) == pytest.approx(
        (1, 3 / 4, 6 / 7)
    )
    # D: answered once, wrongly -> P 0; no support -> recall undefined; F1 = 0 / (1 + 0) = 0.
    assert pc["D"]["support"] == 0
    assert pc["D"]["precision"]["value"] == 0 and pc["D"]["f1"]["value"] == 0
    assert pc["D"]["recall"] == {"value": None, "ci": None}


def test_per_class_agrees_with_sklearn(open_metrics):
    truth = [t for t, _, _ in OPEN]
    answers = [p or "unmatched" for _, p, _ in OPEN]
    p, r, f, s = precision_recall_fscore_support(truth, answers, labels=LABELS, zero_division=np.nan)
    for i, label in enumerate(LABELS):
        c = open_metrics["per_class"][label]
        assert c["support"] == s[i]
        for ours, theirs in ((c["precision"], p[i]), (c["recall"], r[i]), (c["f1"], f[i])):
            assert (ours["value"] is None and np.isnan(theirs)) or ours["value"] == pytest.approx(theirs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "unmatched" is never a true class
        expected = balanced_accuracy_score(truth, answers)
    assert open_metrics["balanced_accuracy"]["value"] == pytest.approx(expected)


def test_confusion_matrix_by_hand(open_metrics):
    assert open_metrics["confusion"] == {
        "labels": ["A", "B", "C", "D", "unmatched"],
        "matrix": [
            [2, 0, 0, 0, 2],  # A: rows 1, 2 right; rows 3, 4 unmatched
            [1, 2, 0, 0, 0],  # B: row 7 answered A
            [0, 0, 3, 1, 0],  # C: row 9 answered D
            [0, 0, 0, 0, 0],
            [0, 0, 0, 0, 0],  # the truth is never "unmatched"
        ],
    }


def test_by_skin_type_and_gap_by_hand(open_metrics):
    by = open_metrics["by_skin_type"]
    g = by["groups"]
    assert list(g) == ["I-II", "III-IV", "V-VI", "unknown"]
    # I-II: rows 1, 2, 5, 8, all right.
    assert (g["I-II"]["n"], g["I-II"]["accuracy"]["value"], g["I-II"]["balanced_accuracy"]["value"]) == (4, 1, 1)
    # III-IV: rows 3 (A unmatched), 6 (B right), 10 (C right): accuracy 2/3; recall A 0, B 1, C 1 -> 2/3.
    assert g["III-IV"]["n"] == 3
    assert (g["III-IV"]["accuracy"]["value"], g["III-IV"]["balanced_accuracy"]["value"]) == pytest.approx((2 / 3,) * 2)
    # V-VI: rows 4 (A unmatched), 7 (B answered A), 11 (C right): 1/3 both ways.
    assert (g["V-VI"]["accuracy"]["value"], g["V-VI"]["balanced_accuracy"]["value"]) == pytest.approx((1 / 3,) * 2)
    # unknown: row 9, wrong.
    assert (g["unknown"]["n"], g["unknown"]["accuracy"]["value"]) == (1, 0)
    # Gap over the known groups only: 1 - 1/3 = 2/3, best I-II, worst V-VI ("unknown" is not a skin type).
    for metric in ("accuracy", "balanced_accuracy"):
        gap = by["gap"][metric]
        assert gap["value"] == pytest.approx(2 / 3)
        assert (gap["best"], gap["worst"]) == ("I-II", "V-VI")
        assert gap["ci"][0] <= gap["value"] <= gap["ci"][1]
    assert "auroc_macro" not in by["gap"]


def test_groups_without_cases_are_omitted():
    rows = [{"label": "A", "prediction": "A", "probs": None, "fitzpatrick": 6}] * 3
    by = evaluate_predictions(rows, ["A", "B"], n_boot=10)["by_skin_type"]
    assert list(by["groups"]) == ["V-VI"]
    assert by["gap"] == {}  # one group: no gap


def test_top_k_auroc_and_mann_whitney_by_hand():
    m = evaluate_predictions(choice_rows(), ["A", "B", "C"], top_k=(1, 2, 3, 5), n_boot=200)
    # Rank of the truth = labels scoring at least as high (ties count against):
    # rows 1-6 -> 1, 3, 2 (tie with A), 1, 1, 2. Top-1 = 3/6, top-2 = 5/6, top-3 = 1; top-5 > 3 labels is skipped.
    assert {k: v["value"] for k, v in m["top_k"].items()} == pytest.approx({"1": 0.5, "2": 5 / 6, "3": 1.0})
    # Top-1 equals accuracy because the predictions are the argmax (ties unmatched: rows 2, 3).
    assert m["accuracy"]["value"] == 0.5 and m["unmatched"]["count"] == 2
    # A: positives .6, .2 vs negatives .4, .1, .3, .5 -> .6 wins 4, .2 wins 1 -> 5/8.
    # B: positives .4, .7 vs negatives .3, .4, .3, .1 -> .4: 3 wins + 1 tie (3.5), .7: 4 -> 7.5/8.
    # C: positives .4, .4 vs negatives .1, .4, .2, .2 -> each 3 wins + 1 tie -> 7/8.
    expected = {"A": 5 / 8, "B": 7.5 / 8, "C": 7 / 8}
    auroc = m["auroc"]
    assert {k: v["value"] for k, v in auroc["per_class"].items()} == pytest.approx(expected)
    assert auroc["macro"]["value"] == pytest.approx((5 / 8 + 7.5 / 8 + 7 / 8) / 3)  # 0.8125
    for c, label in enumerate("ABC"):
        pos = [p[c] for t, p in CHOICE if t == label]
        neg = [p[c] for t, p in CHOICE if t != label]
        count = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in product(pos, neg))
        assert auroc["per_class"][label]["value"] == pytest.approx(count / (len(pos) * len(neg)))


def test_auroc_skips_classes_without_both_outcomes():
    rows = choice_rows(("A", "B", "C"))
    m = evaluate_predictions(rows, ["A", "B", "C", "D"], n_boot=20)  # D: no positives
    assert list(m["auroc"]["per_class"]) == ["A", "B", "C"]
    assert m["auroc"]["macro"]["value"] == pytest.approx(0.8125)


def _isic_frames(rows, labels):
    index = [f"ISIC_{i:07d}" for i in range(len(rows))]
    truth = pd.DataFrame([[float(r["label"] == c) for c in labels] for r in rows], columns=labels, index=index)
    probs = pd.DataFrame([[r["probs"][c] for c in labels] for r in rows], columns=labels, index=index)
    return truth, probs, pd.Series(1.0, index=index)


def _random_choice_rows(labels, n, seed, absent=()):
    rng = np.random.default_rng(seed)
    present = [c for c in labels if c not in absent]
    rows = []
    for _ in range(n):
        truth = present[rng.integers(len(present))]
        p = rng.dirichlet(np.ones(len(labels)))
        p[labels.index(truth)] += 0.5 * rng.random()
        p = np.round(p / p.sum(), 2)  # coarse values: ties, both in AUROC and at the top
        probs = dict(zip(labels, p.tolist()))
        top = [c for c in labels if probs[c] == max(probs.values())]
        rows.append({"label": truth, "prediction": top[0] if len(top) == 1 else None, "probs": probs})
    return rows


@pytest.mark.filterwarnings("ignore:The inplace keyword")  # the scorer's own pandas usage
def test_cross_check_with_isic_challenge_scorer():
    """The scorer takes one-hot truth and probability frames. Its balanced accuracy takes the argmax with a tie at
    the top as "undecided" (wrong), and averages recall over the truth's classes. We get the same by passing the
    argmax as the prediction, with None for a tie. Its AUC is roc_auc_score per category with unit weights."""
    labels = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = _random_choice_rows(labels, 300, seed=3)
    assert any(r["prediction"] is None for r in rows)  # the tie convention is exercised
    ours = evaluate_predictions(rows, labels, n_boot=0)
    truth, probs, weights = _isic_frames(rows, labels)
    score_weights = pd.DataFrame({"score_weight": weights, "validation_weight": weights})
    theirs = ClassificationScore(truth, probs, score_weights, ClassificationMetric.AUC)
    assert ours["balanced_accuracy"]["value"] == pytest.approx(theirs.aggregate["balanced_accuracy"], rel=1e-12)
    their_auc = theirs.per_category["auc"]
    for label in labels:
        assert ours["auroc"]["per_class"][label]["value"] == pytest.approx(their_auc[label], rel=1e-12)
    assert ours["auroc"]["macro"]["value"] == pytest.approx(theirs.macro_average["auc"], rel=1e-12)


def test_cross_check_with_isic_when_a_class_is_absent():
    # The full score object cannot take a class without positives (its AUC fails), so call its metric functions.
    labels = ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]
    rows = _random_choice_rows(labels, 200, seed=4, absent=("VASC",))
    ours = evaluate_predictions(rows, labels, n_boot=0)
    truth, probs, weights = _isic_frames(rows, labels)
    isic_bacc = isic_metrics.balanced_multiclass_accuracy(truth, probs, weights)
    assert ours["balanced_accuracy"]["value"] == pytest.approx(isic_bacc, rel=1e-12)
    assert "VASC" not in ours["auroc"]["per_class"]
    for label in labels[:-1]:
        their_auc = isic_metrics.auc(truth[label], probs[label], weights)
        assert ours["auroc"]["per_class"][label]["value"] == pytest.approx(their_auc, rel=1e-12)
        assert their_auc == pytest.approx(roc_auc_score(truth[label], probs[label]))


def test_bootstrap_equals_explicit_resampling():
    """Draw counts stand for resampled rows: the interval equals sklearn's balanced accuracy on resampled copies."""
    rows = open_rows()
    m = evaluate_predictions(rows, LABELS, n_boot=50, seed=7)
    n = len(rows)
    counts = np.random.default_rng(7).multinomial(n, np.full(n, 1 / n), size=50)  # the same draws, in order
    truth = np.array([t for t, _, _ in OPEN])
    answers = np.array([p or "unmatched" for _, p, _ in OPEN])
    with warnings.catch_warnings():  # sklearn notes that "unmatched" is never a true class: expected here
        warnings.simplefilter("ignore", UserWarning)
        values = [balanced_accuracy_score(np.repeat(truth, c), np.repeat(answers, c)) for c in counts]
    assert m["balanced_accuracy"]["ci"] == pytest.approx(list(np.percentile(values, [2.5, 97.5])))


def test_bootstrap_is_seeded_and_can_be_skipped(open_metrics):
    assert evaluate_predictions(open_rows(), LABELS, n_boot=200, seed=1) == open_metrics
    other = evaluate_predictions(open_rows(), LABELS, n_boot=200, seed=2)
    assert other["accuracy"]["value"] == open_metrics["accuracy"]["value"]
    assert other != open_metrics  # same values, other intervals (n=11 intervals are coarse, so compare all)
    assert other["balanced_accuracy"]["value"] == open_metrics["balanced_accuracy"]["value"]
    lo, hi = open_metrics["accuracy"]["ci"]
    assert 0 <= lo <= 7 / 11 <= hi <= 1
    assert evaluate_predictions(open_rows(), LABELS, n_boot=0)["accuracy"] == {"value": 7 / 11, "ci": None}
    json.dumps(open_metrics, allow_nan=False)  # metrics.json: plain JSON, no NaN


def test_interval_coverage_on_simulated_sets():
    """Many sets with a true accuracy of 0.7 (n=200): the 95% interval should cover 0.7 about 95% of the time."""
    rng = np.random.default_rng(2024)
    sims, n, covered = 200, 200, 0
    for s in range(sims):
        correct = rng.random(n) < 0.7
        rows = [{"label": "A", "prediction": "A" if ok else "B", "probs": None} for ok in correct]
        lo, hi = evaluate_predictions(rows, ["A", "B"], n_boot=300, seed=s)["accuracy"]["ci"]
        covered += lo <= 0.7 <= hi
    assert 0.90 <= covered / sims <= 0.99


def test_bad_input_gets_a_clear_message():
    with pytest.raises(InputError, match="empty"):
        evaluate_predictions([], LABELS)
    with pytest.raises(InputError, match="missing from the label set: Z"):
        evaluate_predictions([{"label": "Z", "prediction": "A"}], LABELS)
    with pytest.raises(InputError, match="outside the label set"):
        evaluate_predictions([{"label": "A", "prediction": "Q"}], LABELS)
    with pytest.raises(InputError, match="Fitzpatrick"):
        evaluate_predictions([{"label": "A", "prediction": "A", "fitzpatrick": 7}], LABELS)


def test_consistency_by_hand():
    runs = [["a"] * 10, ["a"] * 9 + ["b"], ["a"] * 5 + ["b"] * 5]
    c = consistency(runs, n_boot=200)
    # Modal share per case: 10/10, 9/10, 5/10 -> mean 0.8.
    assert c["ratio"]["value"] == pytest.approx(0.8)
    # Agreeing pairs of 45: 45, C(9,2) = 36, 2 C(5,2) = 20 -> (1 + 36/45 + 20/45) / 3.
    assert c["pairwise"]["value"] == pytest.approx((1 + 36 / 45 + 20 / 45) / 3)
    assert c["all_agree"] == pytest.approx(1 / 3) and c["n_cases"] == 3 and c["runs_per_case"] == 10
    assert c["ratio"]["ci"][0] <= 0.8 <= c["ratio"]["ci"][1]
    # An unmatched answer agrees with nothing: modal 1/3, no agreeing pair.
    c = consistency([["a", None, None]], n_boot=0)
    assert (c["ratio"]["value"], c["pairwise"]["value"]) == pytest.approx((1 / 3, 0))
    with pytest.raises(InputError):
        consistency([["a"]])


def test_paper_ratio_is_reachable_only_pairwise():
    # 45 cases x 10 runs: a modal ratio is m/450, and no m gives 93.73%.
    assert not any(round(100 * m / 450, 2) == 93.73 for m in range(451))
    # Pairwise: 33 unanimous cases, ten 9/1, one 8/2, one 7/3 -> (33*45 + 10*36 + 29 + 24) / 2025 = 1898/2025.
    runs = [["x"] * 10] * 33 + [["x"] * 9 + ["y"]] * 10 + [["x"] * 8 + ["y"] * 2] + [["x"] * 7 + ["y"] * 3]
    c = consistency(runs, n_boot=0)
    assert c["pairwise"]["value"] == pytest.approx(1898 / 2025)
    assert round(100 * c["pairwise"]["value"], 2) == 93.73
    assert c["ratio"]["value"] == pytest.approx(435 / 450)  # the same runs: 96.67% modal


def test_latency_by_hand():
    # numpy linear percentiles on 1, 2, 3, 4: p50 = 2.5; p95 at position 0.95 * 3 = 2.85 -> 3 + 0.85 = 3.85.
    assert latency([4.0, 1.0, 3.0, 2.0]) == pytest.approx({"n": 4, "p50": 2.5, "p95": 3.85, "mean": 2.5})
    assert latency([]) == {"n": 0, "p50": None, "p95": None, "mean": None}


def test_calibration_by_hand():
    cal = calibration(choice_rows())
    # Confidence (top prob) and correct (a tie at the top is wrong): .6 yes, .4 tie, .4 tie, .7 yes, .4 yes, .5 no.
    filled = [(b["lo"], b["n"], b["confidence"], b["accuracy"]) for b in cal["bins"] if b["n"]]
    expected = [(0.4, 3, 0.4, 1 / 3), (0.5, 1, 0.5, 0.0), (0.6, 1, 0.6, 1.0), (0.7, 1, 0.7, 1.0)]
    assert [pytest.approx(row) for row in expected] == filled
    # ECE = 3/6 |1/3 - .4| + 1/6 (.5 + .4 + .3) = 1/30 + 6/30 = 7/30.
    assert cal["ece"] == pytest.approx(7 / 30)
    assert calibration(open_rows()) is None
