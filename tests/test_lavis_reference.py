"""Sanity tests for the plain-PyTorch LAVIS reference itself (no transformers BLIP-2 code involved)."""

from __future__ import annotations

import math
import re

import pytest
import torch
import torch.nn.functional as F

try:
    import lavis_reference as ref
except ImportError:  # tests/ collected as a package
    from tests import lavis_reference as ref

DIMS = ref.TinyDims()
CONVERTER_ATOL = 1e-5  # the tolerance the converter comparison will use


@pytest.fixture(scope="module")
def weights():
    g = torch.Generator().manual_seed(1234)
    vit = ref.make_eva_vit_state_dict(DIMS, g)
    qformer = ref.make_qformer_checkpoint(DIMS, g)
    proj = ref.make_projection_checkpoint(DIMS, g)
    pixels = torch.randn(2, 3, DIMS.image_size, DIMS.image_size, generator=g)
    return vit, qformer, proj, pixels


def _encode(weights, **kwargs):
    vit, qformer, proj, pixels = weights
    return ref.encode_image_reference(vit, qformer["model"], proj["model"], pixels, DIMS, **kwargs)


def test_output_shape_dtype_and_finite(weights):
    out = _encode(weights)
    assert out.shape == (2, DIMS.num_query, DIMS.llm_width)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # The ViT really produces 1 + (S/P)^2 tokens of width W.
    vit, _, _, pixels = weights
    assert ref.eva_vit_forward(vit, pixels, DIMS).shape == (2, DIMS.num_tokens, DIMS.vit_width)


def test_state_dict_layouts():
    g = torch.Generator().manual_seed(0)
    vit = ref.make_eva_vit_state_dict(DIMS, g)
    w, d = DIMS.vit_width, DIMS.qformer_width
    blocks = {int(k.split(".")[1]) for k in vit if k.startswith("blocks.")}
    assert blocks == set(range(DIMS.vit_depth + 1))  # one block more than is used
    assert vit["pos_embed"].shape == (1, DIMS.num_tokens, w)
    assert vit["patch_embed.proj.weight"].shape == (w, 3, DIMS.patch_size, DIMS.patch_size)
    assert vit["blocks.0.attn.qkv.weight"].shape == (3 * w, w)
    assert "blocks.0.attn.qkv.bias" not in vit and "blocks.0.attn.k_bias" not in vit
    assert vit["blocks.0.mlp.fc1.weight"].shape == (DIMS.vit_mlp, w)

    model = ref.make_qformer_checkpoint(DIMS, g)["model"]
    assert model["query_tokens"].shape == (1, DIMS.num_query, d)
    assert model["Qformer.bert.embeddings.position_ids"].dtype == torch.int64
    assert model["Qformer.bert.embeddings.position_ids"].shape == (1, DIMS.qformer_max_positions)
    for i in range(DIMS.qformer_depth):
        key = f"Qformer.bert.encoder.layer.{i}.crossattention.self.key.weight"
        assert (key in model) == (i % 2 == 0)
        if i % 2 == 0:
            assert model[key].shape == (d, w)
    text_ffn = re.compile(r"\.layer\.\d+\.(intermediate|output)\.")  # the text-branch FFN, not *_query
    assert not any(text_ffn.search(k) for k in model)
    assert not any(k.startswith("visual_encoder.") or k.startswith("Qformer.cls.") for k in model)
    assert model["t5_proj.weight"].shape == (DIMS.t5_width, d)

    text = ref.make_qformer_checkpoint(DIMS, g, with_text_branch=True)["model"]
    extra = set(text) - set(model)
    assert "Qformer.bert.embeddings.word_embeddings.weight" in extra
    assert "Qformer.bert.encoder.layer.1.intermediate.dense.weight" in extra
    assert "Qformer.bert.encoder.layer.1.output.LayerNorm.bias" in extra
    assert "Qformer.cls.predictions.decoder.weight" in extra

    proj = ref.make_projection_checkpoint(DIMS, g)
    assert set(proj["model"]) == {"llama_proj.weight", "llama_proj.bias"}
    assert proj["model"]["llama_proj.weight"].shape == (DIMS.llm_width, d)
    assert {"model", "optimizer", "epoch"} <= set(proj)
    flat = ref.make_projection_checkpoint(DIMS, g, key_prefix="llm_proj", wrapped=False)
    assert set(flat) == {"llm_proj.weight", "llm_proj.bias"}
    noisy = ref.make_projection_checkpoint(DIMS, g, extra_buffers=True)["model"]
    assert "Qformer.bert.embeddings.position_ids" in noisy
    assert any(k.endswith("rotary_emb.inv_freq") for k in noisy)


