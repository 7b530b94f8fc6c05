"""Claim: the API answers several clients at once by decoding their turns together (continuous batching,
`scheduler.py`), with the answers each would get alone.

Targets (issue 12; README, Benchmarks): 8 clients, each one photo + one question, greedy, 64 new tokens, through
the HTTP API: aggregate generated tokens/s >= 3x the one-at-a-time path when sent at once, >= 2x when staggered
0.2 s apart; p95 time to first token no worse than one-at-a-time's; all 8 answers identical to the same requests
sent alone.

Method: the bench model (common.py: real structure, 8 x 512 Llama, vocab 32000) on CPU float32. One loaded model,
two engines over it: `max_batch=8` (the default) and `max_batch=1` (the direct path: one answer at a time, as
before the scheduler), each behind its own real uvicorn server on 127.0.0.1. Each client streams its answer
(`stream: true`, usage included). Aggregate tokens/s = the completion tokens of all 8 / (last end - first send).
Time to first token = when the request's first token was made (taken at the engine's streamer, same process and
clock) - when the client sent it: the API's safety rails hold text back until a sentence ends, and the random
model writes none, so the client itself sees text only at the end. The two paths take turns, ROUNDS rounds of each
arrival pattern; medians of tokens/s, p95 of first-token times pooled over the rounds. Bench choice: the model
cannot end early (EOS and pieces with `#` are suppressed, as the byte-fallback pieces are): every answer is 64
tokens.
"Alone": each request sent by itself to the batching server, after the timed rounds.

Second claim (issue 26): photos of concurrent requests do not wait on each other. Tiny model (tests' size), the same
server (`--max-batch 8`, the sandboxed decoder pool, `skingpt4 serve` as shipped): 8 clients at once against the
same 8 requests one after another, with a photo each (1024 px JPEG) and without, greedy, 96 tokens each (EOS and
`#` suppressed, so each answer is 96 tokens). Targets: with a photo each, at once >= 2x the tokens/s of one after
another (1.28x before the decoder pool; 2.40x without photos). On the tiny model the model's own work is small,
so whatever serializes the photo path shows, as it would on a GPU.

Run:  python bench/bench_concurrency.py            (about 3-4 minutes on 2 CPU cores)
      python bench/bench_concurrency.py --part tiny (the second claim alone, under a minute)
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import httpx
import uvicorn
from common import (
    build_bench_model,
    jpeg_bytes,
    load_bench_engine,
    median,
    print_table,
    sample_images,
    suppress_ids,
)

from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import EngineSettings
from skingpt4.serve.api import ServeConfig, create_app

CLIENTS, NEW_TOKENS, STAGGER_S, ROUNDS = 8, 64, 0.2, 3
QUESTIONS = [
    "What is this lesion?",
    "Could this be melanoma? It has grown over the summer.",
    "Describe the colour and border of this spot.",
    "Is this eczema or psoriasis?",
    "My child has this rash on the arm since Monday; what could it be?",
    "What treatment would you suggest?",
    "Should I see a dermatologist about this mole, and how soon?",
    "What causes a rash like this one?",
]


@contextmanager
def serving(engine: ChatEngine, max_tokens: int = NEW_TOKENS, store=None, capture=None):
    """The API on `engine`, in a uvicorn thread on a free local port; yields its URL. `capture(body)` sees the JSON
    body of every POST."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, ServeConfig(warmup=False, max_tokens=max_tokens), store)
    if capture is not None:

        @app.middleware("http")
        async def keep(request, call_next):
            if request.method == "POST":
                capture(json.loads(await request.body()))
            return await call_next(request)

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    while not server.started:
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


class FirstTokens:
    """When each request's first token is made, by its question: a wrapper around the engines' streamers."""

    def __init__(self, *engines: ChatEngine):
        self.made: dict[str, float] = {}
        for engine in engines:
            engine.generate = self._timed(engine.generate)

    def _timed(self, generate):
        def timed(sessions, settings=None, streamer=None, cancel=None):
            if streamer is not None:
                streamer = _Timed(streamer, sessions[0].conversation.messages[-1][1], self.made)
            return generate(sessions, settings, streamer, cancel)

        return timed

    def of(self, question: str) -> float:
        return next(t for prompt, t in self.made.items() if prompt.endswith(question))


