"""Claim: `--quantize int8|int4` (the LLM on llama.cpp, `quantized.py`) decodes several times faster than today's
float32 path on a CPU, in less memory, at a measured cost in agreement; and a 13B model runs in int4 on this machine.

Targets (issue 15; README, Benchmarks), on a 1B-class Llama (16 x 2048, vocab 32000) with the bench model's ViT and
Q-Former, 2 CPU cores: decode tokens/s int8 >= 1.8x and int4 >= 3x float32's; resident memory vs float32; greedy
token agreement with float32 over 5 prompts x 64 tokens, and the mean KL divergence of next-token distributions.
Then a random model with Llama-2-13B's shapes (40 x 5120, vocab 32001) and the real ViT-g / Q-Former, in int4 with
the towers in bfloat16: peak resident memory (target <= 10 GB for the whole system) and tokens/s.

Method: each configuration runs in its own process (peak RSS = that process's VmHWM: it loads the model,
encodes 5 photos, prefills 5 prompts and decodes). float32 is today's path, transformers on PyTorch. All go
through the engine's own prefill/step (`llm.py`), one prompt at a time, so the prompt ids, the image slots and the
masks are the same code. Decode tokens/s = token steps / their time. Agreement: each quantized model is fed
float32's greedy tokens (teacher forcing) and its own top token is compared with float32's at each of the 64
positions (top-1 agreement); KL(float32 || quantized) of the masked next-token distributions at those positions;
and how many tokens its own free-running greedy answer shares with float32's before the first difference. Random
weights: the distributions are much flatter than a trained model's, so near-ties (and so disagreements) are more
common than they would be on the released weights. The GGUF files are written before the timed processes start
(once; their writing time is printed). Bench choice: EOS, `#` pieces and the byte-fallback pieces are never
generated (as in the other benches), so each answer is 64 tokens.

Run:  python bench/bench_quantized.py [--skip-13b]   (about 13 minutes on 2 CPU cores, 13B included; needs about
      14 GB of disk for the model files, written under a temporary folder and removed afterwards)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import bench_sizes, print_table, sample_images

PROMPTS, NEW_TOKENS, LARGE_TOKENS = 5, 64, 16
QUESTIONS = [
    "What is this lesion?",
    "Could this be melanoma? It has grown over the summer.",
    "Describe the colour and border of this spot.",
    "Is this eczema or psoriasis?",
    "What treatment would you suggest for this rash?",
]


def text_1b() -> dict:
    _, _, text = bench_sizes()
    text.update(hidden_size=2048, intermediate_size=5632, num_hidden_layers=16)
    return {**text, "num_attention_heads": 16, "num_key_value_heads": 16, "head_dim": 128}


def text_13b() -> dict:
    _, _, text = bench_sizes()
    text.update(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, vocab_size=32001)
    return {**text, "num_attention_heads": 40, "num_key_value_heads": 40, "head_dim": 128}


# -- building ----------------------------------------------------------------------------------------------------


def build_1b(folder: Path) -> None:
    from skingpt4.folder.tiny import create_random_model

    vision, qformer, _ = bench_sizes()
    create_random_model(folder, vision, qformer, text_1b())


def build_13b(folder: Path) -> None:
    """The real ViT-g and Q-Former, random; the LLM's layers only in the int4 GGUF, written tensor by tensor with
    random values (a float32 13B would need 52 GB): the folder holds its embeddings and head, as a converted one."""
    from transformers import LlamaConfig

    from skingpt4.backends.gguf import gguf_path, gguf_tensors, write_gguf
    from skingpt4.folder.meta import qformer_config, vision_config
    from skingpt4.folder.tiny import create_random_model

    text = text_13b()
    create_random_model(folder, vision_config(), qformer_config(), {**text, "num_hidden_layers": 0})
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    config["text_config"]["num_hidden_layers"] = text["num_hidden_layers"]
    config_file.write_text(json.dumps(config, indent=2))
    shapes = {name: shape for _, name, shape in gguf_tensors(LlamaConfig(**text))}
    rng = np.random.default_rng(0)

    def weight(name: str) -> np.ndarray:
        if len(shapes[name]) == 1:
            return np.ones(shapes[name], np.float32)
        return rng.standard_normal(shapes[name], dtype=np.float32) * 0.02

    out = gguf_path(folder, "int4")
    out.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(out, LlamaConfig(**text), weight, "int4")


# -- measuring (one process per configuration) ------------------------------------------------------------------


def never(engine) -> list[int]:
    """Ids never generated in this bench: EOS, pieces with `#`, byte-fallback pieces (the engine's mask)."""
    pieces = engine.tokenizer.convert_ids_to_tokens(list(range(len(engine.tokenizer))))
    banned = [i for i, p in enumerate(pieces) if "#" in p or (p.startswith("<0x") and p.endswith(">"))]
    return [*engine.suppress_tokens, *banned, engine.tokenizer.eos_token_id]


def decode(engine, ids, features, tokens: int, forced: list[int] | None = None):
    """Prefill, then `tokens` greedy steps (or steps feeding `forced`); returns (chosen ids, masked logits,
    prefill seconds, step seconds)."""
    with torch.no_grad():
        start = time.perf_counter()
        cache = engine.llm.new_cache()
        mask, logits = engine.prefill([(ids, features)], cache)
        prefill_s, stepping = time.perf_counter() - start, 0.0
        chosen, seen = [], []
        for n in range(tokens):
            scores = engine.forbid(None, logits.float())
            seen.append(scores[0])
            chosen.append(int(scores.argmax(-1)))
            if n == tokens - 1:
                break
            token = forced[n] if forced is not None else chosen[-1]
            mask = torch.cat([mask, mask.new_ones(1, 1)], dim=1)
            start = time.perf_counter()
            logits = engine.llm.step(torch.tensor([token]), mask, mask.sum(-1) - 1, cache)
            stepping += time.perf_counter() - start
    return chosen, torch.stack(seen), prefill_s, stepping


def measure(folder: Path, kind: str, dtype: str, out: Path, prompts: int, tokens: int, reference: Path | None):
    from skingpt4.backends.llamacpp import load_quantized
    from skingpt4.backends.transformers_llm import load_model
    from skingpt4.engine.chat import ChatEngine
    from skingpt4.engine.settings import EngineSettings, GenerationSettings

    start = time.perf_counter()
    loaded = (
        load_model(folder, device="cpu", dtype=dtype) if kind == "float32" else load_quantized(folder, kind, dtype)
    )
    engine = ChatEngine(loaded, settings=EngineSettings(max_batch=1))
    engine.suppress_tokens = never(engine)
    load_s = time.perf_counter() - start
    parts = memory_parts(loaded, folder, kind)
    forced, expected_logits = (None, None)
    if reference:
        saved = np.load(reference)
        forced, expected_logits = saved["tokens"], saved["logits"]
    result = {**parts, "load_s": load_s, "prefill_s": 0.0, "step_s": 0.0, "steps": 0, "agree": 0}
    result.update(kl=[], prefix=[])
    saved_tokens, saved_logits = [], []
    for n, image in enumerate(sample_images(prompts)):
        session = engine.session()
        session.add_encoded(engine.encode_images([image])[0])
        session.ask(QUESTIONS[n])
        ids, photos, _ = engine.chat.prompt(session, GenerationSettings.greedy(max_new_tokens=tokens))
        features = torch.stack(photos)
        chosen, logits, prefill_s, step_s = decode(engine, ids, features, tokens)
        result["prefill_s"] += prefill_s
        result["step_s"] += step_s
        result["steps"] += tokens - 1
        if forced is None:
            saved_tokens.append(chosen)
            saved_logits.append(logits.numpy())
            continue
        same = next((i for i, (a, b) in enumerate(zip(chosen, forced[n])) if a != b), tokens)
        result["prefix"].append(same)
        _, taught, _, _ = decode(engine, ids, features, tokens, forced=list(forced[n]))
        expected = torch.from_numpy(expected_logits[n])
        result["agree"] += int((taught.argmax(-1) == expected.argmax(-1)).sum())
        p, q = expected.log_softmax(-1), taught.log_softmax(-1)
        kl = (p.exp() * (p - q)).nan_to_num().sum(-1)  # masked ids: 0 * (-inf - -inf) counts nothing
        result["kl"].append(float(kl.mean()))
    result["rss_gb"] = peak_rss_gb()
    if forced is None and saved_tokens:
        np.savez(out.with_suffix(".npz"), tokens=np.array(saved_tokens), logits=np.stack(saved_logits))
    out.write_text(json.dumps(result))


def memory_parts(loaded, folder: Path, kind: str) -> dict:
    """Where a configuration's memory goes: PyTorch's parameters (the towers, the token embeddings, and in float32
    the LLM), the LLM's GGUF file, and llama.cpp's key/value store (16-bit keys and values, `KV_CELLS` positions)."""
    from skingpt4.backends.gguf import gguf_path
    from skingpt4.backends.llamacpp import KV_CELLS

    params = sum(p.numel() * p.element_size() for p in loaded.model.parameters() if p.device.type != "meta")
    parts = {"torch_gb": params / 2**30, "gguf_gb": 0.0, "kv_gb": 0.0}
    if kind != "float32":
        text = loaded.model.config.text_config
        parts["gguf_gb"] = gguf_path(folder, kind).stat().st_size / 2**30
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        width = text.num_key_value_heads * head_dim
        parts["kv_gb"] = 2 * text.num_hidden_layers * width * KV_CELLS * 2 / 2**30
    return parts


def torch_kernels() -> list[list[str]]:
    """PyTorch's own CPU kernels for int8 and int4 weights (what torchao's weight-only quantization calls on a
    CPU), against its float32 matrix product: one row through one 5632 x 2048 layer of the 1B model. The values
    are random; only the time is read."""
    from common import measure as timed
    from common import median

    out_features, in_features, group = 5632, 2048, 128
    x, w = torch.randn(1, in_features), torch.randn(out_features, in_features) * 0.02
    scales = w.abs().amax(1) / 127
    int8 = (w / scales[:, None]).round().to(torch.int8)
    int4 = torch.randint(0, 16, (out_features, in_features), dtype=torch.int32)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(int4, 1)
    scales_and_zeros = torch.rand(in_features // group, out_features, 2)
    kernels = {
        "float32 (linear)": lambda: torch.nn.functional.linear(x, w),
        "int8 (_weight_int8pack_mm)": lambda: torch.ops.aten._weight_int8pack_mm(x, int8, scales),
        "int4 (_weight_int4pack_mm_for_cpu)": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, group, scales_and_zeros
        ),
    }
    times = {name: median(timed(run, repeat=50, warmup=5)[0]) * 1e3 for name, run in kernels.items()}
    base = times["float32 (linear)"]
    return [[name, f"{ms:.2f}", f"{ms / base:.2f}x"] for name, ms in times.items()]


def peak_rss_gb() -> float:
    """This process's peak resident memory since it started (VmHWM: `ru_maxrss` would carry over the parent's
    peak, as Linux keeps it across exec)."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 2**20


def run(folder: Path, kind: str, work: Path, prompts=PROMPTS, tokens=NEW_TOKENS, reference=None, dtype="float32"):
    out = work / f"{folder.name}-{kind}.json"
    command = [sys.executable, __file__, "--measure", str(folder), kind, dtype, str(out), str(prompts), str(tokens)]
    subprocess.run([*command, str(reference) if reference else "-"], check=True)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--skip-13b", action="store_true")
    parser.add_argument("--measure", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        folder, kind, dtype, out, prompts, tokens, reference = args.measure
        reference = None if reference == "-" else Path(reference)
        return measure(Path(folder), kind, dtype, Path(out), int(prompts), int(tokens), reference)
    work = Path(tempfile.mkdtemp(prefix="bench-quantized-"))
    os.environ["SKINGPT4_HOME"] = str(work / "home")  # the GGUF files go here, and are removed with it
    try:
        report(work, args.skip_13b)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(work: Path, skip_13b: bool) -> None:
    from transformers import Blip2Config

    from skingpt4.backends.gguf import gguf_file

    folder = work / "llama-1b"
    start = time.perf_counter()
    build_1b(folder)
    print(f"built the 1B-class model in {time.perf_counter() - start:.0f} s")
    for kind in ("int8", "int4"):
        start = time.perf_counter()
        path = gguf_file(folder, kind, Blip2Config.from_pretrained(folder).text_config)
        print(f"wrote {kind} GGUF ({path.stat().st_size / 2**30:.2f} GiB) in {time.perf_counter() - start:.1f} s")
    print_table(
        "PyTorch's own quantized CPU kernels (the torchao route), one row, one 5632 x 2048 layer",
        ["kernel", "ms", "vs float32"],
        torch_kernels(),
    )
    base = run(folder, "float32", work)
    reference = work / f"{folder.name}-float32.npz"
    rows, total = [], PROMPTS * NEW_TOKENS
    base_rate = base["steps"] / base["step_s"]
    rows.append(["float32 (transformers)", f"{base_rate:.2f}", "1.00x", f"{base['rss_gb']:.2f}", "1.00x", *"---"])
    for kind, target in (("int8", 1.8), ("int4", 3.0)):
        r = run(folder, kind, work, reference=reference)
        rate = r["steps"] / r["step_s"]
        rows.append(
            [
                f"{kind} (llama.cpp) [>= {target}x]",
                f"{rate:.2f}",
                f"{rate / base_rate:.2f}x",
                f"{r['rss_gb']:.2f}",
                f"{r['rss_gb'] / base['rss_gb']:.2f}x",
                f"{r['agree']}/{total} ({r['agree'] / total:.1%})",
                f"{np.mean(r['kl']):.2e}",
                "/".join(str(p) for p in r["prefix"]),
            ]
        )
    print_table(
        f"1B-class Llama (16 x 2048, vocab 32000), {torch.get_num_threads()} threads, {PROMPTS} x {NEW_TOKENS} tokens",
        ["LLM", "decode tok/s", "ratio", "peak RSS GB", "ratio", "top-1 agreement", "mean KL", "same first tokens"],
        rows,
    )
    shutil.rmtree(folder)
    if skip_13b:
        return
    folder = work / "llama-13b"
    start = time.perf_counter()
    build_13b(folder)
    print(f"\nbuilt the 13B-shaped model (towers, embeddings, int4 GGUF) in {time.perf_counter() - start:.0f} s")
    r = run(folder, "int4", work, prompts=1, tokens=LARGE_TOKENS, dtype="bfloat16")
    print_table(
        "Llama-2-13B shapes (40 x 5120, vocab 32001), int4; ViT-g and Q-Former in bfloat16; one photo",
        ["load s", "prefill s", "decode tok/s", "peak RSS GB [<= 10]", "int4 GGUF GB", "KV store GB", "torch GB"],
        [
            [
                f"{r['load_s']:.1f}",
                f"{r['prefill_s']:.1f}",
                f"{r['steps'] / r['step_s']:.2f}",
                f"{r['rss_gb']:.2f}",
                f"{r['gguf_gb']:.2f}",
                f"{r['kv_gb']:.2f}",
                f"{r['torch_gb']:.2f}",
            ]
        ],
    )


if __name__ == "__main__":
    main()
