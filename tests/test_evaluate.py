"""The evaluation run: both modes and the clinical protocol on the tiny model, resuming, choice-mode scores
checked against a plain forward pass, extraction end to end with scripted answers, and bad input."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import image_bytes
from PIL import Image

from skingpt4.data.manifest import collect
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError
from skingpt4.evaluate.run import PredictionFile, canonical, choose_split, run_eval
from skingpt4.evaluate.scoring import ANSWER_FORMAT, score_labels, spoken
from skingpt4.inputs.conversation import CLINICAL_PROMPTS

GREEDY = GenerationSettings.greedy(max_new_tokens=4)
LABELS = ["eczema", "psoriasis", "melanoma"]
FAST = {"settings": GREEDY, "n_boot": 20, "progress": False}


def write_set(folder, n=6, broken=False, labels=LABELS):
    """n noise images with labels and Fitzpatrick types, a manifest, and optionally one unreadable image."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (folder / f"img{i}.png").write_bytes(image_bytes(noise_seed=i))
        rows.append({"image": f"img{i}.png", "label": labels[i % len(labels)], "fitzpatrick": i % 6 + 1})
    if broken:
        (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
        rows.append({"image": "broken.png", "label": labels[0], "fitzpatrick": 2})
    manifest = folder / "set.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return collect([str(manifest)])


def sha256(item) -> str:
    return hashlib.sha256(item.path.read_bytes()).hexdigest()


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


class Scripted(ChatEngine):
    """The tiny model's engine, answering from a script keyed by image hash (to test extraction end to end)."""

    def __init__(self, loaded, answers: dict[str, str]):
        super().__init__(loaded)
        self.answers = answers

    def generate(self, sessions, settings=None, streamer=None, cancel=None):
        out = []
        for session in sessions:
            answer = self.answers[session.image_hashes[0]]
            out.append(session.conversation.add_answer(answer))
        return out


def test_open_mode_end_to_end_with_a_bad_image(engine, tmp_path):
    items = write_set(tmp_path / "data", broken=True)
    result = run_eval(engine, items, tmp_path / "out", **FAST)
    assert (result["done"], result["failed"], result["skipped"]) == (6, 1, 0)
    out = tmp_path / "out"
    records = lines(out / "predictions.jsonl")
    assert len(records) == 7 and sum(r["error"] is not None for r in records) == 1
    good = next(r for r in records if not r["error"])
    assert good["label"] in LABELS and len(good["answers"]) == 1 and good["fitzpatrick"] in range(1, 7)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == 6 and metrics["errors"]["count"] == 1
    assert metrics["errors"]["excluded"][0].endswith("broken.png")
    assert metrics["run"]["settings"]["do_sample"] is False and metrics["run"]["seed"] == 0
    assert sum(metrics["match"].values()) == 6 and metrics["latency"]["p50"] > 0
    assert set(metrics["by_skin_type"]["groups"]) >= {"I-II", "III-IV", "V-VI"}
    for name in ("report.html", "report.md", "confusion.png", "skin_tone.png", "run.json"):
        assert (out / name).stat().st_size > 0


def test_choice_mode_probabilities(engine, tmp_path):
    items = write_set(tmp_path / "data", n=4)
    run_eval(engine, items, tmp_path / "a", mode="choice", **FAST)
    run_eval(engine, items, tmp_path / "b", mode="choice", batch_size=3, **FAST)
    a, b = lines(tmp_path / "a" / "predictions.jsonl"), lines(tmp_path / "b" / "predictions.jsonl")
    for ra, rb in zip(a, b):
        assert sum(ra["probs"].values()) == pytest.approx(1.0)
        assert ra["prediction"] == max(ra["probs"], key=ra["probs"].get)
        assert ra["probs"] == pytest.approx(rb["probs"], abs=1e-9)  # deterministic, whatever the batch
    metrics = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert metrics["has_probs"] and "auroc" in metrics and "1" in metrics["top_k"]
    assert (tmp_path / "a" / "calibration.png").exists()


def test_choice_scores_equal_a_plain_forward_pass(engine):
    """The batched, right-padded, head-on-targets-only score equals summing log-softmax of full logits."""
    from PIL import Image

    features = engine.encode_images([Image.new("RGB", (40, 40), (200, 100, 90))])
    labels = ["eczema", "psoriasis vulgaris"]
    scores = score_labels(engine, features, labels, "What is it?")
    session = engine.session()
    session.add_encoded(features[0])
    session.ask("What is it?")
    ids, photos, _ = engine.chat.prompt(session, GREEDY)
    feats = torch.stack(photos)
    for j, label in enumerate(labels):
        target = engine.tokenizer(ANSWER_FORMAT.format(label) + "###", add_special_tokens=False).input_ids
        row = torch.tensor([ids + target])
        logits = engine.model.language_model(inputs_embeds=engine.embed(row, feats)).logits[0].float()
        logits[:, len(engine.tokenizer) :] = float("-inf")
        logp = torch.log_softmax(logits, -1)
        expected = sum(logp[len(ids) - 1 + k, t].item() for k, t in enumerate(target))
        assert scores[0, j].item() == pytest.approx(expected, abs=1e-4)


def test_clinical_protocol_writes_transcripts(engine, tmp_path):
    items = write_set(tmp_path / "data", n=3)
    result = run_eval(engine, items, tmp_path / "out", protocol="clinical", **FAST)
    cases = lines(tmp_path / "out" / "transcripts.jsonl")
    assert len(cases) == 3 and set(result["files"]) == {"transcripts", "transcripts_md"}
    case = cases[0]
    assert set(case) >= {"case", "image", "image_sha256", "label", "turns"}
    assert [t["text"] for t in case["turns"] if t["role"] == "user"] == list(CLINICAL_PROMPTS)
    assert [t["role"] for t in case["turns"]] == ["user", "assistant"] * 4
    assert case["case"] == "img0" and case["label"] == "eczema" and len(case["image_sha256"]) == 64
    text = (tmp_path / "out" / "transcripts.md").read_text()
    assert "## Case img0" in text and "untrained" in text and CLINICAL_PROMPTS[3] in text


def test_resume_answers_each_image_once(engine, tmp_path):
    items = write_set(tmp_path / "data", n=6)
    out = tmp_path / "out"
    first = run_eval(engine, items[:3], out, labels=LABELS, **FAST)
    assert first["done"] == 3
    # A kill mid-write leaves half a line: the rerun cuts it and redoes that image only.
    path = out / "predictions.jsonl"
    path.write_text(path.read_text()[:-20])
    second = run_eval(engine, items, out, labels=LABELS, **FAST)
    assert (second["done"], second["skipped"]) == (4, 2)
    records = lines(path)
    assert sorted(r["image"] for r in records) == sorted(item.key for item in items)
    assert run_eval(engine, items, out, labels=LABELS, **FAST)["done"] == 0
    with pytest.raises(InputError, match="holds a run with other answer_format, mode;"):
        run_eval(engine, items, out, labels=LABELS, mode="choice", **FAST)


def test_scripted_answers_score_exactly(loaded, tmp_path):
    items = write_set(tmp_path / "data", n=6)
    hashes = {item.key: sha256(item) for item in items}
    right = {
        "eczema": "The skin is dry and red. This could be a skin disease image of atopic dermatitis.",
        "psoriasis": "Silvery scales on the elbow. The findings are consistent with plaque psoriasis.",
        "melanoma": "This is not a benign nevus; it is most likely a malignant melanoma. See a doctor.",
    }
    script = {hashes[i.key]: right[i.manifest["label"]] for i in items}
    result = run_eval(Scripted(loaded, script), items, tmp_path / "right", **FAST)
    assert result["metrics"]["accuracy"]["value"] == 1.0
    assert result["metrics"]["match"] == {"sentence": 2, "cue": 4}
    wrong = {h: "I cannot tell from this photo." for h in script}
    result = run_eval(Scripted(loaded, wrong), items, tmp_path / "wrong", **FAST)
    assert result["metrics"]["accuracy"]["value"] == 0.0 and result["metrics"]["unmatched"]["count"] == 6


def test_repeats_give_consistency(loaded, tmp_path):
    items = write_set(tmp_path / "data", n=3)
    script = {sha256(i): "Consistent with eczema." for i in items}
    sampling = GenerationSettings(max_new_tokens=4)
    result = run_eval(
        Scripted(loaded, script), items, tmp_path / "out", settings=sampling, repeats=3, n_boot=20, progress=False
    )
    records = lines(tmp_path / "out" / "predictions.jsonl")
    assert sorted((r["case"], r["repeat"]) for r in records) == [(f"img{i}", r) for i in range(3) for r in range(3)]
    assert result["metrics"]["consistency"]["ratio"]["value"] == 1.0
    with pytest.raises(InputError, match="repeats > 1 needs sampling"):
        run_eval(Scripted(loaded, script), items, tmp_path / "g", settings=GREEDY, repeats=2, progress=False)


def test_bad_inputs(engine, tmp_path):
    items = write_set(tmp_path / "data", n=3, labels=["eczema", "lichen planus", "tinea"])
    with pytest.raises(InputError, match=r"^labels not in the label set: lichen planus, tinea \(2 images\)$"):
        run_eval(engine, items, tmp_path / "out", labels=["eczema", "psoriasis"], **FAST)
    assert not (tmp_path / "out").exists()  # said before any work
    with pytest.raises(InputError, match="^no images to evaluate$"):
        run_eval(engine, [], tmp_path / "out", labels=LABELS, **FAST)
    with pytest.raises(InputError, match="unknown label set"):
        run_eval(engine, items, tmp_path / "out", labels="nope", **FAST)
    with pytest.raises(InputError, match="mode must be one of"):
        run_eval(engine, items, tmp_path / "out", mode="guess", **FAST)
    unlabelled = collect([str(items[0].path)])
    with pytest.raises(InputError, match="no label set"):
        run_eval(engine, unlabelled, tmp_path / "out", **FAST)


def test_every_image_unreadable_still_writes_metrics(engine, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "bad.png").write_bytes(b"not an image")
    (folder / "set.jsonl").write_text(json.dumps({"image": "bad.png", "label": "eczema"}) + "\n")
    result = run_eval(engine, collect([str(folder / "set.jsonl")]), tmp_path / "out", labels=LABELS, **FAST)
    assert result["failed"] == 1 and result["metrics"]["errors"]["count"] == 1 and "note" in result["metrics"]


def test_labels_named_set_canonical_names_and_spoken_codes(tmp_path):
    assert canonical("MEL", ["akiec", "mel"]) == "mel"
    assert canonical("melanoma", ["akiec", "mel"]) == "mel"  # the same concept
    assert canonical("melanoma", ["nv", "bkl"]) is None
    assert spoken("bkl") == "benign keratosis" and spoken("nodular-melanoma-(nm)") == "nodular melanoma (nm)"
    file = PredictionFile(tmp_path / "p.jsonl")
    file.append({"image": "a", "repeat": 1, "error": None})
    assert PredictionFile(tmp_path / "p.jsonl").done == {("a", 1)}


def test_a_rerun_scores_the_manifest_as_it_is_now(loaded, tmp_path):
    """Images dropped from the manifest stop counting, corrected labels count as corrected, and a set that records
    only skin-type groups (DDI) is still split by skin type."""
    items = write_set(tmp_path / "data", n=6)
    engine = ChatEngine(loaded)
    out = tmp_path / "out"
    run_eval(engine, items, out, labels=LABELS, mode="choice", **FAST)
    rows = [json.loads(line) for line in (tmp_path / "data" / "set.jsonl").read_text().splitlines()][:2]
    rows[0]["label"] = "melanoma"  # a corrected label
    for row in rows:
        row["fitzpatrick_group"] = "V-VI"
        del row["fitzpatrick"]
    (tmp_path / "data" / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_eval(
        engine, collect([str(tmp_path / "data" / "set.jsonl")]), out, labels=LABELS, mode="choice", **FAST
    )
    metrics = result["metrics"]
    assert result["done"] == 0 and metrics["n"] == 2
    assert metrics["per_class"]["melanoma"]["support"] == 1 and metrics["per_class"]["eczema"]["support"] == 0
    assert list(metrics["by_skin_type"]["groups"]) == ["V-VI"]


def test_images_sharing_a_file_name_get_distinct_case_ids(loaded, tmp_path):
    for label in ("eczema", "psoriasis"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "001.png").write_bytes(image_bytes(noise_seed=len(label)))
    items = collect([str(tmp_path / "eczema"), str(tmp_path / "psoriasis")])
    run_eval(ChatEngine(loaded), items, tmp_path / "out", protocol="clinical", **FAST)
    cases = [json.loads(line)["case"] for line in (tmp_path / "out" / "transcripts.jsonl").read_text().splitlines()]
    assert sorted(cases) == ["eczema/001", "psoriasis/001"]


def test_label_scoring_runs_under_the_engine_lock(engine):
    """Choice-mode scoring uses the shared model like generation does: every forward pass holds the engine lock."""
    held = []
    decoder = engine.model.language_model.get_decoder()
    hook = decoder.register_forward_pre_hook(lambda module, args: held.append(engine.lock.owned()))
    try:
        features = engine.encode_images([Image.new("RGB", (32, 32), (200, 100, 90))])
        score_labels(engine, features, ["eczema", "melanoma"], "What is it?")
    finally:
        hook.remove()
    assert held and all(held)


def test_the_test_split_is_scored_by_default_and_training_rows_are_warned_about(engine, tmp_path):
    items = write_set(tmp_path / "data", n=6)
    for item, split in zip(items, ["train", "train", "train", "val", "test", "test"]):
        item.manifest["split"] = split
    chosen, split, warnings = choose_split(items, None)
    assert split == "test" and [i.manifest["split"] for i in chosen] == ["test", "test"] and warnings == []
    chosen, split, warnings = choose_split(items, "all")
    assert len(chosen) == 6 and warnings == ["3 of the 6 images scored are training images"]
    with pytest.raises(InputError, match="no images in split 'tset' to evaluate .*splits are test, train, val"):
        choose_split(items, "tset")
    assert choose_split([i for i in write_set(tmp_path / "plain", n=2)], None)[1] == "all"  # no splits: every row
    result = run_eval(engine, items, tmp_path / "out", labels=LABELS, **FAST)
    assert result["split"] == "test" and result["metrics"]["n"] == 2 and result["metrics"]["run"]["split"] == "test"
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| split | test |" in report and "{" not in report.split("## Run")[1].split("##")[0]  # named settings


def test_an_untrained_models_report_says_so_in_a_red_banner(engine, tmp_path):
    import re

    run_eval(engine, write_set(tmp_path / "data", n=2), tmp_path / "out", labels=LABELS, **FAST)
    for name in ("report.md", "report.html"):
        assert "UNTRAINED random model: these numbers measure noise" in (tmp_path / "out" / name).read_text()
    page = (tmp_path / "out" / "report.html").read_text()
    banner = re.search(r'<p class="banner" id="untrained">UNTRAINED random model', page)
    style = re.search(r"\.banner\{([^}]*)\}", page)
    assert banner and banner.start() < page.index("<h2>") and "border:2px solid #c00" in style.group(1)
    assert "> **UNTRAINED random model" in (tmp_path / "out" / "report.md").read_text()