def test_text_branch_keys_do_not_change_the_output(weights):
    vit, _, proj, pixels = weights
    with_text = ref.make_qformer_checkpoint(DIMS, torch.Generator().manual_seed(99), with_text_branch=True)
    text_only = ("word_embeddings", "position_embeddings", ".intermediate.", ".output.", "Qformer.cls.")
    query_path = {
        k: v for k, v in with_text["model"].items() if not any(t in k for t in text_only) or "attention.output." in k
    }
    assert len(query_path) < len(with_text["model"])
    a = ref.encode_image_reference(vit, query_path, proj, pixels, DIMS)
    b = ref.encode_image_reference(vit, with_text, proj, pixels, DIMS)
    assert torch.equal(a, b)


def test_dropped_last_vit_block_has_no_influence(weights):
    vit, qformer, proj, pixels = weights
    base = _encode(weights)
    last = f"blocks.{DIMS.vit_depth}."
    perturbed = {k: (v + 3.0 * torch.randn_like(v) if k.startswith(last) else v) for k, v in vit.items()}
    assert torch.equal(ref.encode_image_reference(perturbed, qformer, proj, pixels, DIMS), base)
    # ... while the last USED block does matter (so the perturbation would have been seen).
    used = f"blocks.{DIMS.vit_depth - 1}."
    perturbed = {k: (v + 0.1 * torch.randn_like(v) if k.startswith(used) else v) for k, v in vit.items()}
    assert (ref.encode_image_reference(perturbed, qformer, proj, pixels, DIMS) - base).abs().max() > 1e-2


def test_ln_vision_uses_eps_1e5_and_it_matters(weights):
    vit, qformer, proj, pixels = weights
    model = qformer["model"]
    vit_out = ref.eva_vit_forward(vit, pixels, DIMS)
    # The fixture's ViT output has a small per-token variance, so eps is not negligible ...
    assert vit_out.var(dim=-1, unbiased=False).mean() < 0.05
    # ... and the default equals a hand-built LayerNorm with eps=1e-5 ...
    manual = F.layer_norm(vit_out, (DIMS.vit_width,), model["ln_vision.weight"], model["ln_vision.bias"], 1e-5)
    expected = ref.projection_forward(proj, ref.qformer_forward(model, manual, DIMS))
    base = _encode(weights)
    assert torch.equal(base, expected)
    # ... while eps=1e-6 (HF's single vision eps) moves the output well past the converter tolerance.
    wrong = _encode(weights, ln_vision_eps=1e-6)
    assert (wrong - base).abs().max() > 10 * CONVERTER_ATOL


def test_vit_block_eps_matters(weights):
    base = _encode(weights)
    wrong = _encode(weights, vit_eps=1e-5)
    assert (wrong - base).abs().max() > 10 * CONVERTER_ATOL


def test_batch_independence(weights):
    vit, qformer, proj, pixels = weights
    both = ref.encode_image_reference(vit, qformer, proj, pixels, DIMS)
    vit_both = ref.eva_vit_forward(vit, pixels, DIMS)
    for i in range(2):
        one = pixels[i : i + 1]
        torch.testing.assert_close(vit_both[i : i + 1], ref.eva_vit_forward(vit, one, DIMS), atol=1e-6, rtol=0)
        alone = ref.encode_image_reference(vit, qformer, proj, one, DIMS)
        # 1e-6 relative to the output scale (|y| ~ 2.5): float32 GEMMs of a different row count sum in a
        # different order, which leaves a few ulps (~1.7e-6 measured); a batch-mixing bug gives O(1).
        assert (both[i : i + 1] - alone).abs().max() <= 1e-6 * max(1.0, alone.abs().max().item())
    assert (both[0] - both[1]).abs().max() > 1e-3  # different images give different embeddings


