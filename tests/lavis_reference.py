"""Independent plain-PyTorch reference of the original SkinGPT-4 / MiniGPT-4 v1 image path.

This module is a *test oracle*. It works straight from state dicts in the ORIGINAL key layout of the
LAVIS / SkinGPT-4 files and recomputes ``encode_img`` (docs/reference.md §1.3) with nothing but
``torch`` and ``torch.nn.functional``:

    EVA ViT-g (first ``depth`` blocks, no final norm)  ->  ln_vision (LayerNorm, eps 1e-5)
    ->  BLIP-2 Q-Former, query path only (post-LN BERT, eps 1e-12, cross-attention every 2nd layer)
    ->  llama_proj (Linear)

It deliberately imports neither ``transformers`` nor ``skingpt4``, so it can be used to prove that a
converter into ``transformers``' BLIP-2 classes is exact. The formulas were written from the original
sources: salesforce/LAVIS ``lavis/models/eva_vit.py`` (``Attention``, ``Block``,
``VisionTransformer.forward_features``), ``lavis/models/blip2_models/Qformer.py`` (``BertEmbeddings``,
``BertSelfAttention``, ``BertSelfOutput``, ``BertLayer`` query branch), ``lavis/models/blip2_models/blip2.py``
(``LayerNorm`` subclass with torch's default eps) and Vision-CAIR/MiniGPT-4 v1 ``mini_gpt4.py``
(``encode_img``).

It also builds tiny random checkpoints with the real key names and container formats:

* ``eva_vit_g.pth``: flat state dict, no prefix, ``depth + 1`` blocks (the real file has 40 blocks, of
  which LAVIS builds and uses 39; the last one is silently dropped by ``load_state_dict(strict=False)``).
* ``blip2_pretrained_flant5xxl.pth``: ``{"model": {...}, ...}`` with ``query_tokens``, ``ln_vision.*``,
  the query-path ``Qformer.bert.*`` keys, the ``position_ids`` buffer and ``t5_proj.*``.
* a LAVIS-runner projection checkpoint (``{"model": {"llama_proj.weight", "llama_proj.bias"}, ...}``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LN_VISION_EPS",
    "QFORMER_LN_EPS",
    "VIT_LN_EPS",
    "TinyDims",
    "bert_attention_block",
    "encode_image_reference",
    "eva_attention",
    "eva_block_forward",
    "eva_qkv_bias",
    "eva_vit_forward",
    "ln_vision_forward",
    "make_eva_vit_state_dict",
    "make_projection_checkpoint",
    "make_qformer_checkpoint",
    "projection_forward",
    "qformer_forward",
    "unwrap_model_dict",
    "write_lavis_files",
]

#: LayerNorm eps inside the EVA blocks (``partial(nn.LayerNorm, eps=1e-6)`` in ``create_eva_vit_g``).
VIT_LN_EPS = 1e-6
#: ``ln_vision`` is LAVIS' ``LayerNorm(nn.LayerNorm)`` subclass built with torch's default eps.
LN_VISION_EPS = 1e-5
#: ``bert-base-uncased`` ``layer_norm_eps``.
QFORMER_LN_EPS = 1e-12

VIT_FILE = "eva_vit_g.pth"
QFORMER_FILE = "blip2_pretrained_flant5xxl.pth"
PROJ_FILE = "skingpt4_proj.pth"

_QFORMER_LAYER = "Qformer.bert.encoder.layer.{i}."
_PROJ_PREFIXES = ("llama_proj.", "llm_proj.")


@dataclass(frozen=True)
class TinyDims:
    """Tiny stand-ins for the real sizes (real value in brackets).

    ``vit_depth`` is the number of blocks the model USES (39); the generated ViT file holds one more
    block (40), like the real ``eva_vit_g.pth``.
    """

    vit_width: int = 32  # [1408]
    vit_depth: int = 3  # [39 used, 40 in the file]
    vit_heads: int = 4  # [16] -> head_dim 8 [88]
    vit_mlp: int = 88  # [6144]; deliberately not a multiple of vit_width
    image_size: int = 28  # [224]
    patch_size: int = 14  # [14] -> 2x2 patches + CLS = 5 tokens [257]
    qformer_width: int = 48  # [768]
    qformer_depth: int = 4  # [12]
    qformer_heads: int = 4  # [12] -> head_dim 12 [64]
    qformer_ffn: int = 96  # [3072]
    cross_attention_freq: int = 2  # [2] -> cross-attention in layers 0, 2, ...
    num_query: int = 32  # [32]
    llm_width: int = 64  # [5120 for 13B, 4096 for 7B]
    t5_width: int = 40  # [4096] output width of the (ignored) ``t5_proj``
    qformer_max_positions: int = 512  # [512] length of the ``position_ids`` buffer
    vocab_size: int = 30  # [30523] only used when the text branch is generated

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid * self.grid

    @property
    def num_tokens(self) -> int:
        """ViT sequence length including the CLS token."""
        return self.num_patches + 1

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_freq == 0


# --------------------------------------------------------------------------------------------------
# Random tensors with a scale that makes mapping mistakes visible
# --------------------------------------------------------------------------------------------------


def _randn(generator: torch.Generator, *shape: int, std: float) -> Tensor:
    return torch.randn(*shape, generator=generator) * std


def _ln_params(generator: torch.Generator, n: int) -> tuple[Tensor, Tensor]:
    """LayerNorm weight around 1 and a non-zero bias."""
    return 1.0 + _randn(generator, n, std=0.1), _randn(generator, n, std=0.05)


def _linear(generator: torch.Generator, out_f: int, in_f: int, std: float) -> tuple[Tensor, Tensor]:
    return _randn(generator, out_f, in_f, std=std), _randn(generator, out_f, std=0.05)


# --------------------------------------------------------------------------------------------------
# Checkpoint builders
# --------------------------------------------------------------------------------------------------


def make_eva_vit_state_dict(
    dims: TinyDims, generator: torch.Generator, *, dtype: torch.dtype = torch.float32
) -> dict[str, Tensor]:
    """Flat state dict keyed like ``eva_vit_g.pth``: no prefix, ``vit_depth + 1`` blocks.

    The key order follows ``VisionTransformer.state_dict()`` (own parameters first, then children).
    The real file appears to be stored in half precision (see the report); pass ``dtype=torch.float16``
    to mimic that: the reference upcasts everything to float32.

    Scales are chosen so that the residual stream stays small (std ~0.05-0.1): then the LayerNorm eps
    values (1e-6 in blocks, 1e-5 in ``ln_vision``) change the output far beyond a 1e-5 tolerance, so
    an eps mistake in a converter shows up.
    """
    w, m, p = dims.vit_width, dims.vit_mlp, dims.patch_size
    sd: dict[str, Tensor] = {
        "cls_token": _randn(generator, 1, 1, w, std=0.05),
        "pos_embed": _randn(generator, 1, dims.num_tokens, w, std=0.05),
    }
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = (
        _randn(generator, w, 3, p, p, std=0.003),
        _randn(generator, w, std=0.02),
    )
    for i in range(dims.vit_depth + 1):
        b = f"blocks.{i}."
        sd[b + "norm1.weight"], sd[b + "norm1.bias"] = _ln_params(generator, w)
        sd[b + "attn.q_bias"] = _randn(generator, w, std=0.1)
        sd[b + "attn.v_bias"] = _randn(generator, w, std=0.1)
        sd[b + "attn.qkv.weight"] = _randn(generator, 3 * w, w, std=0.2)
        sd[b + "attn.proj.weight"], sd[b + "attn.proj.bias"] = _linear(generator, w, w, std=0.008)
        sd[b + "norm2.weight"], sd[b + "norm2.bias"] = _ln_params(generator, w)
        sd[b + "mlp.fc1.weight"], sd[b + "mlp.fc1.bias"] = _linear(generator, m, w, std=0.15)
        sd[b + "mlp.fc2.weight"], sd[b + "mlp.fc2.bias"] = _linear(generator, w, m, std=0.006)
    return {k: v.to(dtype) for k, v in sd.items()}


def _bert_attention_params(generator: torch.Generator, prefix: str, width: int, kv_width: int) -> dict[str, Tensor]:
    sd: dict[str, Tensor] = {}
    sd[prefix + "self.query.weight"], sd[prefix + "self.query.bias"] = _linear(generator, width, width, std=0.15)
    sd[prefix + "self.key.weight"], sd[prefix + "self.key.bias"] = _linear(generator, width, kv_width, std=0.15)
    sd[prefix + "self.value.weight"], sd[prefix + "self.value.bias"] = _linear(generator, width, kv_width, std=0.15)
    sd[prefix + "output.dense.weight"], sd[prefix + "output.dense.bias"] = _linear(generator, width, width, std=0.1)
    sd[prefix + "output.LayerNorm.weight"], sd[prefix + "output.LayerNorm.bias"] = _ln_params(generator, width)
    return sd


def _bert_ffn_params(generator: torch.Generator, layer: str, name: str, dims: TinyDims) -> dict[str, Tensor]:
    """``intermediate{name}.dense`` + ``output{name}.{dense,LayerNorm}``; ``name`` is "_query" or ""."""
    d, f = dims.qformer_width, dims.qformer_ffn
    sd: dict[str, Tensor] = {}
    sd[f"{layer}intermediate{name}.dense.weight"], sd[f"{layer}intermediate{name}.dense.bias"] = _linear(
        generator, f, d, std=0.15
    )
    sd[f"{layer}output{name}.dense.weight"], sd[f"{layer}output{name}.dense.bias"] = _linear(generator, d, f, std=0.1)
    sd[f"{layer}output{name}.LayerNorm.weight"], sd[f"{layer}output{name}.LayerNorm.bias"] = _ln_params(generator, d)
    return sd


def make_qformer_checkpoint(dims: TinyDims, generator: torch.Generator, *, with_text_branch: bool = False) -> dict:
    """``{"model": {...}, "config": {...}, "epoch": 1}`` shaped like ``blip2_pretrained_flant5xxl.pth``.

    Default (``with_text_branch=False``): the keys that ``Blip2T5`` (LAVIS ``blip2_t5``) has after it sets
    ``Qformer.cls``, ``word_embeddings``, ``position_embeddings`` and every layer's ``intermediate`` /
    ``output`` to ``None`` -- the query path, ``query_tokens``, ``ln_vision``, the persistent
    ``Qformer.bert.embeddings.position_ids`` buffer and ``t5_proj``. The real file's size (413 MiB)
    matches exactly this set in float32 (see the report).

    ``with_text_branch=True`` adds what a full LAVIS ``BertLMHeadModel`` state dict would also hold
    (as in the stage-1 ``blip2_pretrained.pth``): word/position embeddings, each layer's text FFN
    (``intermediate.*``, ``output.*``) and the ``Qformer.cls.predictions.*`` head. SkinGPT-4 ignores all
    of them; a loader must tolerate them.
    """
    d, w = dims.qformer_width, dims.vit_width
    model: dict[str, Tensor] = {"query_tokens": _randn(generator, 1, dims.num_query, d, std=0.5)}
    model["ln_vision.weight"], model["ln_vision.bias"] = _ln_params(generator, w)

    emb = "Qformer.bert.embeddings."
    if with_text_branch:
        model[emb + "word_embeddings.weight"] = _randn(generator, dims.vocab_size, d, std=0.02)
        model[emb + "position_embeddings.weight"] = _randn(generator, dims.qformer_max_positions, d, std=0.02)
    model[emb + "LayerNorm.weight"], model[emb + "LayerNorm.bias"] = _ln_params(generator, d)
    model[emb + "position_ids"] = torch.arange(dims.qformer_max_positions, dtype=torch.int64).unsqueeze(0)

    for i in range(dims.qformer_depth):
        layer = _QFORMER_LAYER.format(i=i)
        model.update(_bert_attention_params(generator, layer + "attention.", d, d))
        if dims.has_cross_attention(i):
            model.update(_bert_attention_params(generator, layer + "crossattention.", d, w))
        if with_text_branch:
            model.update(_bert_ffn_params(generator, layer, "", dims))
        model.update(_bert_ffn_params(generator, layer, "_query", dims))

    if with_text_branch:
        head = "Qformer.cls.predictions."
        model[head + "bias"] = _randn(generator, dims.vocab_size, std=0.02)
        model[head + "transform.dense.weight"], model[head + "transform.dense.bias"] = _linear(
            generator, d, d, std=0.02
        )
        model[head + "transform.LayerNorm.weight"], model[head + "transform.LayerNorm.bias"] = _ln_params(generator, d)
        # Tied in LAVIS: decoder.weight is word_embeddings.weight, decoder.bias is predictions.bias.
        model[head + "decoder.weight"] = model[emb + "word_embeddings.weight"]
        model[head + "decoder.bias"] = model[head + "bias"]

    model["t5_proj.weight"], model["t5_proj.bias"] = _linear(generator, dims.t5_width, d, std=0.05)
    config = {
        "model": {
            "arch": "blip2_t5",
            "model_type": "pretrain_flant5xxl",
            "num_query_token": dims.num_query,
            "image_size": dims.image_size,
            "t5_model": "google/flan-t5-xxl",
        }
    }
    return {"model": model, "config": config, "epoch": 1}


def make_projection_checkpoint(
    dims: TinyDims,
    generator: torch.Generator,
    key_prefix: str = "llama_proj",
    wrapped: bool = True,
    *,
    extra_buffers: bool = False,
) -> dict:
    """LAVIS-runner checkpoint holding only the trained projection.

    ``wrapped=True``: ``{"model": {...}, "optimizer": {...}, "config": {...}, "scaler": {...}, "epoch": 3}``
    like ``RunnerBase._save_checkpoint`` (frozen parameters deleted). ``wrapped=False``: the flat dict.
    ``key_prefix="llm_proj"`` gives the Falcon-era alias. ``extra_buffers=True`` adds persistent buffers
    that such files may carry besides the projection (``Qformer.bert.embeddings.position_ids`` and
    Llama rotary ``inv_freq`` buffers); a loader must ignore them.
    """
    weight, bias = _linear(generator, dims.llm_width, dims.qformer_width, std=0.1)
    model: dict[str, Tensor] = {}
    if extra_buffers:
        model["Qformer.bert.embeddings.position_ids"] = torch.arange(
            dims.qformer_max_positions, dtype=torch.int64
        ).unsqueeze(0)
    model[f"{key_prefix}.weight"] = weight
    model[f"{key_prefix}.bias"] = bias
    if extra_buffers:
        inv_freq = 1.0 / (10000 ** (torch.arange(0, 8, 2, dtype=torch.float32) / 8))
        for i in range(2):
            model[f"llm_model.model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
    if not wrapped:
        return model
    optimizer = {
        "state": {
            0: {
                "step": torch.tensor(30.0),
                "exp_avg": torch.zeros_like(weight),
                "exp_avg_sq": torch.zeros_like(weight),
            },
            1: {"step": torch.tensor(30.0), "exp_avg": torch.zeros_like(bias), "exp_avg_sq": torch.zeros_like(bias)},
        },
        "param_groups": [
            {"lr": 3e-5, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.05, "amsgrad": False, "params": [0, 1]}
        ],
    }
    scaler = {
        "scale": 65536.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 7,
    }
    config = {"model": {"arch": "skin_gpt4", "num_query_token": dims.num_query}, "run": {"max_epoch": 5}}
    return {"model": model, "optimizer": optimizer, "config": config, "scaler": scaler, "epoch": 3}


def write_lavis_files(
    directory: str | Path,
    dims: TinyDims,
    seed: int = 0,
    *,
    vit_dtype: torch.dtype = torch.float32,
    with_text_branch: bool = False,
    proj_key_prefix: str = "llama_proj",
) -> dict[str, Path]:
    """Write ``eva_vit_g.pth``, ``blip2_pretrained_flant5xxl.pth`` and ``skingpt4_proj.pth`` (torch.save).

    Returns ``{"vit": ..., "qformer": ..., "proj": ...}``. Deterministic for a given ``seed``; load the
    files back with ``torch.load(path, weights_only=True)`` to get the reference inputs.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    paths = {"vit": directory / VIT_FILE, "qformer": directory / QFORMER_FILE, "proj": directory / PROJ_FILE}
    torch.save(make_eva_vit_state_dict(dims, generator, dtype=vit_dtype), paths["vit"])
    torch.save(make_qformer_checkpoint(dims, generator, with_text_branch=with_text_branch), paths["qformer"])
    torch.save(make_projection_checkpoint(dims, generator, key_prefix=proj_key_prefix), paths["proj"])
    return paths


