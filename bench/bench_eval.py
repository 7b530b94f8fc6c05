"""Claim: `eval` answers images in left-padded batches, so batch 8 evaluates more images per second than one image
at a time (the baseline), with the same greedy predictions.

Method: the bench model (common.py: real structure, 8 x 512 Llama, vocab 32000) on CPU float32; 16 generated
320 x 320 JPEGs with a manifest of 3 labels and Fitzpatrick types; `run_eval` in open mode (default question,
greedy, 16 new tokens) into a fresh folder per run, at batch 8 and batch 1, interleaved, after a warm-up of each;
medians of REPEAT runs. Each run includes its fixed cost (metrics with 200 bootstrap draws, report with PNGs),
which is timed on its own as well. Choice mode (3 candidates: one forward pass per image and candidate) is
measured the same way. Predictions of the two batch sizes are compared image by image.

Run:  python bench/bench_eval.py      (about 4-6 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
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
from skingpt4.evaluate import run as evaluate

IMAGES = 16
NEW_TOKENS = 16
REPEAT = 2
BATCHES = (8, 1)
LABELS = ["eczema", "psoriasis", "melanoma"]


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="skingpt4-bench-") as tmp:
        tmp = Path(tmp)
        engine, notes = load_bench_engine(build_bench_model(tmp / "model"))
        items = write_set(tmp / "data")
        settings = GenerationSettings.greedy(max_new_tokens=NEW_TOKENS)
        runs = 0
        finish_times: list[float] = []
        real_finish = evaluate.finish

        def timed_finish(*args, **kwargs):
            start = time.perf_counter()
            result = real_finish(*args, **kwargs)
            finish_times.append(time.perf_counter() - start)
            return result

        evaluate.finish = timed_finish  # to split the fixed cost (metrics, report) from answering

        def run(mode: str, batch_size: int) -> dict[str, str]:
            nonlocal runs
            runs += 1
            out = tmp / f"out-{runs}"
            evaluate.run_eval(
                engine, items, out, mode=mode, settings=settings, batch_size=batch_size, n_boot=200, progress=False
            )
            records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
            return {r["image"]: r["prediction"] if mode == "choice" else r["answers"][0] for r in records}

        tables = {}
        for mode in ("open", "choice"):
            for batch_size in BATCHES:
                run(mode, batch_size)  # warm-up
            times: dict[int, list[float]] = {b: [] for b in BATCHES}
            answers: dict[int, dict[str, str]] = {}
            for _ in range(REPEAT):  # interleaved, so that a noisy spell hits both
                for batch_size in BATCHES:
                    t, answers[batch_size] = measure(lambda m=mode, b=batch_size: run(m, b), repeat=1, warmup=0)
                    times[batch_size] += t
            tables[mode] = (times, sum(answers[1][k] != answers[8][k] for k in answers[1]))

    print("\n".join(notes))
    print(
        f"{IMAGES} images, {len(LABELS)} labels, greedy, {NEW_TOKENS} new tokens (open), {REPEAT} repeats (median), "
        f"torch threads {torch.get_num_threads()}"
    )
    print(f"fixed cost per run (metrics.json + report with PNGs): median {median(finish_times):.2f} s")
    for mode, (times, mismatches) in tables.items():
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
        print_table(
            f"eval throughput, {mode} mode, bench model on CPU (whole run, report included)",
            ["run", "median s", "min..max s", "images/s", "vs batch 1"],
            rows,
        )
        print(f"{mode}: outputs differing between batch 8 and batch 1: {mismatches} of {IMAGES}")


def write_set(folder: Path):
    folder.mkdir()
    rows = []
    for i, image in enumerate(sample_images(IMAGES)):
        (folder / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(image))
        rows.append({"image": f"img{i:02d}.jpg", "label": LABELS[i % 3], "fitzpatrick": i % 6 + 1})
    (folder / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return collect([str(folder / "set.jsonl")])


if __name__ == "__main__":
    main()
