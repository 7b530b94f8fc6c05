"""Models head to head (`evaluate/compare.py`, `eval --model A --model B`): paired statistics on constructed
predictions where the answer is known, checked against computations written here (McNemar's exact p summed by
hand from binomial coefficients; accuracies and balanced accuracies counted directly)."""

from __future__ import annotations

import json
from math import comb

import numpy as np
import pytest
from conftest import image_bytes

from skingpt4.cli.main import main
from skingpt4.evaluate.compare import compare

LABELS = ["eczema", "psoriasis"]


def rows(right: list[bool], skin: list[int]) -> list[dict]:
    """Prediction rows: image i is labelled alternately, predicted right where `right[i]`, else the other label."""
    out = []
    for i, (ok, fitzpatrick) in enumerate(zip(right, skin)):
        label = LABELS[i % 2]
        out.append(
            {
                "image": f"p{i}.png",
                "label": label,
                "prediction": label if ok else LABELS[1 - i % 2],
                "fitzpatrick": fitzpatrick,
            }
        )
    return out


def exact_mcnemar(a_only: int, b_only: int) -> float:
    """Two-sided exact binomial p by hand: twice the smaller tail at one half, at most 1."""
    n, k = a_only + b_only, min(a_only, b_only)
    return min(1.0, 2 * sum(comb(n, i) for i in range(k + 1)) / 2**n)


def balanced(right: list[bool]) -> float:
    """Mean recall of the two alternating classes."""
    return (np.mean(right[0::2]) + np.mean(right[1::2])) / 2


