"""Text and names from outside, as properties (Hypothesis): arbitrary Unicode, lone surrogates and arbitrary bytes
as file names, through every surface that reads text or names. No traceback, no 5xx, no record lost."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from conftest import image_bytes
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from skingpt4.data.manifest import collect, read_manifest
from skingpt4.data.prepare import prepare
from skingpt4.engine.settings import GenerationSettings
from skingpt4.evaluate.run import run_eval
from skingpt4.review.page import create_app as review_app
from skingpt4.review.page import load_cases
from skingpt4.review.store import ReviewStore
from skingpt4.serve.api import ServeConfig
from skingpt4.serve.api import create_app as api_app
from skingpt4.serve.diagnose import diagnose, results_file
from skingpt4.serve.records import RecordStore
from skingpt4.text import has_surrogate, readable

QUICK = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
GREEDY = GenerationSettings.greedy(max_new_tokens=2)
ANY_TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)  # surrogates and controls included
PHOTO = image_bytes()


def names():
    """File-name bytes as any system may hold them: anything but '/' and NUL, never '.' or '..'."""
    return (
        st.binary(min_size=1, max_size=30)
        .map(lambda b: b.replace(b"/", b"_").replace(b"\0", b"_"))
        .filter(lambda b: b not in (b".", b".."))
    )


def label(name: bytes) -> str:
    """The class a folder of this name stands for (prepare-data reads "_" as a space)."""
    return readable(os.fsdecode(name)).replace("_", " ").strip()


def unique(items: list[bytes]) -> list[bytes]:
    return list(dict.fromkeys(items))


@QUICK
@given(text=ANY_TEXT)
def test_api_text_is_answered_or_refused_in_one_line(loaded, text):
    from skingpt4.engine.chat import ChatEngine

    with TestClient(api_app(ChatEngine(loaded), ServeConfig(warmup=False, max_tokens=2))) as client:
        body = json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 2})  # surrogates escaped
        response = client.post("/v1/chat/completions", content=body, headers={"Content-Type": "application/json"})
    assert response.status_code in (200, 400), response.text
    if response.status_code == 400:
        message = response.json()["error"]["message"]
        assert "\n" not in message and (has_surrogate(text) or not text.strip() or "characters" in message)
    else:
        assert not has_surrogate(text)


@QUICK
@given(files=st.lists(names(), min_size=1, max_size=4).map(unique), kind=st.sampled_from(["jsonl", "csv"]))
def test_diagnose_records_every_file_whatever_its_name(engine, files, kind):
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for name in files:
            (Path(os.fsdecode(bytes(folder)) + "/" + os.fsdecode(name + b".png"))).write_bytes(PHOTO)
        out = results_file(Path(tmp) / f"out.{kind}")
        summary = diagnose(engine, collect([str(folder)]), out, settings=GREEDY, batch_size=4, progress=False)
        assert (summary.done, summary.failed) == (len(files), 0)
        keys = [r["image"] for r in out.records()]
        assert sorted(keys) == sorted(readable(str(folder / os.fsdecode(n + b".png"))) for n in files)
        rerun = diagnose(engine, collect([str(folder)]), results_file(out.path), settings=GREEDY, progress=False)
        assert (rerun.done, rerun.skipped) == (0, len(files))  # the same names, recognised: nothing redone


@QUICK
@given(
    classes=st.lists(names().filter(lambda n: label(n)), min_size=2, max_size=3)
    .map(unique)
    .filter(lambda c: len(c) > 1)
)
def test_prepare_data_takes_class_folders_whatever_their_names(classes):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "classes"
        for n, name in enumerate(classes):
            folder = Path(os.fsdecode(bytes(root) + b"/" + name))
            folder.mkdir(parents=True)
            for i in range(2):
                (folder / f"{i}.png").write_bytes(image_bytes(color=(40 * n, 20 * i, 90)))
        out = Path(tmp) / "m.jsonl"
        report = prepare("folder", root, out)
        items = list(read_manifest(out))
        assert report.written == len(items) == 2 * len(classes) and all(item.path.is_file() for item in items)
        assert {item.manifest["label"] for item in items} == {label(c) for c in classes}


@QUICK
@given(labels=st.lists(ANY_TEXT.filter(lambda s: s.strip()), min_size=1, max_size=3), name=names())
def test_eval_scores_labels_and_names_from_outside(engine, labels, name):
    with tempfile.TemporaryDirectory() as tmp:
        image = os.fsdecode(name + b".png")
        (Path(tmp) / image).write_bytes(PHOTO)
        manifest = Path(tmp) / "set.jsonl"
        manifest.write_text(json.dumps({"image": image, "label": labels[0]}) + "\n")  # ASCII escapes: any text
        result = run_eval(
            engine, collect([str(manifest)]), Path(tmp) / "out", settings=GREEDY, n_boot=5, progress=False
        )
        assert (result["done"], result["errors"]) == (1, 0)
        assert json.loads((Path(tmp) / "out" / "metrics.json").read_text())["n"] == 1


@QUICK
@given(text=ANY_TEXT, model=ANY_TEXT)
def test_records_keep_and_export_any_text(text, model):
    with tempfile.TemporaryDirectory() as tmp:
        with RecordStore(Path(tmp) / "r.sqlite") as store:
            turns = [{"role": "user", "text": text}]
            record_id = store.save({"surface": "chat", "model_id": model, "turns": turns})
            assert store.export(Path(tmp) / "all.jsonl") == 1
            exported = json.loads((Path(tmp) / "all.jsonl").read_text(encoding="utf-8"))
        assert exported["id"] == record_id and exported["turns"][0]["text"] == readable(text)
        assert exported["model_id"] == readable(model)


@QUICK
@given(case=ANY_TEXT.filter(lambda s: s.strip()), answer=ANY_TEXT, image=names())
@example(case="\ud800", answer="\udcff", image=b"~")  # found by Hypothesis: a photo named "~", JSON surrogates
@example(case="c", answer="a", image=b"~root")  # "~root" is a user's home as a path; here, a file beside them
def test_review_serves_any_transcript(case, answer, image):
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / os.fsdecode(image)).write_bytes(PHOTO)
        turns = [{"role": "user", "text": "Q?"}, {"role": "assistant", "text": answer}]
        row = {"case": case, "image": os.fsdecode(image), "image_sha256": None, "label": None, "turns": turns}
        (Path(tmp) / "t.jsonl").write_text(json.dumps(row) + "\n")  # ASCII escapes, as any JSON writer may
        with ReviewStore(Path(tmp) / "r.sqlite") as store:
            app = review_app(load_cases(Path(tmp) / "t.jsonl"), store)
            with TestClient(app) as client:
                token = app.state.review.token
                signed = client.post("/rater", data={"name": "ann", "token": token})
                assert signed.status_code == 200 and client.get("/image/1").status_code == 200
