"""Claim: `skingpt4 convert` streams tensors into shards, so its peak memory stays near one shard, not the model:
converting a 7B SkinGPT-4 needs about as much RAM as its largest source file, not the sum of all of them.

Method: write source files with the real shapes, layouts and dtypes (all values zero) under a temp folder on /tmp:
`eva_vit_g.pth` (EVA ViT-g, 40 blocks of 1408 wide, mlp 6144, float16, ~2.0 GB, flat dict), the LAVIS Q-Former file
(12 x 768, cross-attention every 2nd layer, encoder width 1408, float32, ~413 MB, from tests/lavis_reference.py), a
projection checkpoint ({"model": llama_proj [4096, 768] fp32}), and a Llama-2-7b-hf folder (real config.json, two
float16 safetensors shards of ~9.98 + ~3.5 GB written tensor by tensor, and a SentencePiece tokenizer padded to
Llama's 32000 pieces so that `<image>` becomes id 32000 and the embedding/LM-head rows grow as for the real one).
Then run `python -m skingpt4 convert` (default 2 GiB output shards) in a child process, read its peak RSS from
getrusage(RUSAGE_CHILDREN), and sample /proc/PID/smaps every 0.25 s to show what is resident at the peak: each
memory-mapped source file (file-backed pages, reclaimable) and the anonymous heap. The baseline is the
largest source file, measured in the same run. Everything is deleted at the end.

Run:  python bench/bench_convert_memory.py      (needs ~36 GB free on /tmp; about 2-4 minutes)
"""

from __future__ import annotations

import json
import re
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))

from common import print_table  # noqa: E402
from lavis_reference import TinyDims, make_eva_vit_state_dict, make_qformer_checkpoint  # noqa: E402

GB = 10**9
NEEDED_BYTES = 36 * GB  # sources ~16 GB + the converted folder ~16 GB + slack
LLAMA_SHARD_BYTES = 9_976_576_152  # model-00001-of-00002.safetensors of Llama-2-7b-hf
REAL = TinyDims(
    vit_width=1408,
    vit_depth=39,
    vit_heads=16,
    vit_mlp=6144,
    image_size=224,
    qformer_width=768,
    qformer_depth=12,
    qformer_heads=12,
    qformer_ffn=3072,
    llm_width=4096,
    t5_width=4096,
)
LLAMA_2_7B = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}


# ---------------------------------------------------------------------------------------------------------------
# Source files


def write_vit(path: Path) -> None:
    """eva_vit_g.pth: the key layout of `make_eva_vit_state_dict` (checked on tiny dims), zeros, float16."""
    d, m, p = REAL.vit_width, REAL.vit_mlp, REAL.patch_size
    shapes = {
        "cls_token": (1, 1, d),
        "pos_embed": (1, REAL.num_tokens, d),
        "patch_embed.proj.weight": (d, 3, p, p),
        "patch_embed.proj.bias": (d,),
    }
    for i in range(REAL.vit_depth + 1):  # 40 blocks, like the real file
        block = {
            "norm1.weight": (d,),
            "norm1.bias": (d,),
            "attn.q_bias": (d,),
            "attn.v_bias": (d,),
            "attn.qkv.weight": (3 * d, d),
            "attn.proj.weight": (d, d),
            "attn.proj.bias": (d,),
            "norm2.weight": (d,),
            "norm2.bias": (d,),
            "mlp.fc1.weight": (m, d),
            "mlp.fc1.bias": (m,),
            "mlp.fc2.weight": (d, m),
            "mlp.fc2.bias": (d,),
        }
        shapes.update({f"blocks.{i}.{k}": v for k, v in block.items()})
    tiny = make_eva_vit_state_dict(TinyDims(), torch.Generator().manual_seed(0))
    if set(tiny) != {k for k in shapes if not k.startswith("blocks.") or int(k.split(".")[1]) <= TinyDims().vit_depth}:
        raise SystemExit("ViT key layout differs from tests/lavis_reference.py")
    torch.save({k: torch.zeros(v, dtype=torch.float16) for k, v in shapes.items()}, path)


