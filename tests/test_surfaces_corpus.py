"""The malformed-input corpus (reliability T-1) through the HTTP API and `diagnose`, as a user would send it.

Every case must be answered (accepted after normalisation) or refused with a 4xx / a one-line error: never a 5xx,
never a hang (a 60 s guard per case, far above any normal request: it catches a hang, not slowness; no assertion
depends on speed), and nothing written may carry the file's metadata. `test_malformed.py` runs the
same corpus through the loader and the sandbox; the web app's upload path has its own run in `test_webapp.py`.
"""

from __future__ import annotations

import base64
import json
import time
from collections import Counter

import pytest
from conftest import within
from malformed import all_cases, data_url_cases, has_metadata, image_cases

from skingpt4.data.manifest import collect
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.serve.api import ServeConfig, create_app
from skingpt4.serve.diagnose import diagnose, results_file
from skingpt4.serve.records import RecordStore

HANG_GUARD_S = 60.0


@pytest.fixture(scope="module")
def http(loaded):
    from fastapi.testclient import TestClient

    app = create_app(ChatEngine(loaded), ServeConfig(max_tokens=1, max_image_mb=50, max_body_mb=80, warmup=False))
    with TestClient(app) as client:
        yield client


def post_image(http, url: str):
    """The request under the hang guard; returns the response and its seconds (printed, never asserted)."""
    body = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    start = time.perf_counter()
    response = within(HANG_GUARD_S, lambda: http.post("/v1/chat/completions", json={**body, "max_tokens": 1}))
    return response, time.perf_counter() - start


def test_every_case_through_the_api(http):
    outcomes: Counter = Counter()
    slowest = 0.0
    cases = [(c, "data:image/png;base64," + base64.b64encode(c.data).decode()) for c in image_cases()]
    cases += [(c, c.data_url) for c in data_url_cases()]
    for case, url in cases:
        response, seconds = post_image(http, url)
        slowest = max(slowest, seconds)
        assert response.status_code < 500, (case.name, response.text)
        expected = 200 if case.expect == "accept" else 400
        assert response.status_code == expected, (case.name, response.text[:200])
        if expected == 400:
            message = response.json()["error"]["message"]
            assert message and "\n" not in message and len(message) <= 300, case.name
        outcomes[response.status_code] += 1
    print(f"\nAPI corpus: {len(cases)} cases, outcomes {dict(outcomes)}, slowest {slowest:.2f} s")
    assert len(cases) == len(all_cases()) >= 40


def test_every_case_through_diagnose_and_records(engine, tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    cases = {c.name: c for c in image_cases()}
    for name, case in cases.items():
        (folder / f"{name}.png").write_bytes(case.data)
    out = results_file(tmp_path / "out.jsonl")
    start = time.perf_counter()
    with RecordStore(tmp_path / "records.sqlite", keep_images=True) as store:
        settings = GenerationSettings.greedy(max_new_tokens=1)
        diagnose(engine, collect([str(folder)]), out, None, settings, 8, False, store)
        kept = [store.get(row["id"]) for row in store.list()]
    seconds = time.perf_counter() - start
    records = {json.loads(line)["image"]: json.loads(line) for line in out.path.read_text().splitlines()}
    assert len(records) == len(cases)
    for key, record in records.items():
        case = cases[key.rsplit("/", 1)[-1].removesuffix(".png")]
        if case.expect == "accept":
            assert record["error"] is None and record["answers"], case.name
        else:
            assert record["error"] and "\n" not in record["error"], case.name
    pngs = [image["png"] for record in kept for image in record["images"]]
    assert len(pngs) == sum(c.expect == "accept" for c in cases.values())
    assert not any(has_metadata(png) for png in pngs)  # the stored pixels carry nothing of the files
    print(f"\ndiagnose corpus: {len(cases)} files in {seconds:.1f} s, {len(pngs)} accepted, metadata-free")