class _Timed:
    def __init__(self, streamer, prompt: str, made: dict):
        self.streamer, self.prompt, self.made = streamer, prompt, made

    def put(self, value) -> None:
        if value.numel() and self.prompt not in self.made:
            self.made[self.prompt] = time.perf_counter()
        self.streamer.put(value)

    def __getattr__(self, name: str):  # the rest is the streamer's own (`answer`, ...)
        return getattr(self.streamer, name)


def ask(url: str, photo: bytes | None, question: str, tokens: int = NEW_TOKENS) -> dict:
    """One streamed consultation turn: its text, completion tokens, and when it was sent and ended."""
    content = [{"type": "text", "text": question}]
    if photo is not None:
        url_ = "data:image/jpeg;base64," + base64.b64encode(photo).decode()
        content.insert(0, {"type": "image_url", "image_url": {"url": url_}})
    body = {
        "messages": [{"role": "user", "content": content}],
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, text, tokens = time.perf_counter(), "", 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line.removeprefix("data: "))
            for choice in chunk.get("choices", []):
                text += choice["delta"].get("content") or ""
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"text": text, "tokens": tokens, "sent": sent, "end": time.perf_counter()}


def clients(url: str, photos: list[bytes], stagger: float, first: FirstTokens) -> list[dict]:
    """All clients, client i sent `i * stagger` seconds after the first; each with its time to first token."""

    def client(i: int) -> dict:
        time.sleep(i * stagger)
        return ask(url, photos[i], QUESTIONS[i])

    first.made.clear()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(client, range(CLIENTS)))
    for question, answer in zip(QUESTIONS, answers):
        answer["first token"] = first.of(question) - answer["sent"]
    return answers


def p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, round(0.95 * len(ordered)) - 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "bench", "tiny"], default="all")
    part = parser.parse_args().part
    if part in ("all", "bench"):
        bench_model()
    if part in ("all", "tiny"):
        photo_path()


def bench_model() -> None:
    with tempfile.TemporaryDirectory(prefix="skingpt4-bench-") as tmp:
        batched, notes = load_bench_engine(build_bench_model(Path(tmp) / "model"))
        vocab = batched.tokenizer.convert_ids_to_tokens(list(range(len(batched.tokenizer))))
        suppress_ids(batched, [i for i, t in enumerate(vocab) if "#" in t] + [batched.tokenizer.eos_token_id])
        direct = ChatEngine(
            batched.loaded, settings=EngineSettings(max_batch=1)
        )  # the same model (and its suppression hooks)
        first = FirstTokens(direct, batched)
        photos = [jpeg_bytes(image) for image in sample_images(CLIENTS)]
        paths = {"one at a time": direct, f"batched ({batched.settings.max_batch})": batched}
        patterns = {"at once": 0.0, f"staggered {STAGGER_S} s": STAGGER_S}
        runs: dict[tuple[str, str], list[list[dict]]] = {(p, n): [] for p in patterns for n in paths}
        with serving(direct) as direct_url, serving(batched) as batched_url:
            urls = {name: direct_url if engine is direct else batched_url for name, engine in paths.items()}
            for url in urls.values():  # warm-up: one request each
                ask(url, photos[0], QUESTIONS[0])
            for _ in range(ROUNDS):
                for pattern, stagger in patterns.items():
                    for name, url in urls.items():
                        runs[pattern, name].append(clients(url, photos, stagger, first))
            alone = [ask(batched_url, photos[i], QUESTIONS[i])["text"] for i in range(CLIENTS)]
        report(runs, paths, patterns, alone, batched.status().peak)
        for note in notes:
            print(note)


