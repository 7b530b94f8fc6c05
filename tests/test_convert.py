"""The converter: key accounting, the classic mistakes, safety, sharding, and the HF BLIP-2 route."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from lavis_reference import make_projection_checkpoint, write_lavis_files
from safetensors.torch import load_file, save_file
from transformers import Blip2ForConditionalGeneration, GPT2Config, LlamaForCausalLM

from skingpt4.errors import ConversionError
from skingpt4.folder.convert import ConvertOptions, check_projection, convert
from skingpt4.folder.meta import META_FILE, ModelMeta


def options(lavis_files, llm_dir, dims, **overrides) -> ConvertOptions:
    base = dict(
        llm=str(llm_dir),
        projection=lavis_files["proj"],
        vit=lavis_files["vit"],
        qformer=lavis_files["qformer"],
        vit_heads=dims.vit_heads,
        qformer_heads=dims.qformer_heads,
    )
    return ConvertOptions(**{**base, **overrides})


def all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def resave(path: Path, mutate) -> Path:
    data = torch.load(path, weights_only=True)
    mutate(data)
    new = path.with_name("edited-" + path.name)
    torch.save(data, new)
    return new


def test_folder_layout_and_provenance(converted_dir, lavis_files, llm_dir):
    names = {p.name for p in converted_dir.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", META_FILE, "model.safetensors"} <= names
    meta = ModelMeta.load(converted_dir)
    roles = {s["role"]: s for s in meta.sources}
    assert set(roles) == {"vit", "qformer", "projection", "llm"}
    import hashlib

    assert roles["vit"]["sha256"] == hashlib.sha256(lavis_files["vit"].read_bytes()).hexdigest()
    assert meta.post_layernorm_eps == 1e-5 and meta.image_size == 28 and not meta.untrained
    config = json.loads((converted_dir / "config.json").read_text())
    assert config["vision_config"]["num_hidden_layers"] == 3  # 4 blocks in the file, the last one dropped
    assert config["vision_config"]["layer_norm_eps"] == 1e-6
    assert config["image_token_index"] == config["text_config"]["vocab_size"] - 1


def test_key_map_values(converted_dir, lavis_files, dims):
    """Spot-check the map of docs/reference.md §2.3 on values, including the q/zero/v bias and dropped block."""
    vit = torch.load(lavis_files["vit"], weights_only=True)
    qf = torch.load(lavis_files["qformer"], weights_only=True)["model"]
    out = all_tensors(converted_dir)
    w = dims.vit_width
    qkv = out["vision_model.encoder.layers.1.self_attn.qkv.bias"]
    assert torch.equal(qkv, torch.cat([vit["blocks.1.attn.q_bias"], torch.zeros(w), vit["blocks.1.attn.v_bias"]]))
    assert torch.equal(out["vision_model.post_layernorm.weight"], qf["ln_vision.weight"])
    assert torch.equal(out["qformer.layernorm.bias"], qf["Qformer.bert.embeddings.LayerNorm.bias"])
    key = "Qformer.bert.encoder.layer.2.crossattention.self.key.weight"
    assert torch.equal(out["qformer.encoder.layer.2.crossattention.attention.key.weight"], qf[key])
    assert not any(k.startswith("vision_model.encoder.layers.3.") for k in out)
    embed = out["language_model.model.embed_tokens.weight"]
    assert torch.count_nonzero(embed[-1]) == 0  # the placeholder row: never read, zero for determinism


def test_plain_from_pretrained_loads_sharded_output(tmp_path, lavis_files, llm_dir, dims, converted_dir):
    folder = convert(options(lavis_files, llm_dir, dims, max_shard_bytes=40_000), tmp_path / "sharded")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    single, sharded = all_tensors(converted_dir), all_tensors(folder)
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)
    model = Blip2ForConditionalGeneration.from_pretrained(folder)
    assert model.config.num_query_tokens == 32


def test_fp16_vit_file_and_llm_proj_alias_and_extra_buffers(tmp_path, llm_dir, dims, converted_dir):
    files = write_lavis_files(tmp_path / "src", dims, seed=0, vit_dtype=torch.float16, proj_key_prefix="llm_proj")
    proj = make_projection_checkpoint(dims, torch.Generator().manual_seed(9), extra_buffers=True)
    torch.save(proj, tmp_path / "proj_buffers.pth")
    folder = convert(options(files, llm_dir, dims), tmp_path / "a")
    assert all_tensors(folder)["vision_model.embeddings.patch_embedding.weight"].dtype == torch.float16
    convert(options(files, llm_dir, dims, projection=tmp_path / "proj_buffers.pth"), tmp_path / "b")


def hf_blip2_flan_t5_folder(folder: Path, dims) -> dict[str, torch.Tensor]:
    """A BLIP-2 folder as transformers itself saves one (T5 text model of width 4096, like blip2-flan-t5-xxl)."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, T5Config

    from skingpt4.folder.meta import qformer_config, vision_config

    vision = vision_config(dims.vit_width, dims.vit_depth, dims.vit_heads, dims.vit_mlp, dims.image_size)
    qformer = qformer_config(
        dims.qformer_width, dims.qformer_depth, dims.qformer_heads, dims.qformer_ffn, dims.vit_width
    )
    t5 = T5Config(vocab_size=32, d_model=4096, d_kv=8, d_ff=8, num_layers=1, num_decoder_layers=1, num_heads=1)
    torch.manual_seed(3)
    model = Blip2ForConditionalGeneration(
        Blip2Config(vision_config=vision, qformer_config=qformer, text_config=t5.to_dict(), num_query_tokens=32)
    )
    model.save_pretrained(folder)
    return model.state_dict()


