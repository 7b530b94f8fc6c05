"""A folder's Llama as GGUF, the file format llama.cpp reads (`llamacpp.py` runs it).

`gguf_file` writes it once, read tensor by tensor from the folder's safetensors (a 13B model is never in memory
whole), under $SKINGPT4_HOME/quantized/: int8 is Q8_0; int4 is Q4_0 with the output head in Q8_0 (the head is one
matrix: in 4 bits it costs agreement for little speed); float32 is F32, for tests that compare llama.cpp's
arithmetic with transformers'. The quantization is the `gguf` package's own (the reference llama.cpp's matches).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from skingpt4.errors import InputError, ModelLoadError

log = logging.getLogger(__name__)


KINDS = {"int8": ("Q8_0", "Q8_0"), "int4": ("Q4_0", "Q8_0"), "float32": ("F32", "F32")}  # layers, output head


def check_kind(kind: str) -> None:
    """`--quantize` takes int8 and int4; float32 is for tests and benches."""
    if kind not in KINDS:
        raise InputError(f"--quantize {kind}: expected int8 or int4")


def _types(kind: str):
    """GGML types of (the layers' matrices, the output head) for a kind."""
    from gguf import GGMLQuantizationType

    check_kind(kind)
    return tuple(GGMLQuantizationType[name] for name in KINDS[kind])


def gguf_tensors(cfg) -> list[tuple[str, str, tuple[int, ...]]]:
    """(GGUF name, transformers name under `language_model.`, shape) of every tensor of a Llama config."""
    hidden, heads, kv = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    out = [("token_embd.weight", "model.embed_tokens.weight", (cfg.vocab_size, hidden))]
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        out += [
            (blk + "attn_norm.weight", hf + "input_layernorm.weight", (hidden,)),
            (blk + "attn_q.weight", hf + "self_attn.q_proj.weight", (heads * head_dim, hidden)),
            (blk + "attn_k.weight", hf + "self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (blk + "attn_v.weight", hf + "self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (blk + "attn_output.weight", hf + "self_attn.o_proj.weight", (hidden, heads * head_dim)),
            (blk + "ffn_norm.weight", hf + "post_attention_layernorm.weight", (hidden,)),
            (blk + "ffn_gate.weight", hf + "mlp.gate_proj.weight", (cfg.intermediate_size, hidden)),
            (blk + "ffn_up.weight", hf + "mlp.up_proj.weight", (cfg.intermediate_size, hidden)),
            (blk + "ffn_down.weight", hf + "mlp.down_proj.weight", (hidden, cfg.intermediate_size)),
        ]
    out.append(("output_norm.weight", "model.norm.weight", (hidden,)))
    return out + [("output.weight", "lm_head.weight", (cfg.vocab_size, hidden))]


def _rope_pairs(w: np.ndarray, heads: int) -> np.ndarray:
    """transformers' Llama rotates the two halves of each head; llama.cpp's rotates adjacent pairs: reorder rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(out: Path, cfg, weight, kind: str) -> None:
    """Write a Llama as GGUF; `weight(name)` gives each transformers tensor (float32 numpy), one at a time."""
    import gguf

    layers_type, head_type = _types(kind)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float((cfg.rope_parameters or {}).get("rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("none")  # the engine tokenizes and embeds; llama.cpp sees embeddings only
    tensors = gguf_tensors(cfg)
    f32 = gguf.GGMLQuantizationType.F32
    types = [f32 if len(s) == 1 else head_type if g == "output.weight" else layers_type for g, _, s in tensors]
    for (name, _, shape), qtype in zip(tensors, types):
        nbytes = int(np.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)))
        writer.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for (name, hf_name, shape), qtype in zip(tensors, types):
        w = np.ascontiguousarray(weight(hf_name), dtype=np.float32)
        if w.shape != shape:
            raise ModelLoadError(f"{hf_name} has shape {w.shape}; the config says {shape}")
        if name.endswith("attn_q.weight"):
            w = _rope_pairs(w, cfg.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            w = _rope_pairs(w, cfg.num_key_value_heads)
        writer.write_tensor_data(w if qtype == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(w, qtype))
    writer.close()


def _folder_weights(folder: Path):
    """`weight(name)` over a folder's safetensors (sharded or not), for names under `language_model.`."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        where = {k: folder / f for k, f in json.loads(index.read_text())["weight_map"].items()}
    else:
        with safe_open(folder / "model.safetensors", "pt") as f:
            where = dict.fromkeys(f.keys(), folder / "model.safetensors")

    def weight(name: str) -> np.ndarray:
        key = f"language_model.{name}"
        if key not in where and name == "lm_head.weight":  # tied to the input embeddings
            key = "language_model.model.embed_tokens.weight"
        with safe_open(where[key], "pt") as f:
            return f.get_tensor(key).float().numpy()

    return weight


def gguf_path(folder: Path, kind: str) -> Path:
    """Where the folder's LLM in `kind` is kept: the name holds a fingerprint of the folder's config and weight
    files (names, sizes, times), so a changed folder gets a new file."""
    from skingpt4.folder.meta import home_dir

    digest = hashlib.sha256((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")):
        stat = f.stat()
        digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return home_dir() / "quantized" / f"{folder.name}-{digest.hexdigest()[:12]}-{kind}.gguf"


def gguf_file(folder: Path, kind: str, text_config) -> Path:
    """The folder's LLM as GGUF in `kind` (`gguf_path`): made on first use (one pass over the weights)."""
    out = gguf_path(folder, kind)
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        log.warning("writing the language model in %s for llama.cpp: %s (once)", kind, out)
        partial = out.with_suffix(f".partial-{os.getpid()}")
        try:
            write_gguf(partial, text_config, _folder_weights(folder), kind)
            os.replace(partial, out)
        finally:
            partial.unlink(missing_ok=True)
    return out
