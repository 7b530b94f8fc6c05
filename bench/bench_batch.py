"""Claim: bulk `diagnose` answers images in left-padded batches, so batch 8 has a higher throughput than one image
at a time, with the same greedy answers (target: >= 2.5x images/second).

Method: the bench model (common.py: real structure, 8 x 512 Llama, vocab 32000) on CPU float32; 16 generated
320 x 320 JPEGs (solid and noisy skin tones) in a temp folder; `diagnose` with the default question, greedy,
32 new tokens, into a fresh JSONL file per run, at batch 8 and at batch 1 (the baseline), interleaved, after a
warm-up of each; medians of REPEAT runs. The answers of the two batch sizes are compared image by image. A second
table splits one batch into its stages (image encoding, prefill, 32 decode steps) at batch 1 and 8, to show where
batching pays off and where it cannot on this machine.

Run:  python bench/bench_batch.py      (about 3-4 minutes on 2 CPU cores)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import (
    build_bench_model,
    jpeg_bytes,
    load_bench_engine,
    measure,
    median,
    print_table,
    sample_images,
    spread,
)

from skingpt4.data.manifest import collect
from skingpt4.engine.settings import GenerationSettings
from skingpt4.inputs.conversation import DEFAULT_QUESTION
from skingpt4.serve.diagnose import diagnose, results_file

IMAGES = 16
NEW_TOKENS = 32
REPEAT = 3
BATCHES = (8, 1)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="skingpt4-bench-") as tmp:
        tmp = Path(tmp)
        engine, notes = load_bench_engine(build_bench_model(tmp / "model"))
        (tmp / "images").mkdir()
        for i, image in enumerate(sample_images(IMAGES)):
            (tmp / "images" / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(image))
        items = collect([str(tmp / "images")])
        settings = GenerationSettings.greedy(max_new_tokens=NEW_TOKENS)
        runs = 0

        def run(batch_size: int) -> dict[str, str]:
            nonlocal runs
            runs += 1
            out = results_file(tmp / f"out-{runs}.jsonl")
            diagnose(engine, items, out, [DEFAULT_QUESTION], settings, batch_size=batch_size, progress=False)
            return {r["image"]: r["answer"] if r["error"] is None else f"ERROR {r['error']}" for r in out.records()}

        for batch_size in BATCHES:
            run(batch_size)  # warm-up
        times: dict[int, list[float]] = {b: [] for b in BATCHES}
        answers: dict[int, dict[str, str]] = {}
        for _ in range(REPEAT):  # interleaved, so that a noisy spell hits both
            for batch_size in BATCHES:
                t, answers[batch_size] = measure(lambda b=batch_size: run(b), repeat=1, warmup=0)
                times[batch_size] += t
        stages = stage_times(engine, items, settings)

    base = IMAGES / median(times[1])
    rows = []
    for batch_size in sorted(BATCHES):
        seconds = median(times[batch_size])
        rows.append(
            [
                f"batch {batch_size}",
                f"{seconds:.2f}",
                spread(times[batch_size]),
                f"{IMAGES / seconds:.2f}",
                f"{IMAGES / seconds / base:.2f}x",
            ]
        )
    mismatches = sum(answers[1][key] != answers[8][key] for key in answers[1])
    print("\n".join(notes))
    print(
        f"{IMAGES} images, 1 question, greedy, {NEW_TOKENS} new tokens, {REPEAT} repeats (median), "
        f"torch threads {torch.get_num_threads()}"
    )
    print_table(
        "diagnose throughput, bench model on CPU",
        ["run", "median s", "min..max s", "images/s", "vs batch 1"],
        rows,
    )
    empty = sum(not answer for answer in answers[1].values())
    print(
        f"answers differing between batch 8 and batch 1: {mismatches} of {len(answers[1])} "
        f"({len(set(answers[1].values()))} distinct answers, {empty} empty)"
    )
    print_table(
        "Where the time goes: one batch, per image (median of 3)",
        ["stage", "batch 1 s/image", "batch 8 s/image", "batch 8 gain"],
        [[name, f"{one:.4f}", f"{eight:.4f}", f"{one / eight:.2f}x"] for name, one, eight in stages],
    )


def stage_times(engine, items, settings) -> list[tuple[str, float, float]]:
    """Per-image seconds of image encoding, prefill (first token) and the remaining decode steps, at batch 1 and 8."""
    from PIL import Image

    images = [Image.open(item.path).convert("RGB") for item in items[:8]]
    first = GenerationSettings.greedy(max_new_tokens=1)
    result = {}
    for batch_size in (1, 8):
        features = engine.encode_images(images[:batch_size])

        def answer(new_settings, features=features):
            sessions = []
            for feature in features:
                session = engine.session()
                session.add_encoded(feature)
                session.ask(DEFAULT_QUESTION)
                sessions.append(session)
            return engine.generate(sessions, new_settings)

        encode, _ = measure(lambda n=batch_size: engine.encode_images(images[:n]), repeat=3)
        prefill, _ = measure(lambda: answer(first), repeat=3)
        full, _ = measure(lambda: answer(settings), repeat=3)
        result[batch_size] = [median(encode), median(prefill), median(full) - median(prefill)]
        result[batch_size] = [seconds / batch_size for seconds in result[batch_size]]
    names = ["encode image (ViT + Q-Former)", "prefill + 1st token", f"{NEW_TOKENS - 1} more decode steps"]
    rows = [(name, result[1][i], result[8][i]) for i, name in enumerate(names)]
    rows.append(("total", sum(result[1]), sum(result[8])))
    return rows


if __name__ == "__main__":
    main()
