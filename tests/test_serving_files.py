"""A model folder as other engines read it (`folder/serving.py`): vLLM's config checks, `AutoProcessor`, the chat
template. vLLM itself cannot run here (its wheel is CUDA-only); what it reads from the folder is checked instead."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from skingpt4.cli.main import main
from skingpt4.folder.meta import IMAGE_TOKEN, ModelMeta
from skingpt4.folder.serving import CHAT_TEMPLATE_FILE, write_serving_files
from skingpt4.inputs.conversation import Conversation, get_template
from skingpt4.inputs.prompt import one_slot_per_image, prompt_ids


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


@pytest.mark.parametrize(
    ("size", "mode"), [((300, 200), "RGB"), ((64, 48), "RGB"), ((224, 224), "RGB"), ((97, 131), "L")]
)
def test_auto_processor_gives_our_pixels(tiny_dir, size, mode):
    from transformers import AutoProcessor, Blip2Processor
    from transformers.utils import is_torchvision_available

    # With torchvision installed (vLLM's environment) transformers picks its torchvision backend, whose resize is
    # not the original's (0.015 apart, seen with transformers 5.20): the vLLM plugin computes pixels itself.
    backend = {"backend": "pil"} if is_torchvision_available() else {}
    processor = AutoProcessor.from_pretrained(tiny_dir, **backend)
    assert isinstance(processor, Blip2Processor) and processor.num_query_tokens == 32
    rng = np.random.default_rng(sum(size))
    channels = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
    image = Image.fromarray((rng.random(channels) * 255).astype(np.uint8), mode)
    theirs = processor.image_processor(images=image, return_tensors="pt").pixel_values[0]
    ours = ModelMeta.load(tiny_dir).pixels.eval(image.convert("RGB"))
    assert theirs.shape == ours.shape == (3, 224, 224)
    assert float((theirs - ours).abs().max()) <= 1e-6


def conversation(images_per_turn: list[int], answers: int) -> tuple[Conversation, list[dict]]:
    """The same consultation as our `Conversation` and as OpenAI-style messages."""
    ours, messages = Conversation(get_template("skingpt4")), []
    for turn, images in enumerate(images_per_turn):
        question = f"Question {turn}: is it spreading, doctor?"
        for _ in range(images):
            ours.add_image()
        ours.add_question(question)
        messages.append(
            {"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": question}]}
        )
        if turn < answers:
            answer = f"Answer {turn}: it looks like eczema."
            ours.add_answer(answer)
            messages.append({"role": "assistant", "content": answer})
    return ours, messages


@pytest.mark.parametrize("images", [[1], [2, 0], [1, 1, 0], [3, 0, 1, 0], [0, 2]])
def test_the_chat_template_gives_our_prompt_ids(tokenizer, images):
    """Photos per user turn (1-3 photos, 1-4 turns, one turn with none); every turn but the last answered."""
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    ours, messages = conversation(images, answers=len(images) - 1)
    expected = one_slot_per_image(prompt_ids(tokenizer, ours.prompt(), image_id), image_id)
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.count(IMAGE_TOKEN) == sum(images)
    assert tokenizer(text, add_special_tokens=False).input_ids == expected
    unspaced = text.replace("<s> ", "<s>").replace(f"{IMAGE_TOKEN} ", IMAGE_TOKEN)
    assert tokenizer(unspaced, add_special_tokens=False).input_ids != expected  # why the template has the spaces


def test_the_config_passes_vllms_registry_checks(tiny_dir, tokenizer):
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["architectures"] == ["SkinGPT4ForConditionalGeneration"]  # the plugin's (test_vllm_engine.py)
    assert config["text_config"]["architectures"] == ["LlamaForCausalLM"]  # else "No model architectures"
    assert config["image_token_index"] == tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert config["num_query_tokens"] == 32 and config["text_config"]["model_type"] == "llama"


def test_weights_are_named_as_vllms_blip2_loads_them(tiny_dir, loaded):
    """vLLM's BLIP-2 has transformers' module names: vision_model, query_tokens, qformer, language_projection, and
    a language model under `language_model.` built from the text config (a Llama: `model.*` and `lm_head`)."""
    with safe_open(tiny_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    prefixes = ("vision_model.", "qformer.", "language_projection.", "language_model.model.")
    assert all(k.startswith(prefixes) or k in ("query_tokens", "language_model.lm_head.weight") for k in keys)
    assert keys == set(loaded.model.state_dict())  # every parameter saved, under the stock class's own names


def test_convert_upgrade_adds_the_files_to_an_older_folder(tiny_dir, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(tiny_dir, old)
    for name in ("preprocessor_config.json", "processor_config.json", CHAT_TEMPLATE_FILE):
        (old / name).unlink()
    config = json.loads((old / "config.json").read_text())
    del config["text_config"]["architectures"]
    config["architectures"] = ["Blip2ForConditionalGeneration"]  # what folders named before the vLLM plugin
    (old / "config.json").write_text(json.dumps(config))
    weights = hashlib.sha256((old / "model.safetensors").read_bytes()).hexdigest()
    assert main(["convert", "--upgrade", str(old)]) == 0
    assert "weights untouched" in capsys.readouterr().out
    for name in ("preprocessor_config.json", "processor_config.json", CHAT_TEMPLATE_FILE, "config.json"):
        assert (old / name).read_bytes() == (tiny_dir / name).read_bytes(), name  # as a new folder has them
    assert hashlib.sha256((old / "model.safetensors").read_bytes()).hexdigest() == weights
    write_serving_files(old)  # again: nothing changes
    assert (old / "config.json").read_bytes() == (tiny_dir / "config.json").read_bytes()
    assert main(["convert", "--upgrade", str(old), "--out", str(tmp_path / "x")]) == 2
    assert "--upgrade FOLDER takes no other source" in capsys.readouterr().err
    assert main(["convert", "--out", str(tmp_path / "x")]) == 2
    assert "convert needs --llm, --projection" in capsys.readouterr().err
