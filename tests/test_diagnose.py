"""Bulk diagnosis: inputs, records, resume after a kill, bad images, batching, CSV."""

from __future__ import annotations

import csv
import json

import pytest
from conftest import image_bytes

from skingpt4.data.manifest import collect
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError
from skingpt4.inputs.conversation import CLINICAL_PROMPTS, DEFAULT_QUESTION
from skingpt4.serve.diagnose import diagnose, results_file

GREEDY = GenerationSettings.greedy(max_new_tokens=6)


@pytest.fixture
def photos(tmp_path):
    root = tmp_path / "photos"
    (root / "b").mkdir(parents=True)
    for i in range(3):
        (root / f"a{i}.jpg").write_bytes(image_bytes(noise_seed=i, fmt="JPEG"))
    (root / "b" / "c.png").write_bytes(image_bytes(noise_seed=5))
    (root / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    (root / "notes.txt").write_text("not an image")
    outside = tmp_path / "elsewhere.jpg"
    outside.write_bytes(image_bytes(fmt="JPEG"))
    (root / "link.jpg").symlink_to(outside)
    return root


def test_collect_folders_files_and_manifests(photos, tmp_path):
    items = collect([str(photos)])
    names = [item.path.name for item in items]
    assert names == ["a0.jpg", "a1.jpg", "a2.jpg", "broken.png", "c.png"]  # sorted; no .txt; no escaping link
    manifest = photos / "set.jsonl"
    manifest.write_text(json.dumps({"image": "a1.jpg", "label": "eczema", "fitzpatrick": 4}) + "\n\n")
    more = collect([str(manifest), str(photos / "a1.jpg"), str(photos / "a2.jpg")])
    assert [i.path.name for i in more] == ["a1.jpg", "a2.jpg"]
    assert more[0].manifest == {"label": "eczema", "fitzpatrick": 4}
    with pytest.raises(InputError, match="no such file or folder: nowhere"):
        collect(["nowhere"])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "a.jpg"}\n{oops\n')
    with pytest.raises(InputError, match="bad.jsonl line 2: not valid JSON"):
        collect([str(bad)])
    bad.write_text('{"label": "x"}\n')
    with pytest.raises(InputError, match="bad.jsonl line 1: record has no 'image' path"):
        collect([str(bad)])


def test_records_errors_and_resume(engine, photos, tmp_path):
    out_path = tmp_path / "out" / "results.jsonl"
    items = collect([str(photos)])
    summary = diagnose(engine, items, results_file(out_path), settings=GREEDY, batch_size=2, progress=False)
    assert (summary.done, summary.failed, summary.skipped) == (4, 1, 0)
    records = [json.loads(line) for line in out_path.read_text().splitlines()]
    by_name = {r["image"].rsplit("/", 1)[-1]: r for r in records}
    assert by_name["broken.png"]["error"].startswith("image is truncated or corrupt")
    good = by_name["a0.jpg"]
    assert good["error"] is None and good["prompts"] == [DEFAULT_QUESTION] and good["answer"] == good["answers"][0]
    assert good["model"] == engine.info.model_id and good["untrained"] is True
    assert len(good["image_sha256"]) == 64 and good["seconds"] > 0 and good["settings"]["do_sample"] is False

    again = diagnose(engine, items, results_file(out_path), settings=GREEDY, progress=False)
    assert (again.done, again.failed, again.skipped, again.stale) == (0, 0, 5, 0)
    other = diagnose(engine, items, results_file(out_path), ["Other question?"], GREEDY, progress=False)
    assert (other.done, other.skipped, other.stale) == (0, 5, 5)

    # A kill mid-write leaves half a line: the next run cuts it and redoes only that image.
    lines = out_path.read_text().splitlines(keepends=True)
    out_path.write_text("".join(lines[:2]) + lines[2][:25])
    resumed = diagnose(engine, items, results_file(out_path), settings=GREEDY, progress=False)
    assert resumed.skipped == 2 and resumed.done + resumed.failed == 3
    final = [json.loads(line) for line in out_path.read_text().splitlines()]
    assert sorted(r["image"] for r in final) == sorted(r["image"] for r in records)
    assert {r["image"]: r["answers"] for r in final} == {r["image"]: r["answers"] for r in records}


def test_batched_equals_single_and_clinical_conversation(engine, photos, tmp_path):
    items = [i for i in collect([str(photos)]) if i.path.suffix == ".jpg"]
    runs = {}
    for batch in (1, 3):
        out = tmp_path / f"b{batch}.jsonl"
        diagnose(engine, items, results_file(out), list(CLINICAL_PROMPTS), GREEDY, batch_size=batch, progress=False)
        runs[batch] = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["answers"] for r in runs[1]] == [r["answers"] for r in runs[3]]
    assert all(len(r["answers"]) == 4 and r["prompts"] == list(CLINICAL_PROMPTS) for r in runs[3])


def test_csv_output_and_resume(engine, photos, tmp_path):
    out = tmp_path / "results.csv"
    items = collect([str(photos)])
    diagnose(engine, items, results_file(out), settings=GREEDY, progress=False)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 5 and json.loads(rows[0]["prompts"]) == [DEFAULT_QUESTION]
    assert diagnose(engine, items, results_file(out), settings=GREEDY, progress=False).skipped == 5
    with pytest.raises(InputError, match="--out must end in .jsonl or .csv"):
        results_file(tmp_path / "results.txt")


