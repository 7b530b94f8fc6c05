"""Model folders: the tiny model, plain transformers loading, metadata, device/precision errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Blip2ForConditionalGeneration

from skingpt4.backends.transformers_llm import load_model
from skingpt4.errors import ModelLoadError
from skingpt4.folder.load import resolve_dtype
from skingpt4.folder.meta import IMAGE_TOKEN, META_FILE, ModelMeta
from skingpt4.folder.tiny import tiny_model_dir


def test_tiny_folder_is_a_plain_transformers_model(tiny_dir):
    model = Blip2ForConditionalGeneration.from_pretrained(tiny_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert model.config.text_config.model_type == "llama" and model.config.num_query_tokens == 32
    assert tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) == model.config.image_token_index
    assert model.config.text_config.vocab_size == len(tokenizer)
    assert model.generation_config.suppress_tokens == [model.config.image_token_index]
    assert model.generation_config.do_sample and model.generation_config.top_p == 0.9
    meta = json.loads((tiny_dir / META_FILE).read_text())
    assert meta["untrained"] is True and meta["post_layernorm_eps"] == 1e-5


def test_load_model_restores_the_original_eps_and_freezes(loaded):
    assert loaded.model.vision_model.post_layernorm.eps == 1e-5
    assert loaded.model.vision_model.encoder.layers[0].layer_norm1.eps == 1e-6
    assert not loaded.model.training and not any(p.requires_grad for p in loaded.model.parameters())
    assert loaded.info.warning.startswith("UNTRAINED") and loaded.info.model_id.startswith("model@")


def test_tiny_is_built_once_and_cached():
    first = tiny_model_dir()
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert tiny_model_dir() == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_model("tiny").info.meta.untrained


def test_meta_round_trip_and_plain_blip2_folder(tmp_path, tiny_dir):
    meta = ModelMeta(template="llama2", image_size=28, sources=[{"role": "vit", "sha256": "ab"}])
    meta.save(tmp_path)
    assert ModelMeta.load(tmp_path) == meta
    assert "without skingpt4.json" in ModelMeta.load(tmp_path / "elsewhere").description


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"device": "cuda"}, "no CUDA GPU is visible"),
        ({"device": "tpu"}, "expected cpu, cuda, cuda:N, mps or auto"),
        ({"dtype": "float8"}, "expected one of float32, float16, bfloat16"),
        ({"load_in_8bit": True}, "8-bit and 4-bit loading need a CUDA GPU"),
        ({"load_in_4bit": True, "load_in_8bit": True}, "choose one of --load-in-8bit and --load-in-4bit"),
    ],
)
def test_device_and_precision_errors(tiny_dir, kwargs, message):
    if torch.cuda.is_available() and "cuda" in message.lower():
        pytest.skip("this machine has a GPU; the error is for machines without one")
    with pytest.raises(ModelLoadError, match=message):
        load_model(tiny_dir, **kwargs)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_runs_on_cpu(tiny_dir, dtype):
    from conftest import image_bytes

    from skingpt4.engine.chat import ChatEngine
    from skingpt4.engine.settings import GenerationSettings

    assert resolve_dtype(None, "cpu") == torch.float32 and resolve_dtype(None, "cuda") == torch.float16
    half = load_model(tiny_dir, dtype=dtype)
    assert half.model.language_model.lm_head.weight.dtype == getattr(torch, dtype)
    assert half.model.vision_model.embeddings.patch_embedding.weight.dtype == getattr(torch, dtype)
    if dtype == "float16":  # transformers keeps the Q-Former in fp32 under fp16
        assert half.model.qformer.layernorm.weight.dtype == torch.float32
    session = ChatEngine(half).session()
    session.add_image(image_bytes())
    session.ask("What's wrong with my skin?")
    assert isinstance(session.answer(GenerationSettings.greedy(max_new_tokens=4)), str)


def test_missing_and_broken_folders(tmp_path, tiny_dir):
    with pytest.raises(ModelLoadError, match="model folder not found: .*--model tiny"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(tmp_path / "empty")
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_dir.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "tokenizer.json").write_text("{not json")
    (broken / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(ModelLoadError, match="cannot load the tokenizer in .*protobuf sentencepiece"):
        load_model(broken)
    (broken / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot load the model in"):
        load_model(broken)


@pytest.mark.parametrize(
    "text",
    ["{not json", "[1, 2]", '{"image_size": "big"}', '{"image_mean": [0.5, 0.5]}', '{"image_std": 3}', "\udcff"],
)
def test_a_damaged_skingpt4_json_is_one_line(tmp_path, tiny_dir, text):
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    (folder / META_FILE).write_bytes(text.encode("utf-8", "surrogateescape"))
    with pytest.raises(ModelLoadError, match=r"skingpt4.json is damaged .*convert the model again"):
        load_model(folder, device="cpu")


def byte_level_tokenizer():
    """A small Llama-3-style tokenizer: byte-level BPE, trained here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"], initial_alphabet=alphabet)
    backend.train_from_iterator(["the rash is red, dry and itchy"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_a_folder_names_the_tokenizer_class_its_tokenizer_json_needs(tmp_path, tiny_dir):
    """Byte-level tokenizers are declared `TokenizersBackend` (as `LlamaTokenizer`, transformers warns on every load
    and swaps the class); SentencePiece-style ones keep `LlamaTokenizer`, and both read text back unchanged."""
    from transformers.models.auto.tokenization_auto import logger as auto_logger

    from skingpt4.folder.meta import save_tokenizer

    byte_level = byte_level_tokenizer()
    saved = byte_level.save_pretrained

    def save_as_llama(folder):  # as transformers versions that keep the LLM folder's declared class do
        saved(folder)
        config = json.loads((Path(folder) / "tokenizer_config.json").read_text())
        (Path(folder) / "tokenizer_config.json").write_text(
            json.dumps({**config, "tokenizer_class": "LlamaTokenizer"})
        )

    byte_level.save_pretrained = save_as_llama
    save_tokenizer(byte_level, tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "TokenizersBackend"
    assert json.loads((tiny_dir / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    warned = []
    auto_logger.warning_once = auto_logger.warning = lambda message, *a, **k: warned.append(message)
    try:
        for folder in (tmp_path, tiny_dir):
            tokenizer = AutoTokenizer.from_pretrained(folder)
            text = "the rash is red, dry and itchy"
            assert tokenizer.decode(tokenizer(text, add_special_tokens=False).input_ids) == text
    finally:
        del auto_logger.warning_once, auto_logger.warning
    assert warned == []
