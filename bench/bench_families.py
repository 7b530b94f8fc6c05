"""Claim: other families' folders cost no more on our engine than on their own `generate` (issue 30's target:
per-token time <= 1.05x), alone and with several requests at once, with the same greedy answers.

Method: for each family (Gemma 3 / MedGemma, Qwen2.5-VL / SkinGPT-R1, LLaVA-1.5), a random folder built with its own
transformers classes and processor (`folder/tiny_families.py`), its language model at the bench size (8 x 512, head
dimension 64, 32000-row LM head: what a token step costs here is what it costs for a 7B model's shape, scaled
down), its vision tower tiny. CPU float32, greedy, one photo and one question per request. A forward hook on the LM
head suppresses the rows past the tokenizer and the EOS ids for both sides, so every answer runs its full length
(and both write the same ids: checked).
- "own generate": the family's processor on the chat template's text, then `model.generate` (what its model card
  shows).
- "ours": a session of our engine (`engine/family.py`): the consultation through the chat template, the processor,
  the same `generate` with our stop and cancel checks, the streamer, the answer clean-up.
- per token = (time of 64 new tokens - time of 1) / 63; first token = time of 1 new token, prompt included.
- 4 at once: 4 requests from 4 threads on our engine, all waiting before the first is decoded (they are decoded
  together), against the family's `generate` on the processor's batch of 4, and against our engine answering the 4
  one after another. Tokens/s of all 4 answers.
Every pair is measured in this run, interleaved, after a warm-up; medians of `--repeat` (3).

Run:  python bench/bench_families.py      (about 3 minutes on 2 CPU cores)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import median, print_table, sample_images, suppress_ids

from skingpt4.engine.factory import EngineOptions, open_engine
from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.folder.tiny_families import BUILDERS, build_tiny_family

TEXT_SIZES = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8)
TEXT_SIZES |= dict(num_key_value_heads=8, head_dim=64, vocab_size=32000)
FAMILY_SIZES = {"qwen2_5_vl": {"rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]}}}  # sums to 64 / 2
QUESTIONS = ["What is this rash?", "Describe the lesion.", "Is this mole changing?", "What could cause this?"]


def load(family: str, root: Path):
    folder = build_tiny_family(family, root / family, sizes=TEXT_SIZES | FAMILY_SIZES.get(family, {}))
    engine = open_engine(EngineOptions(model=str(folder), device="cpu", settings=EngineSettings(max_batch=4)))
    suppress_ids(engine, [*range(len(engine.chat.tokenizer), TEXT_SIZES["vocab_size"]), *set(engine.chat.eos_ids)])
    return engine


def asked(engine, question: str, image):
    session = engine.session()
    session.add_encoded(image)
    session.ask(question)
    return session


def ours(engine, requests, tokens: int) -> list[list[int]]:
    """Each request from its own thread (one thread: alone); each answer's ids as its streamer received them."""
    settings = GenerationSettings.greedy(max_new_tokens=tokens)
    answers: dict[int, list[int]] = {}

    def one(i: int, question: str, image):
        pieces = engine.chat.text_pieces(settings)
        engine.generate([asked(engine, question, image)], settings, pieces)
        answers[i] = pieces.ids

    threads = [threading.Thread(target=one, args=(i, *r)) for i, r in enumerate(requests)]
    with engine.turn:  # sent at once: all are waiting before the first is decoded
        for t in threads:
            t.start()
        while engine.status().waiting < len(requests):
            time.sleep(0.001)
    for t in threads:
        t.join()
    return [answers[i] for i in range(len(requests))]


def own(engine, requests, tokens: int) -> list[list[int]]:
    """The family's own processor and `generate` on the requests as one batch."""
    processor = engine.chat.processor
    texts = [engine.chat.text(asked(engine, question, image)) for question, image in requests]
    bos = processor.tokenizer.bos_token
    inputs = processor(
        text=texts,
        images=[[image] for _, image in requests],
        return_tensors="pt",
        padding=True,
        add_special_tokens=not (bos and texts[0].startswith(bos)),
    )
    with torch.no_grad():
        out = engine.model.generate(**inputs, max_new_tokens=tokens, do_sample=False)
    return out[:, inputs["input_ids"].shape[1] :].tolist()


def timed(fn, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def run_family(engine, images, repeat: int) -> tuple[list, bool]:
    lone = [(QUESTIONS[0], images[0])]
    four = list(zip(QUESTIONS, images))
    sequential = lambda: [ours(engine, [r], 64)[0] for r in four]  # noqa: E731
    for fn in (ours, own):  # warm-up
        fn(engine, lone, 4)
    times: dict[str, list[float]] = {}
    same = True
    for _ in range(repeat):
        for name, fn, requests, tokens in [
            ("ours 1", ours, lone, 1),
            ("own 1", own, lone, 1),
            ("ours 64", ours, lone, 64),
            ("own 64", own, lone, 64),
            ("ours 4", ours, four, 64),
            ("own 4", own, four, 64),
        ]:
            seconds, ids = timed(fn, engine, requests, tokens)
            times.setdefault(name, []).append(seconds)
            times.setdefault(f"{name} ids", []).append(ids)
        seconds, ids = timed(sequential)
        times.setdefault("ours 4 in turn", []).append(seconds)
        same &= ids == times["ours 4 ids"][-1] == times["own 4 ids"][-1]
        same &= times["ours 64 ids"][-1] == times["own 64 ids"][-1] and len(ids[0]) == 64
    m = {name: median(values) for name, values in times.items() if not name.endswith("ids")}
    per_ours, per_own = (m["ours 64"] - m["ours 1"]) / 63, (m["own 64"] - m["own 1"]) / 63
    return [
        f"{per_ours * 1e3:.1f} vs {per_own * 1e3:.1f}",
        f"{per_ours / per_own:.3f}x",
        f"{m['ours 1'] / m['own 1']:.3f}x",
        f"{256 / m['ours 4']:.1f} vs {256 / m['own 4']:.1f}",
        f"{m['ours 4'] / m['own 4']:.3f}x",
        f"{m['ours 4 in turn'] / m['ours 4']:.2f}x",
    ], same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--family", action="append", choices=list(BUILDERS), help="default: all three")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = sample_images(4, size=320)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.family or list(BUILDERS):
            engine = load(family, Path(tmp))
            cells, same = run_family(engine, images, args.repeat)
            rows.append([family, *cells, "yes" if same else "NO"])
    headers = ["family", "per token ms (ours vs own)", "per token", "first token", "4 at once tok/s", "4 at once"]
    headers += ["4 at once vs in turn", "same ids"]
    title = "Our engine against each family's own generate (ratios: our time / its time; tokens/s: ours vs its)"
    print_table(title, headers, rows)
    print("per token <= 1.05x: issue 30's target. 4 at once vs in turn: our 4 answered one after another / together.")


if __name__ == "__main__":
    main()
