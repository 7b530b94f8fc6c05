"""The key maps: the original checkpoints' tensor names -> `Blip2ForConditionalGeneration`'s (docs/reference.md §2.3).

Every source key is mapped or on the drop list below, with the reason it carries nothing SkinGPT-4 uses; anything
else stops the conversion and names the key.
"""

from __future__ import annotations

import re

import torch

from skingpt4.errors import ConversionError

# Keys that carry nothing SkinGPT-4 uses, and why. Anything not mapped and not matched here is an error.
DROP = {
    "vit": [(r"(norm|fc_norm|head)\.(weight|bias)", "EVA-CLIP's final norm/head; SkinGPT-4 reads the last block raw")],
    "projection": [
        (r"(Qformer\.bert\.embeddings\.)?position_ids$", "a buffer, not a weight"),
        (r".*rotary_emb\.inv_freq$", "rotary buffer, recomputed by transformers"),
        (r"(llm_model|llama_model)\..*", "LLM weights come from --llm"),
    ],
    "qformer": [
        (r"Qformer\.bert\.embeddings\.position_ids$", "a buffer, not a weight"),
        (r"t5_proj\..*", "the Flan-T5 projection; SkinGPT-4 has its own"),
        (r"Qformer\.cls\..*", "text head, removed by SkinGPT-4"),
        (r"Qformer\.bert\.embeddings\.(word|position)_embeddings\..*", "text embeddings, removed by SkinGPT-4"),
        (r"Qformer\.bert\.encoder\.layer\.\d+\.(intermediate|output)\..*", "text-branch FFN, removed by SkinGPT-4"),
    ],
    "blip2": [
        (r"language_model\..*", "the Flan-T5/OPT LLM; the LLM comes from --llm"),
        (r"language_projection\..*", "the BLIP-2 LLM projection; the projection comes from --projection"),
        (r".*position_ids$", "a buffer, not a weight"),
    ],
    "llm": [(r".*rotary_emb\.inv_freq$", "rotary buffer, recomputed by transformers")],
}


def map_vit(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """eva_vit_g.pth (flat, N blocks) -> vision_model.* using blocks 0..N-2, as the original does."""
    blocks = sorted({int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    if not blocks or "cls_token" not in sd:
        raise ConversionError("the --vit file is not an EVA ViT state dict (no cls_token / blocks.N.* keys)")
    _require(sd, ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"], "--vit")
    width = sd["cls_token"].shape[-1]
    if width == 1408 and len(blocks) != 40:  # EVA ViT-g: the real file has 40 blocks, SkinGPT-4 uses 39
        raise ConversionError(f"the --vit file has {len(blocks)} blocks; eva_vit_g.pth has 40 (of which 39 are used)")
    depth = len(blocks) - 1  # the last block is not used: SkinGPT-4 reads the penultimate layer
    out = {
        "vision_model.embeddings.class_embedding": sd.pop("cls_token"),
        "vision_model.embeddings.position_embedding": sd.pop("pos_embed"),
        "vision_model.embeddings.patch_embedding.weight": sd.pop("patch_embed.proj.weight"),
        "vision_model.embeddings.patch_embedding.bias": sd.pop("patch_embed.proj.bias"),
    }
    names = {
        "norm1": "layer_norm1",
        "norm2": "layer_norm2",
        "attn.proj": "self_attn.projection",
        "attn.qkv": "self_attn.qkv",
        "mlp.fc1": "mlp.fc1",
        "mlp.fc2": "mlp.fc2",
    }
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"vision_model.encoder.layers.{i}."
        _require(sd, [src + "attn.q_bias", src + "attn.v_bias"], "--vit")
        q, v = sd.pop(src + "attn.q_bias"), sd.pop(src + "attn.v_bias")
        out[dst + "self_attn.qkv.bias"] = torch.cat([q, torch.zeros_like(q), v])  # EVA has no k bias
        for old, new in names.items():
            for part in ("weight", "bias"):
                if f"{src}{old}.{part}" in sd:
                    out[f"{dst}{new}.{part}"] = sd.pop(f"{src}{old}.{part}")
    for key in [k for k in sd if k.startswith(f"blocks.{depth}.")]:
        sd.pop(key)  # the unused last block (block 39 of the real file)
    _no_leftovers(sd, "vit")
    return out, depth


def map_qformer(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """blip2_pretrained_flant5xxl.pth['model'] -> query_tokens, qformer.*, vision_model.post_layernorm.*."""
    if "query_tokens" not in sd:
        raise ConversionError("the --qformer file has no query_tokens: is it blip2_pretrained_flant5xxl.pth?")
    _require(
        sd,
        [f"{n}.{p}" for n in ("ln_vision", "Qformer.bert.embeddings.LayerNorm") for p in ("weight", "bias")],
        "--qformer",
    )
    out = {"query_tokens": sd.pop("query_tokens")}
    for part in ("weight", "bias"):
        out[f"vision_model.post_layernorm.{part}"] = sd.pop(f"ln_vision.{part}")
        out[f"qformer.layernorm.{part}"] = sd.pop(f"Qformer.bert.embeddings.LayerNorm.{part}")
    for key in [k for k in sd if k.startswith("Qformer.bert.encoder.layer.")]:
        if re.match(r"Qformer\.bert\.encoder\.layer\.\d+\.(attention|crossattention|\w+_query)\.", key):
            new = key.replace("Qformer.bert.", "qformer.", 1)
            out[new.replace("attention.self.", "attention.attention.")] = sd.pop(key)
    _no_leftovers(sd, "qformer")
    return out


def map_projection(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama_proj.* (or the Falcon-era llm_proj.*) -> language_projection.*."""
    out = {}
    for prefix in ("llama_proj.", "llm_proj."):
        for part in ("weight", "bias"):
            if prefix + part in sd:
                out[f"language_projection.{part}"] = sd.pop(prefix + part)
    if set(out) != {"language_projection.weight", "language_projection.bias"}:
        raise ConversionError("the --projection checkpoint has no llama_proj.weight/bias (nor llm_proj.*)")
    _no_leftovers(sd, "projection")
    return out


def _require(sd: dict, keys: list[str], source: str) -> None:
    missing = [k for k in keys if k not in sd]
    if missing:
        raise ConversionError(f"{source} file lacks {missing[0]!r}: not the expected checkpoint")


def dropped(key: str, source: str) -> bool:
    return any(re.fullmatch(pattern, key) for pattern, _ in DROP.get(source, []))


def _no_leftovers(sd: dict, source: str) -> None:
    for key in sd:
        if not dropped(key, source):
            raise ConversionError(f"unexpected key {key!r} in --{source}: not mapped and not on the drop list")
    sd.clear()