# --------------------------------------------------------------------------------------------------
# Forward path
# --------------------------------------------------------------------------------------------------


def unwrap_model_dict(obj: Mapping[str, object]) -> dict[str, Tensor]:
    """Accept either a LAVIS ``{"model": state_dict, ...}`` container or a flat state dict."""
    inner = obj.get("model") if isinstance(obj.get("model"), Mapping) else obj
    return dict(inner)  # type: ignore[arg-type]


def _f32(sd: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Float32 copies of the floating tensors under ``prefix`` (prefix stripped)."""
    return {k[len(prefix) :]: v.float() for k, v in sd.items() if k.startswith(prefix) and torch.is_floating_point(v)}


def eva_qkv_bias(q_bias: Tensor, v_bias: Tensor) -> Tensor:
    """EVA's qkv bias: ``cat(q_bias, 0, v_bias)`` -- there is no key bias."""
    return torch.cat((q_bias, torch.zeros_like(q_bias), v_bias))


def eva_attention(
    x: Tensor, qkv_weight: Tensor, qkv_bias: Tensor, proj_weight: Tensor, proj_bias: Tensor, heads: int
) -> Tensor:
    """LAVIS ``eva_vit.Attention.forward`` without rel-pos bias and dropout."""
    batch, tokens, width = x.shape
    head_dim = width // heads
    qkv = F.linear(x, qkv_weight, qkv_bias)
    # rows of qkv.weight are [q (all heads) | k | v]; each is split into contiguous heads
    q, k, v = qkv.reshape(batch, tokens, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q = q * head_dim**-0.5  # EVA scales q before the product
    probs = (q @ k.transpose(-2, -1)).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, tokens, heads * head_dim)
    return F.linear(out, proj_weight, proj_bias)


def eva_block_forward(x: Tensor, block_sd: Mapping[str, Tensor], heads: int, *, eps: float = VIT_LN_EPS) -> Tensor:
    """One EVA block (pre-LN, no layer scale): ``x + attn(norm1(x))``, then ``x + mlp(norm2(x))``.

    ``block_sd`` holds the block's tensors without the ``blocks.{i}.`` prefix.
    """
    width = x.shape[-1]
    h = F.layer_norm(x, (width,), block_sd["norm1.weight"], block_sd["norm1.bias"], eps)
    qkv_bias = eva_qkv_bias(block_sd["attn.q_bias"], block_sd["attn.v_bias"])
    x = x + eva_attention(
        h, block_sd["attn.qkv.weight"], qkv_bias, block_sd["attn.proj.weight"], block_sd["attn.proj.bias"], heads
    )
    h = F.layer_norm(x, (width,), block_sd["norm2.weight"], block_sd["norm2.bias"], eps)
    h = F.gelu(F.linear(h, block_sd["mlp.fc1.weight"], block_sd["mlp.fc1.bias"]))  # exact (erf) GELU
    return x + F.linear(h, block_sd["mlp.fc2.weight"], block_sd["mlp.fc2.bias"])


def eva_vit_forward(
    vit_sd: Mapping[str, Tensor], pixels: Tensor, dims: TinyDims, *, eps: float = VIT_LN_EPS
) -> Tensor:
    """``VisionTransformer.forward_features``: [B, 3, S, S] -> [B, 1 + (S/P)^2, W]; no final norm.

    Only blocks ``0 .. dims.vit_depth - 1`` run; any further block in ``vit_sd`` is ignored.
    Keys may carry a ``visual_encoder.`` prefix.
    """
    prefix = "visual_encoder." if "visual_encoder.cls_token" in vit_sd else ""
    sd = _f32(vit_sd, prefix)
    pixels = pixels.float()
    if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, dims.image_size, dims.image_size):
        raise ValueError(f"expected pixels [B, 3, {dims.image_size}, {dims.image_size}], got {tuple(pixels.shape)}")
    x = F.conv2d(pixels, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=dims.patch_size)
    x = x.flatten(2).transpose(1, 2)  # [B, N, W], patches in row-major order
    x = torch.cat((sd["cls_token"].expand(x.shape[0], -1, -1), x), dim=1) + sd["pos_embed"]
    for i in range(dims.vit_depth):
        block = {k[len(f"blocks.{i}.") :]: v for k, v in sd.items() if k.startswith(f"blocks.{i}.")}
        x = eva_block_forward(x, block, dims.vit_heads, eps=eps)
    return x


