"""Question: how much of a training step waits for data (image decoding and the random-crop transform), and do
data-loading workers pay off? Reported: samples/s for the tiny and the small model, and the data-wait share.

Method: the tiny model and the bench model (common.py: ViT 12 x 384, Q-Former 4 x 256, Llama 8 x 512, vocab 32000)
on CPU float32, projection-only training (the default), batch 8, the step-2 caption format, on 32 generated 512 x 512
JPEGs (solid and noisy skin tones) with the original's train transform (random resized crop, bicubic to 224).
Each model trains with `num_workers` 0 (the baseline: images decoded in the training process) and 2, in the same
run, three times interleaved (medians). Figures come from each run's own log.jsonl: the first step (warm-up, worker
start) is left out; samples/s is samples over the remaining steps' seconds, "data wait" is the time `next(batch)`
blocked, as a share of step time.

Reading: on a machine with few cores the workers take cores from the model, so they shorten the wait but
need not raise samples/s; where the model dominates the step (the small model) data is a few percent anyway.

Run:  python bench/bench_train.py      (about 3-4 minutes on 2 CPU cores)
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import build_bench_model, jpeg_bytes, median, print_table, sample_images, spread

from skingpt4.folder.tiny import create_tiny_model
from skingpt4.train.loop import load_config, train

IMAGES = 32
BATCH = 8
STEPS = {"tiny": 25, "small (bench model)": 6}
REPEAT = 3
WORKERS = (0, 2)
WORDS = ("psoriasis", "eczema", "melanoma", "acne")


def write_data(folder: Path) -> Path:
    folder.mkdir(parents=True)
    lines = []
    for i, image in enumerate(sample_images(IMAGES, size=512)):
        (folder / f"img{i:02d}.jpg").write_bytes(jpeg_bytes(image))
        caption = f"This could be a skin disease image of {WORDS[i % len(WORDS)]}."
        lines.append(json.dumps({"image": f"img{i:02d}.jpg", "caption": caption, "split": "train"}))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "manifest.jsonl"


def run(model: Path, data: Path, out: Path, steps: int, workers: int) -> dict:
    overrides = dict(
        model=str(model),
        data=str(data),
        output_dir=str(out),
        batch_size=BATCH,
        epochs=1,
        iters_per_epoch=steps,
        warmup_steps=0,
        num_workers=workers,
        checkpoint_every=10_000,
        val_every=10_000,
        export_folder=False,
        export_pth=False,
    )
    train(load_config(None, overrides), progress=False)
    lines = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()][1:]
    seconds = sum(line["seconds"] for line in lines)
    waited = sum(line["data_seconds"] for line in lines)
    return {"samples_s": BATCH * len(lines) / seconds, "s_step": seconds / len(lines), "wait": waited / seconds}


def main() -> None:
    results: dict[tuple[str, int], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="skingpt4-bench-train-") as tmp:
        tmp = Path(tmp)
        data = write_data(tmp / "data")
        models = {"tiny": create_tiny_model(tmp / "tiny"), "small (bench model)": build_bench_model(tmp / "small")}
        for repeat in range(REPEAT):  # interleaved, so that a noisy spell of the machine hits every setting
            for name, folder in models.items():
                for workers in WORKERS:
                    out = tmp / f"run-{name[:5]}-{workers}-{repeat}"
                    results.setdefault((name, workers), []).append(run(folder, data, out, STEPS[name] + 1, workers))

    rows = []
    for name in models:
        base = median([r["samples_s"] for r in results[name, WORKERS[0]]])
        for workers in WORKERS:
            runs = results[name, workers]
            rate = median([r["samples_s"] for r in runs])
            rows.append(
                [
                    name,
                    str(workers),
                    f"{median([r['s_step'] for r in runs]):.3f}",
                    f"{rate:.1f}",
                    spread([r["samples_s"] for r in runs]),
                    f"{100 * median([r['wait'] for r in runs]):.1f}",
                    f"{rate / base:.2f}x",
                ]
            )
    print(
        f"{IMAGES} JPEGs of 512 x 512, batch {BATCH}, projection only, CPU float32, torch threads "
        f"{torch.get_num_threads()}; timed steps {STEPS}, median of {REPEAT} interleaved runs"
    )
    print_table(
        "training throughput on CPU (baseline: num_workers 0, same model, same run)",
        ["model", "workers", "s/step", "samples/s", "min..max", "data wait %", "vs workers 0"],
        rows,
    )


if __name__ == "__main__":
    main()