def test_qkv_bias_has_zero_key_part(weights):
    vit = weights[0]
    q, v = vit["blocks.0.attn.q_bias"], vit["blocks.0.attn.v_bias"]
    bias = ref.eva_qkv_bias(q, v)
    w = DIMS.vit_width
    assert bias.shape == (3 * w,)
    assert torch.equal(bias[:w], q)
    assert torch.equal(bias[w : 2 * w], torch.zeros(w))
    assert torch.equal(bias[2 * w :], v)
    assert torch.equal(bias, torch.cat([q, torch.zeros_like(q), v]))


def _block(vit, i):
    prefix = f"blocks.{i}."
    return {k[len(prefix) :]: t for k, t in vit.items() if k.startswith(prefix)}


def test_vit_block_matches_sdpa_and_multihead_attention(weights):
    vit, _, _, _ = weights
    blk = _block(vit, 1)
    w, heads = DIMS.vit_width, DIMS.vit_heads
    x = 0.3 * torch.randn(3, DIMS.num_tokens, w, generator=torch.Generator().manual_seed(7))

    # Independent block via scaled_dot_product_attention.
    h = F.layer_norm(x, (w,), blk["norm1.weight"], blk["norm1.bias"], 1e-6)
    qkv = F.linear(h, blk["attn.qkv.weight"], torch.cat([blk["attn.q_bias"], torch.zeros(w), blk["attn.v_bias"]]))
    q, k, v = (t.unflatten(-1, (heads, w // heads)).transpose(1, 2) for t in qkv.chunk(3, dim=-1))
    attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    y = x + F.linear(attn, blk["attn.proj.weight"], blk["attn.proj.bias"])
    h = F.layer_norm(y, (w,), blk["norm2.weight"], blk["norm2.bias"], 1e-6)
    y = y + F.linear(
        F.gelu(F.linear(h, blk["mlp.fc1.weight"], blk["mlp.fc1.bias"])), blk["mlp.fc2.weight"], blk["mlp.fc2.bias"]
    )
    torch.testing.assert_close(ref.eva_block_forward(x, blk, heads), y, atol=1e-6, rtol=0)

    # The attention alone against torch.nn.MultiheadAttention (same [q; k; v] row layout).
    mha = torch.nn.MultiheadAttention(w, heads, bias=True, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(blk["attn.qkv.weight"])
        mha.in_proj_bias.copy_(ref.eva_qkv_bias(blk["attn.q_bias"], blk["attn.v_bias"]))
        mha.out_proj.weight.copy_(blk["attn.proj.weight"])
        mha.out_proj.bias.copy_(blk["attn.proj.bias"])
        expected, _ = mha(x, x, x, need_weights=False)
    got = ref.eva_attention(
        x,
        blk["attn.qkv.weight"],
        ref.eva_qkv_bias(blk["attn.q_bias"], blk["attn.v_bias"]),
        blk["attn.proj.weight"],
        blk["attn.proj.bias"],
        heads,
    )
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_qformer_cross_attention_matches_multihead_attention(weights):
    model = weights[1]["model"]
    prefix = "Qformer.bert.encoder.layer.0.crossattention."
    sd = {k[len(prefix) :]: t for k, t in model.items() if k.startswith(prefix)}
    d, w, heads = DIMS.qformer_width, DIMS.vit_width, DIMS.qformer_heads
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, DIMS.num_query, d, generator=g)
    image = torch.randn(2, DIMS.num_tokens, w, generator=g)

    mha = torch.nn.MultiheadAttention(d, heads, bias=True, batch_first=True, kdim=w, vdim=w)
    with torch.no_grad():
        mha.q_proj_weight.copy_(sd["self.query.weight"])
        mha.k_proj_weight.copy_(sd["self.key.weight"])
        mha.v_proj_weight.copy_(sd["self.value.weight"])
        mha.in_proj_bias.copy_(torch.cat([sd["self.query.bias"], sd["self.key.bias"], sd["self.value.bias"]]))
        mha.out_proj.weight.copy_(sd["output.dense.weight"])
        mha.out_proj.bias.copy_(sd["output.dense.bias"])
        attn, _ = mha(hidden, image, image, need_weights=False)
    expected = F.layer_norm(attn + hidden, (d,), sd["output.LayerNorm.weight"], sd["output.LayerNorm.bias"], 1e-12)
    got = ref.bert_attention_block(hidden, image, sd, heads)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_qformer_scale_is_inverse_sqrt_head_dim(weights):
    # Self-attention: recompute the scores with an explicit 1/sqrt(head_dim) and compare.
    model = weights[1]["model"]
    prefix = "Qformer.bert.encoder.layer.1.attention."
    sd = {k[len(prefix) :]: t for k, t in model.items() if k.startswith(prefix)}
    d, heads = DIMS.qformer_width, DIMS.qformer_heads
    hidden = torch.randn(1, DIMS.num_query, d, generator=torch.Generator().manual_seed(11))
    q, k, v = (
        F.linear(hidden, sd[f"self.{n}.weight"], sd[f"self.{n}.bias"])
        .unflatten(-1, (heads, d // heads))
        .transpose(1, 2)
        for n in ("query", "key", "value")
    )
    probs = torch.softmax(q @ k.transpose(-1, -2) * (1.0 / math.sqrt(d // heads)), dim=-1)
    ctx = (probs @ v).transpose(1, 2).flatten(2)
    out = F.linear(ctx, sd["output.dense.weight"], sd["output.dense.bias"])
    expected = F.layer_norm(out + hidden, (d,), sd["output.LayerNorm.weight"], sd["output.LayerNorm.bias"], 1e-12)
    torch.testing.assert_close(ref.bert_attention_block(hidden, hidden, sd, heads), expected, atol=1e-6, rtol=0)


def test_projection_alias_and_containers(weights):
    vit, qformer, proj, pixels = weights
    base = _encode(weights)
    alias = {k.replace("llama_proj.", "llm_proj."): v for k, v in proj["model"].items()}
    torch.testing.assert_close(ref.encode_image_reference(vit, qformer, alias, pixels, DIMS), base, atol=0, rtol=0)
    # wrapped containers and a "visual_encoder."-prefixed ViT are accepted as well
    prefixed = {f"visual_encoder.{k}": v for k, v in vit.items()}
    torch.testing.assert_close(ref.encode_image_reference(prefixed, qformer, proj, pixels, DIMS), base, atol=0, rtol=0)
    with pytest.raises(KeyError):
        ref.projection_forward({"foo.weight": torch.zeros(1)}, torch.zeros(1, 1))


def test_write_lavis_files_roundtrip(tmp_path, weights):
    paths = ref.write_lavis_files(tmp_path, DIMS, seed=3)
    assert {p.name for p in paths.values()} == {"eva_vit_g.pth", "blip2_pretrained_flant5xxl.pth", "skingpt4_proj.pth"}
    vit = torch.load(paths["vit"], weights_only=True)
    qformer = torch.load(paths["qformer"], weights_only=True)
    proj = torch.load(paths["proj"], weights_only=True)
    assert "model" not in vit and "cls_token" in vit
    assert {"model", "config", "epoch"} <= set(qformer)
    assert {"model", "optimizer", "epoch"} <= set(proj)

    g = torch.Generator().manual_seed(3)
    expected_vit = ref.make_eva_vit_state_dict(DIMS, g)
    assert all(torch.equal(vit[k], expected_vit[k]) for k in expected_vit) and set(vit) == set(expected_vit)
    pixels = weights[3]
    out = ref.encode_image_reference(vit, qformer, proj, pixels, DIMS)
    assert out.shape == (2, DIMS.num_query, DIMS.llm_width)
    # Same seed -> identical files content.
    again = ref.write_lavis_files(tmp_path / "again", DIMS, seed=3)
    out2 = ref.encode_image_reference(
        torch.load(again["vit"], weights_only=True),
        torch.load(again["qformer"], weights_only=True),
        torch.load(again["proj"], weights_only=True),
        pixels,
        DIMS,
    )
    assert torch.equal(out, out2)


def test_half_precision_vit_file_is_upcast(tmp_path, weights):
    paths = ref.write_lavis_files(tmp_path, DIMS, seed=4, vit_dtype=torch.float16)
    vit = torch.load(paths["vit"], weights_only=True)
    assert vit["blocks.0.attn.qkv.weight"].dtype == torch.float16
    qformer = torch.load(paths["qformer"], weights_only=True)
    proj = torch.load(paths["proj"], weights_only=True)
    pixels = weights[3]
    out16 = ref.encode_image_reference(vit, qformer, proj, pixels, DIMS)
    out32 = ref.encode_image_reference({k: v.float() for k, v in vit.items()}, qformer, proj, pixels, DIMS)
    assert out16.dtype == torch.float32
    assert torch.equal(out16, out32)
