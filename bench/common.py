"""Shared helpers for the benchmarks: the bench model, sample images, timing and a plain-text table.

The bench model is "a small model with the real structure": 224 px / patch 14 ViT (12 x 384), a Q-Former with
cross-attention every 2nd layer (4 x 256), 32 queries, and an 8 x 512 Llama with the real 32000-token vocabulary
(so the LM head and the logits processors cost what they cost for Llama). Its tokenizer is the tiny one (513 tokens
with `<image>`); the ids it lacks must never be generated (see `load_bench_engine`).
"""

from __future__ import annotations

import io
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skingpt4.backends.transformers_llm import load_model
from skingpt4.engine.chat import ChatEngine
from skingpt4.folder.meta import qformer_config, vision_config
from skingpt4.folder.tiny import create_random_model, tiny_configs


def bench_sizes() -> tuple[dict, dict, dict]:
    """ViT 12 x 384 (6 heads, mlp 1536), Q-Former 4 x 256 (4 heads, ffn 1024), Llama 8 x 512, vocab 32000."""
    vision = vision_config(width=384, depth=12, heads=6, mlp=1536)
    qformer = qformer_config(width=256, depth=4, heads=4, ffn=1024, encoder_width=384)
    _, _, text = tiny_configs(vocab_size=32000)
    text.update(
        hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8
    )
    return vision, qformer, text


def build_bench_model(folder: str | Path, seed: int = 0) -> Path:
    return create_random_model(folder, *bench_sizes(), seed=seed)


def suppress_ids(engine, ids: list[int]) -> None:
    """Never generate `ids`: a forward hook on the engine's model's LM head sets their logits to -inf (any engine
    over a transformers model: ours on SkinGPT-4 or another family's).

    (Cheaper than a long `suppress_tokens` list, which `generate()` copies on every call and checks every step.)
    """
    index = torch.tensor(sorted(ids))
    head = engine.model.get_output_embeddings()
    head.register_forward_hook(lambda module, args, logits: logits.index_fill(-1, index, float("-inf")))


def byte_pieces(tokenizer) -> list[int]:
    """The ids of the byte-fallback pieces <0x00>..<0xFF>."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [i for i, piece in enumerate(pieces) if re.fullmatch(r"<0x[0-9A-F]{2}>", piece)]


def load_bench_engine(folder: str | Path) -> tuple[ChatEngine, list[str]]:
    """The engine on CPU float32; returns notes on what was done for the benchmark.

    Bench choice: the byte-fallback pieces <0x00>..<0xFF> are suppressed so that answers are well-formed text (a
    random model otherwise emits lone bytes that decode to U+FFFD and re-tokenize into 3 ids each, which inflates
    the history). The LM head still computes all 32000 logits.
    """
    engine = ChatEngine(load_model(folder, device="cpu", dtype="float32"))
    ids = byte_pieces(engine.tokenizer)
    suppress_ids(engine, ids)
    return engine, [f"bench choice: suppressed the {len(ids)} byte-fallback ids so answers are well-formed text"]


def sample_images(n: int, size: int = 320) -> list[Image.Image]:
    """Deterministic RGB images: alternately a solid colour and a colour with noise (skin-ish tones)."""
    rng = np.random.default_rng(0)
    images = []
    for i in range(n):
        base = np.array([150 + 6 * i % 100, 90 + 11 * i % 80, 70 + 13 * i % 60], dtype=np.float32)
        pixels = np.broadcast_to(base, (size, size, 3)).copy()
        if i % 2:
            pixels += rng.normal(0, 25, pixels.shape)
        images.append(Image.fromarray(pixels.clip(0, 255).astype(np.uint8), "RGB"))
    return images


def jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def measure(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> tuple[list[float], object]:
    """Run `fn` warmup + repeat times; return the timed seconds and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return times, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """min..max, to show how noisy the machine was."""
    return f"{min(values):.3f}..{max(values):.3f}"


NUMBER = re.compile(r"[\d.]+(x|\.\.[\d.]+)?$")  # right-aligned cells: 1.23, 4.5x, 0.1..0.3


def print_table(title: str, headers: list[str], rows: list[list]) -> None:
    cells = [[str(c) for c in row] for row in [headers, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    line = "-+-".join("-" * w for w in widths)
    print(f"\n{title}")
    print(line)
    for n, row in enumerate(cells):
        print(" | ".join(c.rjust(w) if n and NUMBER.match(c) else c.ljust(w) for c, w in zip(row, widths)))
        if n == 0:
            print(line)
    print(line)