def test_sigkill_then_rerun_processes_each_image_exactly_once(tiny_dir, tmp_path):
    """A real kill: the rerun finishes the job and no image appears twice."""
    import os
    import signal
    import subprocess
    import sys
    import time

    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(20):
        (folder / f"img{i:02d}.png").write_bytes(image_bytes(noise_seed=i, size=(32, 32)))
    out = tmp_path / "r.jsonl"
    cmd = [
        sys.executable,
        "-m",
        "skingpt4",
        "diagnose",
        "--model",
        str(tiny_dir),
        str(folder),
        "--out",
        str(out),
        "--greedy",
        "--max-new-tokens",
        "16",
        "--batch-size",
        "1",
        "--no-progress",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while (
        proc.poll() is None and time.monotonic() < deadline and (not out.exists() or out.read_text().count("\n") < 3)
    ):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = out.read_text().count("\n")
    assert 3 <= done_before < 20, "the kill should land mid-run"
    assert subprocess.run(cmd, capture_output=True, timeout=300).returncode == 0
    images = [json.loads(line)["image"] for line in out.read_text().splitlines()]
    assert len(images) == 20 and len(set(images)) == 20


def test_failed_generations_are_retried_and_csv_records_stay_one_line(engine, photos, tmp_path, monkeypatch):
    items = [i for i in collect([str(photos)]) if i.path.suffix == ".jpg"]
    out = tmp_path / "r.csv"

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)\nsecond line")

    monkeypatch.setattr(engine.model.language_model, "forward", out_of_memory)
    first = diagnose(engine, items, results_file(out), settings=GREEDY, progress=False)
    assert first.failed == 3 and len(results_file(out).failures({i.key for i in items})) == 3
    monkeypatch.undo()
    second = diagnose(engine, items, results_file(out), settings=GREEDY, progress=False)
    assert (second.done, second.skipped) == (3, 0) and results_file(out).failures({i.key for i in items}) == {}

    record_file = results_file(out)
    record_file.append({"image": "x.jpg", "answer": "line one\nline two", "error": None})
    text = out.read_text()
    assert text.count("\n") == 1 + 3 + 3 + 1  # header, 3 failures, 3 answers, and the new record: one line each
    assert list(csv.DictReader(out.open()))[-1]["answer"] == "line one\\nline two"
    out.write_text(text[:-10])  # a kill cuts the last record short
    assert "x.jpg" not in results_file(out).done


def test_unwritable_output_is_one_line(tiny_dir, photos, tmp_path, capsys):
    from skingpt4.cli.main import main

    (tmp_path / "file.txt").write_text("")
    code = main(["diagnose", "--model", str(tiny_dir), str(photos), "--out", str(tmp_path / "file.txt" / "r.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_answers_pass_the_safety_rails_and_records_keep_no_file_names(engine, photos, tmp_path, monkeypatch):
    from skingpt4.serve.records import RecordStore
    from skingpt4.serve.safety import DISCLAIMER, REFERRAL_PROMPT

    said = "This looks like a melanoma. It is definitely benign, nothing to worry about."
    monkeypatch.setattr(engine, "generate", lambda sessions, settings: [said] * len(sessions))
    items = [i for i in collect([str(photos)]) if i.path.suffix == ".jpg"]
    store = RecordStore(tmp_path / "records.sqlite", keep_images=False)
    diagnose(engine, items, results_file(tmp_path / "out.jsonl"), None, GREEDY, progress=False, store=store)
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    for record in records:
        assert record["referral"] == "prompt" and {"malignancy", "reassurance"} <= set(record["triggers"])
        assert "benign" not in record["answer"] and "nothing to worry" not in record["answer"]
        assert record["answer"].endswith(REFERRAL_PROMPT) and record["disclaimer"] == DISCLAIMER
    kept = [store.get(row["id"]) for row in store.list()]
    assert len(kept) == 3 and all(k["surface"] == "diagnose" for k in kept)
    assert {k["images"][0]["sha256"] for k in kept} == {r["image_sha256"] for r in records}
    raw = (tmp_path / "records.sqlite").read_bytes() + (tmp_path / "records.sqlite-wal").read_bytes()
    assert all(item.path.name.encode() not in raw for item in items)  # no file names in the store


def test_a_batch_that_runs_out_of_memory_is_answered_again_in_halves(loaded, tmp_path, monkeypatch):
    """Out of memory in a batch of 4 (the engine then admits 2): the 4 photos are answered in two halves, each as
    it would be alone; none is left failed."""
    import torch
    from conftest import endless

    from skingpt4.engine.chat import ChatEngine

    engine = ChatEngine(loaded)
    endless(engine)
    real = engine.llm.step

    def step(tokens, *args):
        if tokens.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(tokens, *args)

    for n in range(4):
        (tmp_path / f"{n}.png").write_bytes(image_bytes(noise_seed=n))
    settings = GenerationSettings.greedy(max_new_tokens=6)
    out = results_file(tmp_path / "r.jsonl")
    monkeypatch.setattr(engine.llm, "step", step)
    summary = diagnose(engine, collect([str(tmp_path)]), out, settings=settings, batch_size=4, progress=False)
    monkeypatch.undo()
    assert (summary.done, summary.failed) == (4, 0)
    records = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    alone = results_file(tmp_path / "alone.jsonl")
    diagnose(engine, collect([str(tmp_path)]), alone, settings=settings, batch_size=1, progress=False)
    expected = [json.loads(line) for line in (tmp_path / "alone.jsonl").read_text().splitlines()]
    assert [r["answers"] for r in records] == [e["answers"] for e in expected] and all(r["answers"] for r in records)
