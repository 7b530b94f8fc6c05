"""The OpenAI-compatible API: the official client, limits, backpressure, cancellation, isolation, fuzzing.

A real uvicorn server on 127.0.0.1 (random port) serves the tiny model; the official `openai` client talks to it.
"""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import httpx
import openai
import pytest
import uvicorn
from conftest import decode_batches, endless, image_bytes

from skingpt4.engine.settings import EngineSettings
from skingpt4.inputs.images import load_image
from skingpt4.serve.api import ServeConfig, create_app
from skingpt4.serve.safety import DISCLAIMER

KEY = "test-key-123"
JSON = {"content-type": "application/json"}


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text: str, *images: bytes) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": data_url(i)}} for i in images]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


class Server:
    """uvicorn in a thread; `url` once it listens and the warm-up inference has succeeded."""

    def __init__(self, app):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError("server did not become ready")

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(loaded, store):
    from skingpt4.engine.chat import ChatEngine

    engine = ChatEngine(loaded, settings=EngineSettings(queue_size=32))
    server = Server(create_app(engine, ServeConfig(api_key=KEY, max_tokens=16), store))
    server.engine = engine
    yield server
    server.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=30)


def test_plain_reply_with_an_image(client):
    reply = client.chat.completions.create(
        model="skingpt4", messages=[user("What is this?", image_bytes())], max_tokens=8, temperature=0
    )
    text = reply.choices[0].message.content
    assert text.rstrip().endswith(DISCLAIMER.strip())  # the rails end every answer
    assert reply.usage.prompt_tokens > 32 and 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.choices[0].finish_reason in ("stop", "length")
    again = client.chat.completions.create(
        model="skingpt4", messages=[user("What is this?", image_bytes())], max_tokens=8, temperature=0
    )
    assert again.choices[0].message.content == text  # temperature 0 is greedy: the same answer


def test_streaming_reply_joins_to_the_plain_one(client):
    messages = [user("Describe it.", image_bytes(noise_seed=3))]
    plain = client.chat.completions.create(model="m", messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(
        model="m", messages=messages, max_tokens=8, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")


def test_a_second_turn_replays_the_first(client):
    first = [user("What is this?", image_bytes())]
    answer = client.chat.completions.create(model="m", messages=first, max_tokens=6, temperature=0)
    history = [*first, {"role": "assistant", "content": answer.choices[0].message.content}, user("Is it serious?")]
    second = client.chat.completions.create(model="m", messages=history, max_tokens=6, temperature=0)
    assert second.usage.prompt_tokens > answer.usage.prompt_tokens + answer.usage.completion_tokens - 1


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data][0].startswith("model@")
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ok"


def test_wrong_or_missing_key_is_refused(server):
    bad = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model="m", messages=[user("hi")], max_tokens=2)
    assert httpx.get(f"{server.url}/v1/models").status_code == 401


def image_part(url: str) -> dict:
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}


BAD_REQUESTS = {
    "n": ({"n": 2}, "n"),
    "max-tokens": ({"max_tokens": 17}, "limit of 16"),
    "temperature": ({"temperature": 3}, "temperature"),
    "no-messages": ({"messages": []}, "messages"),
    "last-not-user": ({"messages": [{"role": "assistant", "content": "hi"}]}, "last message"),
    "long-text": ({"messages": [{"role": "user", "content": "x" * 16_001}]}, "characters"),
    "five-images": ({"messages": [user("hi", *[image_bytes()] * 5)]}, "at most 4"),
    "remote-url": (image_part("https://example.org/a.png"), "remote image URLs are refused"),
    "local-path": (image_part("/etc/passwd"), "local image paths are refused"),
    "bad-base64": (image_part("data:image/png;base64,@@"), "not valid base64"),
    "not-base64": (image_part("data:,abc"), "must be base64"),
    "gif": (image_part(data_url(b"GIF89a" + b"\0" * 20)), "GIF"),
    "five-stops": ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "logprobs": ({"logprobs": True, "top_logprobs": 2}, "logprobs: not supported by this server"),
    "tool-required": ({"tools": [], "tool_choice": "required"}, "tool_choice: 'required' is not supported"),
    "json-mode": ({"response_format": {"type": "json_object"}}, "response_format: only {'type': 'text'} is supported"),
    "penalty": ({"presence_penalty": 0.5}, "presence_penalty: not supported"),
}


@pytest.mark.parametrize(("change", "message"), BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
def test_bad_requests_get_400_with_one_line(server, change, message):
    body = {"model": "m", "messages": [user("hi")], "max_tokens": 2, **change}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]["message"]
    assert message in error and "\n" not in error