def report(runs, paths, patterns, alone: list[str], peak: int) -> None:
    rows, baseline = [], {}
    for pattern in patterns:
        for name in paths:
            rounds = runs[pattern, name]
            rate = median(
                [
                    sum(r["tokens"] for r in rs) / (max(r["end"] for r in rs) - min(r["sent"] for r in rs))
                    for rs in rounds
                ]
            )
            first = p95([r["first token"] for rs in rounds for r in rs])
            tokens = {r["tokens"] for rs in rounds for r in rs}
            same = min(sum(r["text"] == a for r, a in zip(rs, alone)) for rs in rounds)
            base_rate, base_first = baseline.setdefault(pattern, (rate, first))
            rows.append(
                [
                    pattern,
                    name,
                    f"{rate:.1f}",
                    f"{rate / base_rate:.2f}x",
                    f"{first:.2f}",
                    f"{first / base_first:.2f}x",
                    "/".join(map(str, sorted(tokens))),
                    f"{same}/{CLIENTS}",
                ]
            )
    headers = ["arrivals", "path", "tokens/s", "vs one", "p95 first token s", "vs one", "tokens each", "same as alone"]
    print_table(
        f"{CLIENTS} API clients, greedy, {NEW_TOKENS} new tokens, {ROUNDS} rounds (CPU float32)", headers, rows
    )
    print(f"largest batch decoded: {peak}")


TINY_TOKENS, TINY_ROUNDS, TINY_PHOTO_PX = 96, 5, 1024  # 1024 px JPEGs: 16 KB (plain) and 572 KB (noisy)


def photo_path() -> None:
    """8 clients at once vs one after another on the tiny model, with a photo each and without (the docstring):
    `skingpt4 serve` in a process of its own, so that the clients (here) share nothing with it."""
    with tempfile.TemporaryDirectory(prefix="skingpt4-bench-") as tmp, tiny_server(Path(tmp)) as url:
        photos = [jpeg_bytes(image) for image in sample_images(CLIENTS, size=TINY_PHOTO_PX)]
        runs = {(p, a): [] for p in ("a photo each", "no photo") for a in ("one after another", "at once")}
        for photo in (photos[0], None):  # warm-up: the decoder pool and the model
            ask(url, photo, QUESTIONS[0], TINY_TOKENS)
        for _ in range(TINY_ROUNDS):
            for kind in ("a photo each", "no photo"):
                sent = photos if kind == "a photo each" else [None] * CLIENTS
                runs[kind, "one after another"].append(tiny_round(url, sent, parallel=False))
                runs[kind, "at once"].append(tiny_round(url, sent, parallel=True))
    rows = []
    for kind in ("a photo each", "no photo"):
        base = median(runs[kind, "one after another"])
        for arrival in ("one after another", "at once"):
            rates = runs[kind, arrival]
            spread_ = f"{min(rates):.0f}..{max(rates):.0f}"
            rows.append([kind, arrival, f"{median(rates):.0f}", f"{median(rates) / base:.2f}x", spread_])
    print_table(
        f"tiny model: {CLIENTS} API clients, greedy, {TINY_TOKENS} tokens each, {TINY_ROUNDS} rounds (median)",
        ["requests", "sent", "tokens/s", "vs one after another", "tokens/s min..max"],
        rows,
    )


@contextmanager
def tiny_server(tmp: Path):
    """`skingpt4 serve --model TINY` in a child process, on a free port; the tiny folder never ends an answer
    early (EOS and the pieces with `#` in its generation_config.json's suppress_tokens), so every answer is 96."""
    import subprocess

    from skingpt4.folder.tiny import create_tiny_model, without_endings

    folder = without_endings(create_tiny_model(tmp / "tiny"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [sys.executable, "-m", "skingpt4", "serve", "--model", str(folder), "--port", str(port)]
    server = subprocess.Popen([*argv, "--max-tokens", str(TINY_TOKENS)], stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=1).json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield url
    finally:
        server.terminate()
        server.wait(30)


def tiny_round(url: str, photos: list, parallel: bool) -> float:
    """Tokens/s of the 8 requests, sent at once or one after another."""

    def one(i: int) -> dict:
        return ask(url, photos[i], QUESTIONS[i], TINY_TOKENS)

    start = time.perf_counter()
    if parallel:
        with ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(one, range(CLIENTS)))
    else:
        answers = [one(i) for i in range(CLIENTS)]
    return sum(a["tokens"] for a in answers) / (time.perf_counter() - start)


if __name__ == "__main__":
    main()