def write_qformer(path: Path) -> None:
    """blip2_pretrained_flant5xxl.pth at the real size (float32, random values from the test helper)."""
    torch.save(make_qformer_checkpoint(REAL, torch.Generator().manual_seed(0)), path)


def write_projection(path: Path) -> None:
    w = REAL.qformer_width
    torch.save({"model": {"llama_proj.weight": torch.zeros(4096, w), "llama_proj.bias": torch.zeros(4096)}}, path)


def llama_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Llama-2 tensor names and shapes, in the order of the released checkpoint."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = {"model.embed_tokens.weight": (v, h)}
    for i in range(config["num_hidden_layers"]):
        for name, shape in (
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (h, h)),
            ("self_attn.v_proj", (h, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (f, h)),
            ("mlp.up_proj", (f, h)),
            ("mlp.down_proj", (h, f)),
            ("input_layernorm", (h,)),
            ("post_attention_layernorm", (h,)),
        ):
            shapes[f"model.layers.{i}.{name}.weight"] = shape
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_safetensors_zeros(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A float16 safetensors file of zeros, streamed: header, then zero bytes in 64 MiB writes (low memory)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.Size(shape).numel())
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    chunk = bytes(64 * 2**20)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for _ in range(offset // len(chunk)):
            f.write(chunk)
        f.write(chunk[: offset % len(chunk)])


def write_tokenizer(folder: Path) -> None:
    """The tiny SentencePiece BPE (as `build_tiny_tokenizer` trains it) padded to 32000 pieces, WITHOUT `<image>`."""
    from sentencepiece import sentencepiece_model_pb2 as pb
    from transformers import LlamaTokenizer

    from skingpt4.folder.tiny import train_tiny_sentencepiece

    proto = pb.ModelProto()
    proto.ParseFromString(train_tiny_sentencepiece())
    low = min(piece.score for piece in proto.pieces)
    for i in range(len(proto.pieces), LLAMA_2_7B["vocab_size"]):  # never produced by tokenization: filler ids
        proto.pieces.add(piece=f"\u2581pad{i:05d}", score=low - 1 - i, type=pb.ModelProto.SentencePiece.NORMAL)
    (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    LlamaTokenizer.from_pretrained(folder).save_pretrained(folder)


def write_llm(folder: Path) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_2_7B, indent=2) + "\n")
    write_tokenizer(folder)
    shards: list[dict] = [{}]
    used = 0
    for key, shape in llama_shapes(LLAMA_2_7B).items():
        size = 2 * int(torch.Size(shape).numel())
        if used + size > LLAMA_SHARD_BYTES:
            shards.append({})
            used = 0
        shards[-1][key] = shape
        used += size
    weight_map = {}
    for i, shapes in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors_zeros(folder / name, shapes)
        weight_map.update(dict.fromkeys(shapes, name))
    index = {
        "metadata": {"total_size": sum(2 * torch.Size(s).numel() for d in shards for s in d.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------------
# The measured run


MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ \S+ \S+ \S+ \S+\s*(.*)$")


def rss_by_mapping(pid: int, root: Path) -> Counter:
    """Resident bytes of a process by what is mapped: each source file under `root`, anonymous memory, the rest."""
    rss: Counter = Counter()
    name = "other"
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                if match := MAPPING.match(line):
                    path = match.group(1)
                    if path.startswith(str(root)):
                        name = Path(path).name
                    elif not path or path.startswith("[heap]") or path.startswith("[anon"):
                        name = "anonymous (heap)"
                    else:
                        name = "libraries, stack, other"
                elif line.startswith("Rss:"):
                    rss[name] += int(line.split()[1]) * 1024
    except OSError:  # the process has exited
        pass
    return rss


def run_convert(sources: dict[str, Path], out: Path) -> dict:
    """Run `python -m skingpt4 convert` in a child: its peak RSS (getrusage) and, sampled from smaps every 0.25 s,
    what was resident at the sampled peak."""
    args = [
        sys.executable,
        "-m",
        "skingpt4",
        "convert",
        "--out",
        str(out),
        "--llm",
        str(sources["llm"]),
        "--projection",
        str(sources["projection"]),
        "--vit",
        str(sources["vit"]),
        "--qformer",
        str(sources["qformer"]),
    ]
    start = time.perf_counter()
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    samples: list[tuple[float, Counter]] = []

    def sample():
        while child.poll() is None:
            samples.append((time.perf_counter() - start, rss_by_mapping(child.pid, out.parent)))
            time.sleep(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = child.communicate()[0]
    seconds = time.perf_counter() - start
    sampler.join()
    if child.returncode:
        raise SystemExit(f"convert failed ({child.returncode}):\n{output}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux; this is our only child
    when, at_peak = max(samples, key=lambda sample: sum(sample[1].values()))
    return {"peak": peak, "when": when, "at_peak": at_peak, "seconds": seconds, "output": output.strip()}


def main() -> None:
    free = shutil.disk_usage("/tmp").free
    if free < NEEDED_BYTES:
        raise SystemExit(f"need {NEEDED_BYTES / GB:.0f} GB free on /tmp, have {free / GB:.1f} GB")
    tmp = Path(tempfile.mkdtemp(prefix="skingpt4-convert-bench-", dir="/tmp"))
    try:
        started = time.perf_counter()
        sources = {
            "vit": tmp / "eva_vit_g.pth",
            "qformer": tmp / "blip2_pretrained_flant5xxl.pth",
            "projection": tmp / "skingpt4_proj.pth",
            "llm": tmp / "Llama-2-7b-hf",
        }
        write_vit(sources["vit"])
        write_qformer(sources["qformer"])
        write_projection(sources["projection"])
        write_llm(sources["llm"])
        files = [p for p in tmp.rglob("*") if p.is_file()]
        print(f"wrote {len(files)} source files in {time.perf_counter() - started:.0f} s:")
        for path in sorted(files, key=lambda p: -p.stat().st_size)[:5]:
            print(f"  {path.stat().st_size / GB:7.3f} GB  {path.relative_to(tmp)}")
        largest = max(p.stat().st_size for p in files)
        total = sum(p.stat().st_size for p in files)
        result = run_convert(sources, tmp / "converted")
        outputs = sorted((tmp / "converted").glob("*.safetensors"))
        out_total = sum(p.stat().st_size for p in outputs)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    print(result["output"])
    at_peak = result["at_peak"]
    rows = [
        ["largest source file (baseline)", f"{largest / GB:.2f} GB", "1.00x"],
        ["total source size", f"{total / GB:.2f} GB", f"{total / largest:.2f}x"],
        ["peak RSS of convert (getrusage)", f"{result['peak'] / GB:.2f} GB", f"{result['peak'] / largest:.2f}x"],
        [
            f"resident at the sampled peak ({result['when']:.0f} s):",
            f"{sum(at_peak.values()) / GB:.2f} GB",
            f"{sum(at_peak.values()) / largest:.2f}x",
        ],
    ]
    for name, size in at_peak.most_common():
        if size >= 0.01 * GB:
            rows.append([f"  {name}", f"{size / GB:.2f} GB", f"{size / largest:.2f}x"])
    rows += [
        ["output", f"{out_total / GB:.2f} GB in {len(outputs)} shards", ""],
        ["time of convert", f"{result['seconds']:.0f} s", ""],
    ]
    print_table("skingpt4 convert, 7B-shaped sources (zeros), child process", ["what", "value", "vs largest"], rows)


if __name__ == "__main__":
    main()
