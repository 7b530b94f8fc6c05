"""Claim: a chat turn reuses the key/value cache of the conversation so far, so the 5th turn of a chat costs about
its new tokens instead of a recompute of the whole history, with the same greedy answer (target: >= 3x faster).

Method: the bench model (common.py: real structure, 8 x 512 Llama, vocab 32000) on CPU float32. One session gets
an image and four questions, each answered greedily with 40 new tokens, so the history before the 5th question is
~300 tokens. That session is cloned (conversation, features and a deep copy of its cache), and the 5th turn is
timed on fresh clones: with prefix reuse, and with `session.cache = None` (recompute from scratch, the baseline).
Both are measured in the same run, interleaved, after a warm-up; medians of REPEAT runs are reported, for the
full turn (32 new tokens) and for the first token only (prefill, max_new_tokens=1). The answers of the two modes
are compared.

Run:  python bench/bench_prefix_cache.py      (about 1-2 minutes on 2 CPU cores)
"""

from __future__ import annotations

import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    build_bench_model,
    jpeg_bytes,
    load_bench_engine,
    median,
    print_table,
    sample_images,
    spread,
)

from skingpt4.engine.settings import GenerationSettings
from skingpt4.inputs.prompt import prompt_ids

REPEAT = {32: 7, 1: 15}  # per workload (new tokens): the first-token runs are short and noisier
HISTORY_ANSWER_TOKENS = 40
QUESTIONS = [
    "What's wrong with my skin?",
    "Please provide a paragraph listing additional features you observed in the image.",
    "What could cause this?",
    "What treatment should be recommended for this case?",
]
FIFTH = "Is it contagious, and should I see a dermatologist soon?"


def clone(session):
    """A second, identical session at the same point (Session's documented per-consultation state)."""
    twin = session.engine.session()
    twin.conversation = copy.deepcopy(session.conversation)
    twin.photos, twin.image_hashes = list(session.photos), list(session.image_hashes)
    twin.cache, twin.cache_keys = copy.deepcopy(session.cache), list(session.cache_keys)
    return twin


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="skingpt4-bench-") as tmp:
        run(*load_bench_engine(build_bench_model(Path(tmp) / "model")))


def run(engine, notes: list[str]) -> None:
    engine.caches.limit = 10**6  # every clone answers as a new session: keep the history's cache regardless
    history = engine.session()
    history.add_image(jpeg_bytes(sample_images(1)[0]))
    for question in QUESTIONS:
        history.ask(question)
        history.answer(GenerationSettings.greedy(max_new_tokens=HISTORY_ANSWER_TOKENS))
    history_tokens = len(prompt_ids(engine.tokenizer, history.conversation.prompt(), engine.loaded.image_token_id))
    history_tokens -= len(engine.tokenizer("Assistant:", add_special_tokens=False).input_ids)  # the open role
    history.ask(FIFTH)
    turn5_tokens = len(prompt_ids(engine.tokenizer, history.conversation.prompt(), engine.loaded.image_token_id))

    def fifth_turn(reuse: bool, new_tokens: int) -> tuple[float, str, int]:
        """Seconds, answer and tokens served from cache of the 5th turn on a fresh clone (the clone is not timed)."""
        session = clone(history)
        if not reuse:
            session.cache = None
        start = time.perf_counter()
        answer = session.answer(GenerationSettings.greedy(max_new_tokens=new_tokens))
        return time.perf_counter() - start, answer, session.reused_tokens

    for reuse in (True, False):
        fifth_turn(reuse, 32)  # warm-up
    rows, answers = [], {}
    for label, new_tokens in (("5th turn, 32 new tokens", 32), ("5th turn, first token only", 1)):
        times = {True: [], False: []}
        for _ in range(REPEAT[new_tokens]):  # interleaved, so that a noisy spell hits both modes
            for reuse in (True, False):
                seconds, *answers[label, reuse] = fifth_turn(reuse, new_tokens)
                times[reuse].append(seconds)
        base, fast = median(times[False]), median(times[True])
        rows.append(
            [label, "recompute (cache=None)", f"{base:.3f}", spread(times[False]), answers[label, False][1], "1.00x"]
        )
        rows.append(
            [label, "prefix reuse", f"{fast:.3f}", spread(times[True]), answers[label, True][1], f"{base / fast:.2f}x"]
        )

    print("\n".join(notes))
    print(
        f"history before the 5th question: {history_tokens} prompt tokens (image = 32); 5th-turn prompt: "
        f"{turn5_tokens} tokens"
    )
    print(f"medians of {REPEAT[32]} (full turn) and {REPEAT[1]} (first token) runs, the two modes interleaved")
    print_table(
        "Prefix reuse vs recompute, bench model on CPU (greedy)",
        ["workload", "mode", "median s", "min..max s", "tokens from cache", "speedup"],
        rows,
    )
    decode = [float(rows[i][2]) - float(rows[i + 2][2]) for i in (0, 1)]
    print(
        f"the 31 decode steps after the first token take {decode[0]:.3f} s (recompute) / {decode[1]:.3f} s (reuse): "
        "prefix reuse only shortens the prefill before the first token"
    )
    full = "5th turn, 32 new tokens"
    same = answers[full, True][0] == answers[full, False][0]
    print(f"answers identical (reuse vs recompute, 32 tokens): {same}")
    if not same:
        print(f"  reuse:     {answers[full, True][0]!r}\n  recompute: {answers[full, False][0]!r}")


if __name__ == "__main__":
    main()