def test_blip2_folder_route(tmp_path, lavis_files, llm_dir, dims):
    """Vision tower and Q-Former taken by name from a folder transformers wrote; its Flan-T5 side is never read."""
    blip2 = tmp_path / "blip2-flan-t5"
    stock = hf_blip2_flan_t5_folder(blip2, dims)
    opts = options(lavis_files, llm_dir, dims, vit=None, qformer=None, blip2=str(blip2))
    out = all_tensors(convert(opts, tmp_path / "out"))
    towers = [k for k in stock if k.startswith(("vision_model.", "qformer.")) or k == "query_tokens"]
    assert towers and all(torch.equal(out[k], stock[k]) for k in towers)
    assert torch.equal(
        out["language_projection.weight"], torch.load(lavis_files["proj"])["model"]["llama_proj.weight"]
    )

    index_free = dict(load_file(blip2 / "model.safetensors"))
    save_file({**index_free, "surprise.weight": torch.ones(1)}, blip2 / "model.safetensors")
    with pytest.raises(ConversionError, match="unexpected key 'surprise.weight' in --blip2"):
        convert(opts, tmp_path / "out2")
    config = json.loads((blip2 / "config.json").read_text())
    config["text_config"] = {"model_type": "opt", "hidden_size": 2560}
    (blip2 / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"has a opt text model \(width 2560\); SkinGPT-4 uses the Q-Former of"):
        convert(opts, tmp_path / "out3")


@pytest.mark.parametrize(
    ("source", "key"),
    [
        ("vit", "blocks.0.attn.relative_position_bias_table"),
        ("qformer", "Qformer.bert.pooler.dense.weight"),
        ("proj", "visual_encoder.cls_token"),
    ],
)
def test_unknown_key_stops_and_names_it(tmp_path, lavis_files, llm_dir, dims, source, key):
    def add(data):
        (data["model"] if "model" in data else data)[key] = torch.ones(2)

    edited = {**lavis_files, source: resave(lavis_files[source], add)}
    opts = options(edited, llm_dir, dims, projection=edited["proj"])
    with pytest.raises(ConversionError, match=f"unexpected key '{key}'"):
        convert(opts, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out-*"))  # nothing half-written


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((5120, 768), "made for a 13B LLM, but --llm is 7B"),
        ((4096, 768), "made for a 7B LLM, but --llm is 13B"),
        ((4096, 5632), "MiniGPT-4's Llama-2 variant without a Q-Former"),
    ],
)
def test_classic_projection_mistakes(shape, message):
    llm_width = 4096 if shape[0] == 5120 else 5120 if shape == (4096, 768) else 4096
    with pytest.raises(ConversionError, match=message):
        check_projection(torch.empty(shape), 768, llm_width)


def test_projection_size_mismatch_end_to_end(tmp_path, lavis_files, llm_dir, dims):
    def widen(data):
        data["model"]["llama_proj.weight"] = torch.ones(80, dims.qformer_width)
        data["model"]["llama_proj.bias"] = torch.ones(80)

    with pytest.raises(ConversionError, match=r"projection is \[80, 48\].*hidden size 64"):
        convert(options(lavis_files, llm_dir, dims, projection=resave(lavis_files["proj"], widen)), tmp_path / "o")


def test_truncated_and_corrupt_files(tmp_path, lavis_files, llm_dir, dims):
    cut = tmp_path / "skingpt4_proj.pth"
    data = lavis_files["proj"].read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="skingpt4_proj.pth is truncated or corrupt"):
        convert(options(lavis_files, llm_dir, dims, projection=cut), tmp_path / "o")
    noise = tmp_path / "noise.pth"
    for seed in range(20):  # random bytes trip many different parser errors; all become the same one line
        noise.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(ConversionError, match="noise.pth is truncated or corrupt"):
            convert(options(lavis_files, llm_dir, dims, projection=noise), tmp_path / "o")


class Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_with_code_is_refused_never_run(tmp_path, lavis_files, llm_dir, dims):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"llama_proj.weight": torch.ones(64, 48)}, "config": Payload(marker)}, evil)
    assert not marker.exists()
    with pytest.raises(ConversionError, match="evil.pth contains pickled Python objects .* refusing"):
        convert(options(lavis_files, llm_dir, dims, projection=evil), tmp_path / "o")
    assert not marker.exists()


def test_argument_errors(tmp_path, lavis_files, llm_dir, dims, converted_dir):
    with pytest.raises(ConversionError, match="either --vit and --qformer"):
        convert(options(lavis_files, llm_dir, dims, qformer=None), tmp_path / "o")
    with pytest.raises(ConversionError, match="exists and is not empty"):
        convert(options(lavis_files, llm_dir, dims), converted_dir)
    with pytest.raises(ConversionError, match="file not found"):
        convert(options(lavis_files, llm_dir, dims, vit=tmp_path / "missing.pth"), tmp_path / "o")
    with pytest.raises(ConversionError, match="is neither a folder nor a Hugging Face hub id"):
        convert(options(lavis_files, llm_dir, dims, llm=str(tmp_path / "no" / "such" / "llm")), tmp_path / "o")
    gpt2 = tmp_path / "gpt2"
    GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(gpt2)
    with pytest.raises(ConversionError, match="--llm is a 'gpt2' model; SkinGPT-4 needs a Llama-family LLM"):
        convert(options(lavis_files, llm_dir, dims, llm=str(gpt2)), tmp_path / "o")
    with pytest.raises(ConversionError, match="not divisible by --vit-heads 5"):
        convert(options(lavis_files, llm_dir, dims, vit_heads=5), tmp_path / "o")


def test_vit_g_needs_its_40_blocks_and_missing_keys_are_named(tmp_path, lavis_files, llm_dir, dims):
    from skingpt4.folder.keymap import map_vit

    blocks = {f"blocks.{i}.norm1.weight": torch.ones(1) for i in range(39)}
    with pytest.raises(ConversionError, match="has 39 blocks; eva_vit_g.pth has 40"):
        map_vit(
            {
                "cls_token": torch.ones(1, 1, 1408),
                "pos_embed": torch.ones(1),
                "patch_embed.proj.weight": 0,
                "patch_embed.proj.bias": 0,
                **blocks,
            }
        )
    no_pos = resave(lavis_files["vit"], lambda sd: sd.pop("pos_embed"))
    with pytest.raises(ConversionError, match="--vit file lacks 'pos_embed'"):
        convert(options({**lavis_files, "vit": no_pos}, llm_dir, dims), tmp_path / "o")
    no_ln = resave(lavis_files["qformer"], lambda data: data["model"].pop("ln_vision.weight"))
    with pytest.raises(ConversionError, match="--qformer file lacks 'ln_vision.weight'"):
        convert(options({**lavis_files, "qformer": no_ln}, llm_dir, dims), tmp_path / "o")


def test_tied_embedding_llm_converts_and_keeps_its_logits(tmp_path, lavis_files, llm_dir, dims):
    """An LLM whose head shares the embedding matrix (tie_word_embeddings, no lm_head.weight in its files)."""

    tied = tmp_path / "tied-llama"
    shutil.copytree(llm_dir, tied)
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    weights = load_file(tied / "model.safetensors")
    assert weights.pop("lm_head.weight") is not None
    save_file(weights, tied / "model.safetensors", metadata={"format": "pt"})
    llm = LlamaForCausalLM.from_pretrained(tied)
    assert llm.lm_head.weight.data_ptr() == llm.model.embed_tokens.weight.data_ptr()

    out = convert(options(lavis_files, llm_dir, dims, llm=str(tied)), tmp_path / "out")
    model = Blip2ForConditionalGeneration.from_pretrained(out)
    head = model.language_model.get_output_embeddings().weight
    rows = llm.lm_head.weight.shape[0]
    assert torch.equal(head[:rows], llm.lm_head.weight)  # the tied head, as the LLM computes its logits
    ids = torch.tensor([[1, 5, 9, 11]])
    expected = llm(input_ids=ids).logits
    got = model.language_model(input_ids=ids).logits[..., :rows]
    assert torch.allclose(got, expected, atol=1e-6)
