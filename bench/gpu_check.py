"""The GPU paths in one run: precision, prefix and batch equalities, speed against the card's bandwidth, the vision
tower, a training step under autocast, 8/4-bit. Prints one table; exits 1 when a check fails.

    python bench/gpu_check.py --size 13b     # on a GPU: SkinGPT-4's real shapes, random weights, built on the card
    python bench/gpu_check.py --size tiny    # the same script on the CPU in seconds (the tests run this)

A random model with SkinGPT-4's shapes (EVA ViT-g 39 x 1408, Q-Former 12 x 768, Llama-2-13B 40 x 5120, vocabulary
32001) is built directly in memory, no files; only the core dependencies are needed (no gradio, no fastapi).
Targets (13b on a GPU): decode at batch 1 >= 70% of the bandwidth limit (weight bytes read per token over the card's
measured copy bandwidth); greedy tokens equal between cached and recomputed turns >= 99%. The rest is reported.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from skingpt4.backends.transformers_llm import TransformersLLM
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import GenerationSettings
from skingpt4.folder.load import LoadedModel, ModelInfo
from skingpt4.folder.meta import IMAGE_TOKEN, ModelMeta, make_config, qformer_config, vision_config
from skingpt4.folder.tiny import build_tiny_tokenizer, tiny_configs

LLAMA_13B = dict(
    hidden_size=5120,
    intermediate_size=13824,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=40,
    vocab_size=32001,
)
TURNS = ("What's wrong with my skin?", "What treatment do you suggest?")


class Table:
    """Rows of (check, value, target, verdict); `failed` when any verdict is a failure."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, str]] = []

    def add(self, check: str, value: str, target: str = "", ok: bool | None = None) -> None:
        self.rows.append((check, value, target, {None: "", True: "ok", False: "FAILED"}[ok]))

    @property
    def failed(self) -> bool:
        return any(row[3] == "FAILED" for row in self.rows)

    def print(self, title: str) -> None:
        widths = [max(len(r[i]) for r in [("check", "value", "target", ""), *self.rows]) for i in range(4)]
        print(title)
        for row in [("check", "value", "target", ""), *self.rows]:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())


# ---------------------------------------------------------------------------------------------------------------
# The model, built in memory


def build(size: str, device: str, dtype: torch.dtype) -> LoadedModel:
    from transformers import Blip2ForConditionalGeneration, LlamaConfig

    tokenizer = build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if size == "13b":
        vision = vision_config()  # EVA ViT-g: 39 x 1408, 16 heads
        qformer = qformer_config()  # BERT-base: 12 x 768
        _, _, text = tiny_configs(vocab_size=LLAMA_13B["vocab_size"])
        text.update(LLAMA_13B)
    else:
        vision, qformer, text = tiny_configs(vocab_size=len(tokenizer))
    config = make_config(vision, qformer, LlamaConfig(**text), image_token_id)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Blip2ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    for name in getattr(model, "_keep_in_fp32_modules", None) or []:  # as from_pretrained keeps them
        getattr(model, name).float()
    meta = ModelMeta(untrained=True, description=f"random {size} model for the GPU check")
    return LoadedModel(model, tokenizer, ModelInfo(f"gpu-check-{size}", meta), TransformersLLM(model.language_model))