def test_fields_that_change_nothing_are_accepted(server):
    body = {"messages": [user("hi")], "max_tokens": 2, "user": "u1", "logprobs": False, "presence_penalty": 0}
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("text", ["\\ud800", "a\\udfffb", "\\udcff.jpg"])
def test_a_lone_surrogate_is_400_not_500(server, text):
    """Valid JSON (a `\\ud800` escape) whose text is no text: one line, never a server error."""
    raw = '{"messages": [{"role": "user", "content": "TEXT"}], "max_tokens": 2}'.replace("TEXT", text)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{server.url}/v1/chat/completions", content=raw, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["message"].startswith("messages[0].content holds a lone surrogate")


def test_body_cap_counts_declared_and_chunked_bodies(loaded):
    from fastapi.testclient import TestClient

    from skingpt4.engine.chat import ChatEngine

    app = create_app(ChatEngine(loaded), ServeConfig(max_body_mb=1 / 1024, warmup=False))  # 1 KiB
    with TestClient(app) as http:
        big = b'{"messages": [' + b" " * 2000 + b"]}"
        assert http.post("/v1/chat/completions", content=big).status_code == 413
        chunked = http.post("/v1/chat/completions", content=iter([big[:600], big[600:]]))  # no Content-Length
        assert chunked.status_code == 413
        bad = http.post("/v1/chat/completions", content=b"{}", headers={"content-length": "-5"})
        assert bad.status_code == 400
        at_cap = b'{"messages": [{"role": "user", "content": "' + b"x" * 900 + b'"}], "max_tokens": 1}'
        assert len(at_cap) < 1024
        assert http.post("/v1/chat/completions", content=at_cap, headers=JSON).status_code == 200


def test_queue_full_means_503_with_retry_after(loaded):
    """Two generating (--max-batch 2) plus two waiting; everyone else is told to come back, at once (T-7)."""
    from skingpt4.engine.chat import ChatEngine

    release = threading.Event()

    def slow_decode(data):
        release.wait(120)  # held until every rejection is in: "at once" means while these three are still held
        return load_image(data)

    config = ServeConfig(warmup=False, max_tokens=2)
    engine = ChatEngine(loaded, settings=EngineSettings(max_batch=2, queue_size=2))
    server = Server(create_app(engine, config, decode=slow_decode))
    body = {"model": "m", "messages": [user("hi", image_bytes())], "max_tokens": 1}
    try:
        with ThreadPoolExecutor(20) as pool:
            futures = [
                pool.submit(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=120) for _ in range(20)
            ]
            deadline = time.monotonic() + 60  # a hang guard, ends at the 16th answer: speed is not asserted
            while sum(f.done() for f in futures) < 16 and time.monotonic() < deadline:
                time.sleep(0.05)
            rejected = [f.result() for f in futures if f.done()]
            release.set()
            results = [f.result() for f in futures]
    finally:
        release.set()
        server.stop()
    assert len(rejected) == 16 and all(r.status_code == 503 for r in rejected)
    assert all(r.headers["retry-after"] == "5" for r in rejected)
    assert sorted(r.status_code for r in results).count(200) == 4


@pytest.fixture(scope="module")
def counted(loaded):
    """A server whose model cannot end an answer early, with its decoding steps counted."""
    from skingpt4.engine.chat import ChatEngine

    engine = ChatEngine(loaded)
    endless(engine)
    steps = []
    hook = engine.model.language_model.register_forward_hook(lambda *a: steps.append(1))
    server = Server(create_app(engine, ServeConfig(warmup=False, max_tokens=1500)))
    yield server, steps
    hook.remove()
    server.stop()


def test_client_disconnect_mid_stream_cancels_within_a_step(counted):
    server, steps = counted
    body = {"model": "m", "messages": [user("hi", image_bytes())], "max_tokens": 1500, "stream": True, "seed": 0}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        for _ in range(4):
            next(lines)
    at_close = len(steps)
    _wait_until_settled(steps)
    after = len(steps) - at_close
    print(f"\ndisconnect (stream): {at_close} steps before the client closed, {after} after (of 1500 asked)")
    assert after <= 10  # the server noticed at once and the engine stopped within a step or so


def test_client_disconnect_while_waiting_for_a_plain_reply_cancels(counted):
    server, steps = counted
    body = {"model": "m", "messages": [user("hi", image_bytes())], "max_tokens": 1500, "seed": 0}
    start = len(steps)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up after half a second and closes the connection
        httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=httpx.Timeout(10, read=0.5))
    _wait_until_settled(steps)
    done = len(steps) - start
    print(f"disconnect (plain): {done} steps in all (of 1500 asked)")
    assert done < 750  # it stopped long before the end (the server checks every 0.25 s)