N = 240
SKIN = [1 + (i // 40) for i in range(N)]  # types 1..6, 40 images each: groups I-II, III-IV, V-VI of 80
A_RIGHT = [i % 4 != 0 for i in range(N)]  # 75% right
B_RIGHT = [i % 2 == 0 or i >= 160 for i in range(N)]  # 50% right on I-IV, all right on V-VI


def test_paired_differences_and_mcnemar_match_a_computation_by_hand():
    result = compare({"A": rows(A_RIGHT, SKIN), "B": rows(B_RIGHT, SKIN)}, LABELS, n_boot=2000, seed=1)
    (pair,) = result["pairs"]
    overall = pair["by_subset"]["all"]
    a_only = sum(a and not b for a, b in zip(A_RIGHT, B_RIGHT))
    b_only = sum(b and not a for a, b in zip(A_RIGHT, B_RIGHT))
    assert (overall["mcnemar"]["a_only"], overall["mcnemar"]["b_only"]) == (a_only, b_only) == (80, 60)
    assert overall["mcnemar"]["p_value"] == pytest.approx(exact_mcnemar(a_only, b_only), rel=1e-12)
    accuracy = overall["accuracy"]
    assert (accuracy["a"], accuracy["b"]) == (np.mean(A_RIGHT), np.mean(B_RIGHT))
    assert accuracy["difference"]["value"] == pytest.approx(np.mean(A_RIGHT) - np.mean(B_RIGHT), abs=1e-12)
    diff = overall["balanced_accuracy"]["difference"]
    assert diff["value"] == pytest.approx(balanced(A_RIGHT) - balanced(B_RIGHT), abs=1e-12)

    # I-IV: A 75% vs B 50%; a clear difference, its interval away from zero and around the truth
    first = pair["by_subset"]["I-II"]
    assert first["n"] == 80 and first["accuracy"]["difference"]["value"] == pytest.approx(0.25)
    low, high = first["accuracy"]["difference"]["ci"]
    assert 0 < low < 0.25 < high
    a, b = A_RIGHT[:80], B_RIGHT[:80]
    p = exact_mcnemar(sum(x and not y for x, y in zip(a, b)), sum(y and not x for x, y in zip(a, b)))
    assert first["mcnemar"]["p_value"] == pytest.approx(p, rel=1e-12) and p < 0.05
    # V-VI: B is always right, A 75%
    last = pair["by_subset"]["V-VI"]
    assert last["accuracy"]["difference"]["value"] == pytest.approx(-0.25) and last["mcnemar"]["a_only"] == 0


def test_the_paired_interval_is_narrower_than_the_unpaired_one_on_correlated_answers():
    """Two models right on nearly the same images: pairing cancels the shared case difficulty."""
    rng = np.random.default_rng(0)
    hard = rng.random(400) < 0.4
    a = [not h for h in hard]
    b = [not h or (i % 10 == 0) for i, h in enumerate(hard)]
    result = compare({"A": rows(a, [None] * 400), "B": rows(b, [None] * 400)}, LABELS, n_boot=2000)
    low, high = result["pairs"][0]["by_subset"]["all"]["accuracy"]["difference"]["ci"]
    unpaired = 2 * 1.96 * np.sqrt(2 * np.mean(a) * (1 - np.mean(a)) / 400)  # the width two independent samples give
    assert high - low < unpaired / 3


def test_fairness_gap_and_dermobench_score():
    result = compare({"A": rows(A_RIGHT, SKIN), "B": rows(B_RIGHT, SKIN)}, LABELS, n_boot=0)
    b = result["fairness"]["B"]
    assert b["accuracy_by_group"] == {"I-II": 0.5, "III-IV": 0.5, "V-VI": 1.0}
    assert b["gap"] == 0.5 and b["dermobench_fairness"] == pytest.approx(1 - 0.5 / 1.0)
    assert result["fairness"]["A"]["gap"] == 0.0 and result["fairness"]["A"]["dermobench_fairness"] == 1.0


def test_identical_models_differ_by_nothing_and_unshared_images_are_left_out():
    same = rows(A_RIGHT, SKIN)
    result = compare({"A": same, "B": same[:200], "C": same}, LABELS, n_boot=500)
    assert result["n"] == 200 and result["left_out"] == {"A": 40, "B": 0, "C": 40}
    assert [p["models"] for p in result["pairs"]] == [["A", "B"], ["A", "C"], ["B", "C"]]
    for pair in result["pairs"]:
        overall = pair["by_subset"]["all"]
        assert overall["accuracy"]["difference"] == {"value": 0.0, "ci": [0.0, 0.0]}
        assert overall["mcnemar"] == {"a_only": 0, "b_only": 0, "p_value": 1.0}


def test_eval_with_two_models_writes_each_run_and_the_comparison(tiny_dir, tmp_path, capsys):
    from skingpt4.folder.tiny import create_tiny_model

    other = create_tiny_model(tmp_path / "other-model", seed=7)
    records = []
    for i, (label, skin) in enumerate([("eczema", 2), ("psoriasis", 4), ("eczema", 6), ("psoriasis", 1)] * 2):
        (tmp_path / f"p{i}.png").write_bytes(image_bytes(noise_seed=60 + i))
        records.append({"image": f"p{i}.png", "label": label, "fitzpatrick": skin})
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "compared"
    argv = ["eval", "--model", str(tiny_dir), "--model", str(other), "--data", str(tmp_path / "test.jsonl")]
    argv += ["--out", str(out), "--max-new-tokens", "4", "--bootstrap", "50", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("8 answered") == 2 and "| model | accuracy" in printed
    result = json.loads((out / "comparison.json").read_text())
    assert result["models"] == [tiny_dir.name, "other-model"] and result["n"] == 8
    for name in result["models"]:
        answers = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        right = [r["prediction"] == r["label"] for r in answers if r["repeat"] == 0]
        assert result["fairness"][name]["accuracy"] == pytest.approx(np.mean(right))
    assert (out / "comparison.png").stat().st_size > 1000 and (out / "comparison.md").is_file()
    assert main(argv) == 0 and capsys.readouterr().out.count("8 already done") == 2  # resumable
    assert main([*argv[:3], "--model", str(tiny_dir), *argv[5:]]) == 2
    assert "the same model is given twice" in capsys.readouterr().err


def test_clinical_protocol_with_two_models_is_blinded_and_reviewed_per_model(tmp_path, capsys):
    from skingpt4.folder.tiny import create_tiny_model
    from skingpt4.review.cases import load_cases
    from skingpt4.review.store import STATEMENTS, Rating, ReviewStore

    first, other = create_tiny_model(tmp_path / "alpha-model"), create_tiny_model(tmp_path / "other-model", seed=7)
    records = []
    for i, (label, skin) in enumerate([("eczema", 2), ("psoriasis", 4), ("eczema", 6)]):
        (tmp_path / f"p{i}.png").write_bytes(image_bytes(noise_seed=80 + i))
        records.append({"image": f"p{i}.png", "label": label, "fitzpatrick": skin, "case": f"c{i}"})
    (tmp_path / "cases.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "clinical"
    argv = ["eval", "--model", str(first), "--model", str(other), "--data", str(tmp_path / "cases.jsonl")]
    argv += ["--out", str(out), "--protocol", "clinical", "--max-new-tokens", "3", "--no-progress"]
    assert main(argv) == 0
    blinded = [json.loads(line) for line in (out / "transcripts.jsonl").read_text().splitlines()]
    key = json.loads((out / "blinding-key.json").read_text())
    assert (out / "blinding-key.json").stat().st_mode & 0o077 == 0  # the key: the owner's alone
    assert len(blinded) == 6 and all("model" not in case for case in blinded)
    text = (out / "transcripts.jsonl").read_text() + (out / "transcripts.md").read_text()
    assert first.name not in text and "other-model" not in text  # nothing a rater sees names a model
    assert sorted((e["model"], e["case"]) for e in key.values()) == sorted(
        (m, f"c{i}") for m in (first.name, "other-model") for i in range(3)
    )
    for case in blinded:  # each blinded case is its model's transcript, word for word
        entry = key[case["case"]]
        own = [json.loads(line) for line in (out / entry["model"] / "transcripts.jsonl").read_text().splitlines()]
        assert case["turns"] == next(c["turns"] for c in own if c["case"] == entry["case"])
    assert len(load_cases(out / "transcripts.jsonl")) == 6  # what `review` serves, photos found from there
    assert main(argv) == 0 and json.loads((out / "blinding-key.json").read_text()) == key  # rerun: same ids
    capsys.readouterr()

    with ReviewStore(out / "ratings.sqlite") as store:  # ann agrees with every statement on the first model only
        for case_id, entry in key.items():
            answer = "strongly_agree" if entry["model"] == first.name else "disagree"
            store.save(Rating("ann", case_id, {s.key: answer for s in STATEMENTS}))
    summary = ["review", "summary", "--store", str(out / "ratings.sqlite"), "--key", str(out / "blinding-key.json")]
    assert main([*summary, "--out", str(tmp_path / "summary")]) == 0
    printed = capsys.readouterr().out
    assert f"model {first.name}:" in printed and "model other-model:" in printed
    result = json.loads((tmp_path / "summary" / "summary.json").read_text())
    bound = 1 / (1 + 1.959964**2 / 3)  # Wilson's interval for 3 of 3 (by hand: the centre minus half is 1/(1+z^2/n))
    for model, share, interval in ((first.name, 1.0, (bound, 1.0)), ("other-model", 0.0, (0.0, 1 - bound))):
        statements = result["by_model"][model]["statements"]
        assert all(s["n"] == 3 and s["share"] == share for s in statements)
        assert all((s["wilson_low"], s["wilson_high"]) == pytest.approx(interval, abs=1e-6) for s in statements)
