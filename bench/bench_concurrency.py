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

Run:  python bench/bench_concurrency.py      (about 2-3 minutes on 2 CPU cores)
"""

from __future__ import annotations

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
from common import build_bench_model, jpeg_bytes, load_bench_engine, median, print_table, sample_images, suppress_ids

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
def serving(engine: ChatEngine):
    """The API on `engine`, in a uvicorn thread on a free local port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    app = create_app(engine, ServeConfig(warmup=False, max_tokens=NEW_TOKENS))
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


def ask(url: str, photo: bytes, question: str) -> dict:
    """One streamed consultation turn: its text, completion tokens, and when it was sent and ended."""
    image = {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(photo).decode()}}
    body = {
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": question}]}],
        "max_tokens": NEW_TOKENS,
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


if __name__ == "__main__":
    main()