def _wait_until_settled(steps) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not _settled(steps):
        pass


def _settled(steps, wait=0.5) -> bool:
    before = len(steps)
    time.sleep(wait)
    return len(steps) == before


def test_sixteen_sessions_five_turns_no_cross_talk(server, store):
    """Each client has its own canary word and photo; every record holds only its own (reliability T-5). The
    turns are decoded in shared batches (continuous batching), which is what could mix them."""

    def consult(n: int) -> list[str]:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
        photo = image_bytes(noise_seed=100 + n)
        messages, ids = [], []
        for turn in range(5):
            messages.append(user(f"canary{n}x{turn} what is it?", *([photo] if turn == 0 else [])))
            start = time.perf_counter()
            reply = client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0)
            latencies.append(time.perf_counter() - start)
            messages.append({"role": "assistant", "content": reply.choices[0].message.content})
            ids.append(reply.id)
        return ids

    latencies: list[float] = []
    before = {r["id"] for r in store.list()}
    with ThreadPoolExecutor(16) as pool, decode_batches(server.engine) as sizes:
        list(pool.map(consult, range(16)))
    latencies.sort()
    p50, p95, peak = latencies[len(latencies) // 2], latencies[int(len(latencies) * 0.95)], max(sizes)
    print(f"\nAPI: 16 sessions x 5 turns, turn latency p50 {p50:.2f} s, p95 {p95:.2f} s, up to {peak} in a batch")
    assert peak >= 2
    records = [store.get(r["id"]) for r in store.list() if r["id"] not in before]
    assert len(records) == 16 * 5
    cross_talk = 0
    for record in records:
        questions = [t["text"] for t in record["turns"] if t["role"] == "user"]
        owners = {q.split("x")[0] for q in questions}
        cross_talk += len(owners) != 1
        n = int(owners.pop().removeprefix("canary")) if len(owners) == 1 else -1
        photo = image_bytes(noise_seed=100 + n)
        from skingpt4.inputs.images import sha256_bytes

        cross_talk += [i["sha256"] for i in record["images"]] != [sha256_bytes(photo)]
    assert cross_talk == 0
    print(f"API: {len(records)} records checked, cross-talk {cross_talk}")


def test_schema_fuzzing_finds_no_server_error(loaded):
    """Schemathesis over /openapi.json: no 5xx and schema-conformant responses (reliability T-12)."""
    import schemathesis
    from hypothesis.errors import Unsatisfiable
    from schemathesis.generation.modes import GenerationMode

    from skingpt4.engine.chat import ChatEngine

    app = create_app(ChatEngine(loaded), ServeConfig(max_tokens=2, warmup=False))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    statuses: Counter = Counter()
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                fuzz(operation, mode, statuses, failures)
            except Unsatisfiable:  # a GET without parameters has no invalid form
                assert mode == GenerationMode.NEGATIVE and operation.method.upper() == "GET"
    print("\nschema fuzzing:", dict(statuses))
    assert failures == []
    assert sum(n for (label, mode, _), n in statuses.items() if "completions" in label and mode == "negative") >= 25
    assert statuses[("POST /v1/chat/completions", "positive", 2)] > 0  # valid requests really were answered


def fuzz(operation, mode, statuses: Counter, failures: list) -> None:
    from hypothesis import HealthCheck, given, settings

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case):
        response = case.call()
        statuses[(operation.label, mode.value, response.status_code // 100)] += 1
        if response.status_code >= 500:
            failures.append((operation.label, response.status_code, response.text[:200]))

    check()


def test_injection_cases_through_the_api(client):
    """Reliability T-13's text cases as API requests: answered, rails last, no live links or markup."""
    from test_consult import INJECTIONS

    photo = image_bytes()
    for name, text in INJECTIONS.items():
        reply = client.chat.completions.create(model="m", messages=[user(text, photo)], max_tokens=2, temperature=0)
        shown = reply.choices[0].message.content
        assert shown.endswith(DISCLAIMER) and "](" not in shown and "<img" not in shown.lower(), name
        assert reply.usage.prompt_tokens < 1500, name  # markers were removed, not multiplied


def test_out_of_memory_is_503_and_the_next_request_is_served(loaded, monkeypatch):
    """Reliability T-10 on CPU: the engine raises torch's OutOfMemoryError once; that request gets 503."""
    import torch
    from fastapi.testclient import TestClient

    from skingpt4.engine.chat import ChatEngine

    engine = ChatEngine(loaded)
    real, calls = engine.prefill, []

    def once_out_of_memory(*args):
        calls.append(1)
        if len(calls) == 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(*args)

    monkeypatch.setattr(engine, "prefill", once_out_of_memory)
    body = {"messages": [user("hi", image_bytes())], "max_tokens": 2}
    with TestClient(create_app(engine, ServeConfig(warmup=False))) as http:
        first = http.post("/v1/chat/completions", json=body)
        assert first.status_code == 503 and first.headers["retry-after"] == "5"
        assert "out of memory" in first.json()["error"]["message"]
        assert http.post("/v1/chat/completions", json=body).status_code == 200


def test_out_of_memory_in_a_batch_is_503_to_each_of_its_requests(loaded, monkeypatch):
    """A token step of four batched requests runs out of memory: all four get 503, the server goes on serving."""
    import torch

    from skingpt4.engine.chat import ChatEngine

    engine = ChatEngine(loaded, settings=EngineSettings(max_batch=4))
    endless(engine)  # no answer ends before the token step that fails
    real = engine.llm.step

    def step(tokens, *args):
        if tokens.shape[0] == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(tokens, *args)

    monkeypatch.setattr(engine.llm, "step", step)
    server = Server(create_app(engine, ServeConfig(warmup=False)))
    body = {"messages": [user("hi")], "max_tokens": 8, "temperature": 0}  # no photo: nothing to encode first
    post = partial(httpx.post, f"{server.url}/v1/chat/completions", json=body, timeout=60)
    try:
        with ThreadPoolExecutor(4) as pool, engine.lock:  # all four wait for the model, so they start together
            replies = [pool.submit(post) for _ in range(4)]
            deadline = time.monotonic() + 30
            while engine.status().waiting < 4 and time.monotonic() < deadline:
                time.sleep(0.02)
        statuses = [r.result().status_code for r in replies]
        assert statuses == [503] * 4 and all(r.result().headers["retry-after"] == "5" for r in replies)
        assert engine.status().limit == 2
        assert post().status_code == 200
    finally:
        server.stop()


def test_health_is_503_until_the_warm_up_inference_succeeds(loaded):
    from fastapi.testclient import TestClient

    from skingpt4.engine.chat import ChatEngine

    release = threading.Event()

    def held_decode(data):
        release.wait(60)
        return load_image(data)

    with TestClient(create_app(ChatEngine(loaded), ServeConfig(), decode=held_decode)) as http:
        assert http.get("/health").status_code == 503 and http.get("/health").json()["status"] == "starting"
        release.set()
        deadline = time.monotonic() + 60  # hang guards, not speed limits: each loop ends as soon as the state changes
        while http.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/health").json()["status"] == "ok"

    def broken(data):
        raise RuntimeError("decoder exploded")

    with TestClient(create_app(ChatEngine(loaded), ServeConfig(), decode=broken)) as http:
        deadline = time.monotonic() + 60
        while http.get("/health").json()["status"] == "starting" and time.monotonic() < deadline:
            time.sleep(0.05)
        health = http.get("/health")
        assert health.status_code == 503 and "warm-up failed" in health.json()["detail"]


def test_an_internal_error_is_500_with_an_id_and_logged_with_where_it_happened(loaded, monkeypatch, caplog):
    """A 500 can be diagnosed from the server's log (the frames where it was raised, under the id the client got);
    the exception's message is not logged, as it may quote patient text."""
    import logging
    import re

    from fastapi.testclient import TestClient

    from skingpt4.engine.chat import ChatEngine

    engine, said = ChatEngine(loaded), "Mrs " + "Example's rash on the left cheek"

    def broken_prefill(*args):
        raise RuntimeError(said)

    monkeypatch.setattr(engine, "prefill", broken_prefill)
    body = {"messages": [user("hi", image_bytes())], "max_tokens": 2}
    with TestClient(create_app(engine, ServeConfig(warmup=False))) as http, caplog.at_level(logging.ERROR):
        reply = http.post("/v1/chat/completions", json=body)
    assert reply.status_code == 500
    incident = re.search(r"error ([0-9a-f]{12})", reply.json()["error"]["message"]).group(1)
    logged = "\n".join(record.getMessage() for record in caplog.records if record.name == "skingpt4.serve.api")
    assert incident in logged and "RuntimeError" in logged
    assert "in broken_prefill" in logged and "scheduler.py" in logged  # where it was raised, and from where
    assert "Example" not in logged