def ln_vision_forward(x: Tensor, weight: Tensor, bias: Tensor, *, eps: float = LN_VISION_EPS) -> Tensor:
    """LAVIS ``ln_vision``: LayerNorm computed in float32 with torch's default eps (1e-5)."""
    return F.layer_norm(x.float(), (x.shape[-1],), weight.float(), bias.float(), eps)


def _split_heads(x: Tensor, heads: int) -> Tensor:
    batch, tokens, width = x.shape
    return x.reshape(batch, tokens, heads, width // heads).permute(0, 2, 1, 3)


def bert_attention_block(
    hidden: Tensor,
    kv_states: Tensor,
    attn_sd: Mapping[str, Tensor],
    heads: int,
    *,
    eps: float = QFORMER_LN_EPS,
) -> Tensor:
    """LAVIS ``BertAttention`` (self- or cross-) followed by ``BertSelfOutput`` (post-LN residual).

    ``attn_sd`` holds ``self.{query,key,value}.*`` and ``output.{dense,LayerNorm}.*``. For
    self-attention pass ``kv_states=hidden``; for cross-attention the image embeddings. The additive
    masks of the original are all zero here (all-ones masks, no padding) and are omitted.
    """
    width = hidden.shape[-1]
    head_dim = width // heads
    q = _split_heads(F.linear(hidden, attn_sd["self.query.weight"], attn_sd["self.query.bias"]), heads)
    k = _split_heads(F.linear(kv_states, attn_sd["self.key.weight"], attn_sd["self.key.bias"]), heads)
    v = _split_heads(F.linear(kv_states, attn_sd["self.value.weight"], attn_sd["self.value.bias"]), heads)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(head_dim)  # BERT divides the scores afterwards
    context = scores.softmax(dim=-1) @ v
    context = context.permute(0, 2, 1, 3).reshape(hidden.shape[0], hidden.shape[1], width)
    out = F.linear(context, attn_sd["output.dense.weight"], attn_sd["output.dense.bias"])
    return F.layer_norm(
        out + hidden, (width,), attn_sd["output.LayerNorm.weight"], attn_sd["output.LayerNorm.bias"], eps
    )


def qformer_forward(
    qformer_model_sd: Mapping[str, Tensor], image_embeds: Tensor, dims: TinyDims, *, eps: float = QFORMER_LN_EPS
) -> Tensor:
    """``Qformer.bert(query_embeds=query_tokens, encoder_hidden_states=image_embeds)`` -> [B, Q, D].

    Query-only path: no word/position embeddings; each layer runs self-attention, cross-attention
    (layers with ``i % cross_attention_freq == 0``) and the ``*_query`` feed-forward.
    """
    sd = _f32(unwrap_model_dict(qformer_model_sd))
    image_embeds = image_embeds.float()
    d = dims.qformer_width
    queries = sd["query_tokens"].expand(image_embeds.shape[0], -1, -1)
    h = F.layer_norm(
        queries,
        (d,),
        sd["Qformer.bert.embeddings.LayerNorm.weight"],
        sd["Qformer.bert.embeddings.LayerNorm.bias"],
        eps,
    )
    for i in range(dims.qformer_depth):
        layer = _QFORMER_LAYER.format(i=i)
        lsd = {k[len(layer) :]: v for k, v in sd.items() if k.startswith(layer)}
        h = bert_attention_block(h, h, _sub(lsd, "attention."), dims.qformer_heads, eps=eps)
        if dims.has_cross_attention(i):
            h = bert_attention_block(h, image_embeds, _sub(lsd, "crossattention."), dims.qformer_heads, eps=eps)
        inter = F.gelu(F.linear(h, lsd["intermediate_query.dense.weight"], lsd["intermediate_query.dense.bias"]))
        out = F.linear(inter, lsd["output_query.dense.weight"], lsd["output_query.dense.bias"])
        h = F.layer_norm(out + h, (d,), lsd["output_query.LayerNorm.weight"], lsd["output_query.LayerNorm.bias"], eps)
    return h


def _sub(sd: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}


def projection_forward(proj_sd: Mapping[str, object], x: Tensor) -> Tensor:
    """``llama_proj`` (or the Falcon-era ``llm_proj``) applied with ``F.linear``."""
    sd = unwrap_model_dict(proj_sd)
    for prefix in _PROJ_PREFIXES:
        if prefix + "weight" in sd:
            return F.linear(x.float(), sd[prefix + "weight"].float(), sd[prefix + "bias"].float())
    raise KeyError(f"no llama_proj.* / llm_proj.* keys in the projection state dict: {sorted(sd)[:8]}")


def encode_image_reference(
    vit_sd: Mapping[str, Tensor],
    qformer_model_sd: Mapping[str, object],
    proj_sd: Mapping[str, object],
    pixels: Tensor,
    dims: TinyDims,
    *,
    ln_vision_eps: float = LN_VISION_EPS,
    vit_eps: float = VIT_LN_EPS,
) -> Tensor:
    """MiniGPT-4 v1 / SkinGPT-4 ``encode_img`` in float32: pixels [B, 3, S, S] -> [B, Q, H].

    ``qformer_model_sd`` / ``proj_sd`` may be the LAVIS containers or their ``"model"`` dicts. The eps
    keywords exist only so tests can show that the eps values matter; keep the defaults otherwise.
    """
    with torch.no_grad():
        qsd = unwrap_model_dict(qformer_model_sd)
        image_embeds = ln_vision_forward(
            eva_vit_forward(vit_sd, pixels, dims, eps=vit_eps),
            qsd["ln_vision.weight"],
            qsd["ln_vision.bias"],
            eps=ln_vision_eps,
        )
        query_output = qformer_forward(qsd, image_embeds, dims)
        return projection_forward(proj_sd, query_output)
