"""The research commands end to end through the command line: prepare-data and review summary."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import image_bytes, train_config

from skingpt4.cli.main import main
from skingpt4.review.store import STATEMENT_KEYS, Rating, ReviewStore


def test_prepare_data_from_a_class_folder(tmp_path, capsys):
    root = tmp_path / "classes"
    for label, count in (("eczema", 3), ("psoriasis", 2)):
        (root / label).mkdir(parents=True)
        for i in range(count):
            (root / label / f"{label}{i}.png").write_bytes(image_bytes(noise_seed=len(label) * 10 + i))
    out = tmp_path / "manifest.jsonl"
    assert main(["prepare-data", "folder", str(root), "--out", str(out), "--split", "0.6,0.2,0.2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5 and {r["caption"] for r in rows} == {
        "This could be a skin disease image of eczema.",
        "This could be a skin disease image of psoriasis.",
    }
    assert "eczema" in capsys.readouterr().out  # the integrity report's class counts
    assert main(["prepare-data", "folder", str(root), "--out", str(out)]) == 2  # never overwritten silently
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prepare-data", "folder", str(root), "--out", str(out), "--split", "0.5,0.5"]) == 2
    assert "three fractions" in capsys.readouterr().err


def test_review_summary_prints_agreement(tmp_path, capsys):
    store = tmp_path / "ratings.sqlite"
    with ReviewStore(store) as opened:
        opened.save(Rating("dr-a", "case-1", dict.fromkeys(STATEMENT_KEYS, "agree")))
    assert main(["review", "summary", "--store", str(store), "--out", str(tmp_path / "summary")]) == 0
    printed = capsys.readouterr().out
    assert "1 rating(s) by 1 rater(s) on 1 case(s)" in printed
    assert (tmp_path / "summary" / "agreement.png").is_file()
    assert main(["review", "summary", "--store", str(tmp_path / "none.sqlite")]) == 2
    assert "no review store" in capsys.readouterr().err
    assert main(["review", str(tmp_path / "missing.jsonl")]) == 2
    assert "no transcripts file" in capsys.readouterr().err


def labelled_set(tmp_path) -> str:
    rows = []
    for i, (label, skin) in enumerate([("eczema", 2), ("psoriasis", 4), ("eczema", 6), ("psoriasis", 1)]):
        (tmp_path / f"p{i}.png").write_bytes(image_bytes(noise_seed=40 + i))
        rows.append({"image": f"p{i}.png", "label": label, "fitzpatrick": skin, "case": f"c{i}"})
    manifest = tmp_path / "test.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(manifest)


def test_eval_then_review_the_clinical_transcripts(tiny_dir, tmp_path, capsys):
    data = labelled_set(tmp_path)
    out = tmp_path / "choice"
    argv = [
        "eval",
        "--model",
        str(tiny_dir),
        "--data",
        data,
        "--out",
        str(out),
        "--mode",
        "choice",
        "--bootstrap",
        "50",
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "4 answered" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 4 and metrics["labels"] == ["eczema", "psoriasis"]
    assert (out / "report.html").is_file() and (out / "confusion.png").is_file()

    clinical = tmp_path / "clinical"
    argv = [
        "eval",
        "--model",
        str(tiny_dir),
        "--data",
        data,
        "--out",
        str(clinical),
        "--protocol",
        "clinical",
        "--max-new-tokens",
        "2",
        "--bootstrap",
        "50",
        "--no-progress",
    ]
    assert main(argv) == 0
    from skingpt4.review.page import load_cases

    cases = load_cases(clinical / "transcripts.jsonl")
    assert [c.id for c in cases] == ["c0", "c1", "c2", "c3"] and len(cases[0].turns) == 8  # four prompts, answers
    capsys.readouterr()
    bad = ["eval", "--model", str(tiny_dir), "--data", data, "--out", str(tmp_path / "x"), "--labels", "eczema,acne"]
    assert main(bad) == 2
    assert "not in the label set" in capsys.readouterr().err


def test_review_finds_the_photos_of_an_eval_run_with_relative_paths(tiny_dir, tmp_path, monkeypatch):
    """As the README runs it: relative --data and --out from one folder, the review from another."""
    from skingpt4.review.cases import display_png
    from skingpt4.review.page import load_cases

    data = Path(labelled_set(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = ["eval", "--model", str(tiny_dir), "--data", data.name, "--out", "clinical", "--protocol", "clinical"]
    assert main([*argv, "--max-new-tokens", "2", "--bootstrap", "10", "--no-progress"]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    cases = load_cases(Path("../clinical/transcripts.jsonl"))
    assert len(cases) == 4 and all(display_png(case)[0] for case in cases)  # every photo shows
    missing = cases[0].__class__(cases[0].id, Path("../clinical/gone.png"), None, None, cases[0].turns)
    assert display_png(missing) == (None, f"no such file: {(tmp_path / 'elsewhere/../clinical/gone.png')}")


def test_prepare_data_then_train_then_chat_with_the_result(tiny_dir, tmp_path, capsys):
    root = tmp_path / "classes"
    for label in ("red", "blue"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            colour = (220, 30, 30) if label == "red" else (30, 30, 220)
            (root / label / f"{label}{i}.png").write_bytes(image_bytes(color=colour, size=(40 + i, 40)))
    manifest = tmp_path / "data.jsonl"
    assert main(["prepare-data", "folder", str(root), "--out", str(manifest), "--split", "0.75,0.25,0"]) == 0
    config = train_config(
        tmp_path / "train.yaml",
        model=tiny_dir,
        data=manifest,
        output_dir=tmp_path / "run",
        iters_per_epoch=3,
        checkpoint_every=2,
    )
    assert main(["train", "--config", str(config), "--set", "init_lr=1e-3", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "3 steps" in printed and "model folder" in printed and (tmp_path / "run" / "skingpt4_proj.pth").is_file()
    chat = ["chat", "--model", str(tmp_path / "run" / "model"), "--greedy", "--max-new-tokens", "2"]
    import io
    import sys

    stdin, sys.stdin = sys.stdin, io.StringIO("hello?\n/quit\n")
    try:
        assert main(chat) == 0
    finally:
        sys.stdin = stdin
    assert main(["train", "--config", str(config), "--set", "lerning_rate=1"]) == 2
    assert "unknown config key 'lerning_rate'" in capsys.readouterr().err


def test_eval_exits_1_when_images_failed_as_diagnose_does(tiny_dir, tmp_path, capsys):
    (tmp_path / "bad.png").write_bytes(b"not an image")
    (tmp_path / "set.jsonl").write_text(json.dumps({"image": "bad.png", "label": "eczema"}) + "\n")
    argv = ["eval", "--model", str(tiny_dir), "--data", str(tmp_path / "set.jsonl"), "--out", str(tmp_path / "o")]
    assert main([*argv, "--labels", "eczema,acne", "--no-progress"]) == 1
    assert "0 answered, 1 failed" in capsys.readouterr().out
    assert main([*argv, "--labels", "eczema,acne", "--no-progress"]) == 1  # a rerun: the latest record still failed