def photo(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def endless(engine: ChatEngine) -> None:
    """No stop string and no EOS: every answer runs to max_new_tokens (speed and agreement over full lengths)."""
    vocab = engine.tokenizer.convert_ids_to_tokens(list(range(len(engine.tokenizer))))
    ends = [i for i, t in enumerate(vocab) if "#" in t] + [engine.tokenizer.eos_token_id]
    engine.suppress_tokens = sorted({*engine.suppress_tokens, *ends})


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# Checks


class Recorder:
    """Records each answer's new ids (around the engine's `_new_ids`) and each generated step's logits (the LM
    head's last position)."""

    def __init__(self, engine: ChatEngine):
        self.engine, self.run, self.ids, self.steps = engine, engine._new_ids, [], []
        head = engine.model.language_model.get_output_embeddings()
        self.hook = head.register_forward_hook(lambda module, args, out: self.steps.append(out[:, -1].float().cpu()))
        engine._new_ids = self

    def __call__(self, *args, **kwargs):
        new = self.run(*args, **kwargs)
        pad = self.engine.tokenizer.pad_token_id
        rows = [list(row) for row in new]
        self.ids = [row[: row.index(pad)] if pad in row else row for row in rows]  # beam search pads finished rows
        return new

    def take(self) -> tuple[list[int], list[torch.Tensor]]:
        taken, self.steps = (self.ids[0], self.steps), []
        return taken

    def close(self) -> None:
        self.hook.remove()
        self.engine._new_ids = self.run


def turns(engine: ChatEngine, feature, settings, recompute: bool, recorder: Recorder):
    """Two greedy turns about one photo; each turn's new ids and step logits."""
    session = engine.session()
    session.add_encoded(feature)
    out = []
    for question in TURNS:
        session.ask(question)
        if recompute:
            session.cache = None
        session.answer(settings)
        out.append(recorder.take())
    return out


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions, up to the first difference and counting the rest as different, where two answers agree."""
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), len(b), 1)


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor], upto: int) -> float:
    return max((float((x - y).abs().max()) for x, y in list(zip(a, b))[:upto]), default=0.0)


def check_equalities(engine: ChatEngine, table: Table, name: str, tokens: int) -> None:
    greedy = GenerationSettings.greedy(max_new_tokens=tokens)
    feature = engine.encode_images([photo(1)])[0]
    recorder = Recorder(engine)
    try:
        cached = turns(engine, feature, greedy, recompute=False, recorder=recorder)
        fresh = turns(engine, feature, greedy, recompute=True, recorder=recorder)
        shares = [agreement(a[0], b[0]) for a, b in zip(cached, fresh)]
        diff = max(max_diff(a[1], b[1], int(s * tokens)) for a, b, s in zip(cached, fresh, shares))
        share = sum(shares) / len(shares)
        table.add(f"{name} prefix reuse = recompute (tokens)", f"{share:.1%}", ">= 99%", share >= 0.99)
        table.add(f"{name} prefix reuse: max logit diff", f"{diff:.2e}")
        features = engine.encode_images([photo(10 + i) for i in range(8)])
        alone = []
        for f in features:
            session = engine.session()
            session.add_encoded(f)
            session.ask(TURNS[0])
            session.answer(greedy)
            alone.append(recorder.take()[0])
        sessions = [engine.session() for _ in features]
        for session, f in zip(sessions, features):
            session.add_encoded(f)
            session.ask(TURNS[0])
        engine.generate(sessions, greedy)
        together = recorder.ids
        share = sum(agreement(a, b) for a, b in zip(alone, together)) / len(alone)
        table.add(f"{name} batch of 8 = one at a time (tokens)", f"{share:.1%}")
    finally:
        recorder.close()


def copy_bandwidth(device: str) -> float:
    """Bytes per second the device copies (read + write), from one large tensor copy."""
    size = 2**30 if device.startswith("cuda") else 2**26
    src = torch.empty(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size / best


def check_speed(engine: ChatEngine, table: Table, device: str, tokens: int, target: bool) -> None:
    endless(engine)
    lm = engine.model.language_model
    weight_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    limit = copy_bandwidth(device) / weight_bytes  # tokens/s if each decode step reads every weight once
    features = engine.encode_images([photo(20 + i) for i in range(8)])
    for batch in (1, 8):
        sessions = [engine.session() for _ in range(batch)]
        for session, f in zip(sessions, features):
            session.add_encoded(f)
            session.ask(TURNS[0])
        settings = GenerationSettings.greedy(max_new_tokens=tokens)
        engine.generate([s for s in sessions], GenerationSettings.greedy(max_new_tokens=2))  # warm-up
        for session in sessions:
            session.ask(TURNS[1])
        sync(device)
        start = time.perf_counter()
        engine.generate(sessions, settings)
        sync(device)
        rate = batch * tokens / (time.perf_counter() - start)
        if batch == 1:
            ok = rate >= 0.7 * limit if target else None
            table.add("decode tokens/s, batch 1", f"{rate:.1f} ({rate / limit:.0%} of limit)", ">= 70%", ok)
        else:
            table.add("decode tokens/s, batch 8", f"{rate:.1f}")
    table.add("bandwidth limit tokens/s", f"{limit:.1f} ({weight_bytes / 2**30:.1f} GiB of LLM weights)")
    ids = torch.randint(3, 400, (1, 1024), device=engine.loaded.device)
    with torch.no_grad():
        lm(input_ids=ids)
        sync(device)
        start = time.perf_counter()
        lm(input_ids=ids)
        sync(device)
    table.add("prefill tokens/s (1024)", f"{1024 / (time.perf_counter() - start):.0f}")


def check_vision(engine: ChatEngine, table: Table, device: str) -> None:
    images = [photo(30 + i) for i in range(8)]
    engine.encode_images(images[:1])
    sync(device)
    start = time.perf_counter()
    engine.encode_images(images)
    sync(device)
    table.add("vision tower + Q-Former, ms per image (8)", f"{1000 * (time.perf_counter() - start) / 8:.1f}")


def check_training(loaded: LoadedModel, table: Table, device: str, lora: bool) -> None:
    from skingpt4.train.config import TrainConfig
    from skingpt4.train.data import Record, TrainDataset, collate
    from skingpt4.train.loop import make_trainable

    net = loaded.model
    try:
        make_trainable(net, TrainConfig(lora=lora))
    except ImportError as exc:  # LoRA needs peft
        table.add("training step, projection + LoRA", f"not run: {exc}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        records = []
        for i in range(2):
            path = Path(tmp) / f"{i}.png"
            photo(40 + i).save(path)
            records.append(Record(path, "This could be a skin disease image of eczema."))
        prompt = "###Human: <Img><ImageHere></Img> What is it? ###Assistant: "
        args = (loaded.tokenizer, loaded.image_token_id, "###", 160, loaded.info.meta.pixels, 0)
        samples = TrainDataset(records, [prompt], *args, train=True)
        batch = collate([samples[(0, i, 0)] for i in range(2)], loaded.tokenizer.pad_token_id)
    batch = {k: v.to(device) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(net.vision_model.embeddings.patch_embedding.weight.dtype)
    optimizer = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-4)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda" if cuda else "cpu", dtype=torch.bfloat16, enabled=cuda):
        loss = net(**batch).loss
    loss.backward()
    optimizer.step()
    peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f} GiB peak" if cuda else "CPU: no autocast"
    name = "training step, projection" + (" + LoRA" if lora else "") + (" (bf16 autocast)" if cuda else "")
    table.add(name, f"loss {loss.item():.3f}, {peak}", "finite", math.isfinite(loss.item()))


def check_quantized(table: Table, device: str) -> None:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        table.add("8-bit / 4-bit", "not run: bitsandbytes is not installed here")
        return
    if not device.startswith("cuda"):
        table.add("8-bit / 4-bit", "not run: needs CUDA")
        return
    table.add("8-bit / 4-bit", "bitsandbytes present; load a converted folder with --load-in-8bit/4bit to check")


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "13b"], default="tiny")
    parser.add_argument("--tokens", type=int, help="new tokens per answer (default 64 on a GPU, 16 on the CPU)")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    tokens = args.tokens or (64 if cuda else 16)
    table = Table()
    dtypes = [torch.float16, torch.bfloat16] if cuda else [torch.float32]
    for dtype in dtypes:
        name = str(dtype).removeprefix("torch.")
        loaded = build(args.size, device, dtype)
        engine = ChatEngine(loaded)
        check_equalities(engine, table, name, tokens)
        if dtype == dtypes[0]:
            check_vision(engine, table, device)
            check_speed(engine, table, device, tokens, target=cuda and args.size == "13b")
        del engine, loaded
        if cuda:
            torch.cuda.empty_cache()
    for lora in (False, True):
        loaded = build(args.size, device, torch.bfloat16 if cuda else torch.float32)
        check_training(loaded, table, device, lora)
        del loaded
        if cuda:
            torch.cuda.empty_cache()
    check_quantized(table, device)
    import transformers

    card = torch.cuda.get_device_name() if cuda else "CPU"
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    table.print(f"GPU check: {args.size} model on {card}, {time.strftime('%Y-%m-%d')}, {versions}")
    return 1 if table.failed else 0


if __name__ == "__main__":
    sys.exit(main())
