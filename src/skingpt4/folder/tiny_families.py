"""Tiny random folders of the other model families (`--model tiny-gemma3`, `tiny-qwen2_5_vl`, `tiny-llava`).

Each is the family's own transformers classes (config, model, processor, image processor) at toy widths, with a
tokenizer trained on the tiny model's corpus (`tiny.py`), the family's special tokens, and a chat
template written here to the family's prompt format (MedGemma's / Gemma 3's turns, Qwen2.5-VL's ChatML, LLaVA-1.5's
`USER: ... ASSISTANT:`). Real folders bring their own templates; these are for tests, the bench and trying every
surface offline on a family's layout. UNTRAINED: their answers are noise.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from skingpt4.folder.family import UNTRAINED_KEY, save_image_only
from skingpt4.folder.tiny import TINY_CORPUS, cached_folder, train_tiny_sentencepiece

IMAGE_PX = 56  # 4 x 4 patches of 14 px
TEXT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
TEXT |= dict(head_dim=16, max_position_embeddings=4096)

GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{% set prefix = messages[0]['content'][0]['text'] + '\n\n' %}{% set turns = messages[1:] %}"
    "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}{% for message in turns %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else 'user') + '\n' }}"
    "{% if loop.first %}{{ prefix }}{% endif %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<start_of_image>' }}{% else %}{{ content['text'] | trim }}{% endif %}"
    "{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
QWEN_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAVA_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}"
    "{% endif %}{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% endif %}{% endfor %}{% for content in message['content'] %}{% if content['type'] == 'text' %}"
    "{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def _tokenizer(cls_name: str, special: list[str], **named):
    """The family's tokenizer class over the tiny SentencePiece vocabulary (Gemma, Llama) or, for Qwen's byte-level
    BPE, over a byte-level BPE trained on the same corpus."""
    import transformers

    cls = getattr(transformers, cls_name)
    if cls_name == "Qwen2Tokenizer":
        tokenizer = cls(**_byte_level_bpe(), **named)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "tokenizer.model").write_bytes(train_tiny_sentencepiece(512))
            tokenizer = cls.from_pretrained(tmp, **named)
    tokenizer.add_special_tokens({"additional_special_tokens": special})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def _byte_level_bpe(vocab_size: int = 512) -> dict:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=alphabet, special_tokens=["<|endoftext|>"])
    bpe.train_from_iterator(list(TINY_CORPUS) * 8, trainer)
    model = json.loads(bpe.to_str())["model"]
    return dict(vocab=model["vocab"], merges=[tuple(pair) for pair in model["merges"]])


def _image_processor(name: str, **options):
    """The family's image processor without torchvision (transformers names its PIL version `...Pil`)."""
    import transformers

    return (getattr(transformers, name + "Pil", None) or getattr(transformers, name))(**options)


def _gemma3(sizes: dict):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor

    marks = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]
    extra = {"image_token": marks[4], "boi_token": marks[2], "eoi_token": marks[3]}
    tokenizer = _tokenizer("GemmaTokenizer", marks, extra_special_tokens=extra)
    ids = dict(zip(marks, tokenizer.convert_tokens_to_ids(marks)))
    text = TEXT | dict(vocab_size=len(tokenizer), sliding_window=512, pad_token_id=tokenizer.pad_token_id)
    text |= dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, ids["<end_of_turn>"]])
    text |= sizes
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    vision |= dict(image_size=IMAGE_PX, patch_size=14)
    config = Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=4,
        image_token_index=ids["<image_soft_token>"],
        boi_token_index=ids["<start_of_image>"],
        eoi_token_index=ids["<end_of_image>"],
    )
    model = Gemma3ForConditionalGeneration(config)
    with torch.no_grad():  # transformers initialises the projection to zeros: every photo would read alike
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.5)
    images = _image_processor("Gemma3ImageProcessor", size={"height": IMAGE_PX, "width": IMAGE_PX})
    processor = Gemma3Processor(images, tokenizer, chat_template=GEMMA3_TEMPLATE, image_seq_length=4)
    return model, processor


def _qwen2_5_vl(sizes: dict):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    from skingpt4.folder.family import image_only

    marks = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer("Qwen2Tokenizer", marks, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    ids = dict(zip(marks, tokenizer.convert_tokens_to_ids(marks)))
    text = TEXT | dict(vocab_size=len(tokenizer), rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    text |= dict(eos_token_id=ids["<|im_end|>"], pad_token_id=tokenizer.pad_token_id, bos_token_id=None) | sizes
    vision = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14)
    vision |= dict(out_hidden_size=text["hidden_size"])  # the merger writes the language model's width
    vision |= dict(spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[0])
    config = Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    pixels = IMAGE_PX * IMAGE_PX
    images = _image_processor("Qwen2VLImageProcessor", min_pixels=pixels, max_pixels=pixels, patch_size=14)
    processor = image_only(Qwen2_5_VLProcessor, images, tokenizer, QWEN_TEMPLATE)  # no torchvision: no videos
    return Qwen2_5_VLForConditionalGeneration(config), processor


def _llava(sizes: dict):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = _tokenizer("LlamaTokenizer", ["<image>"])
    text = TEXT | dict(model_type="llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id) | sizes
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    vision |= dict(image_size=IMAGE_PX, patch_size=14, projection_dim=32, model_type="clip_vision_model")
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    px = {"shortest_edge": IMAGE_PX}
    images = _image_processor("CLIPImageProcessor", size=px, crop_size={"height": IMAGE_PX, "width": IMAGE_PX})
    processor = LlavaProcessor(
        images, tokenizer, patch_size=14, vision_feature_select_strategy="default", num_additional_image_tokens=1
    )
    processor.chat_template = LLAVA_TEMPLATE
    return LlavaForConditionalGeneration(config), processor


BUILDERS = {"gemma3": _gemma3, "qwen2_5_vl": _qwen2_5_vl, "llava": _llava}  # family.TINY_FAMILIES names them


def build_tiny_family(family: str, folder: Path, seed: int = 0, sizes: dict | None = None) -> Path:
    """Write a tiny random folder of `family` (one of `BUILDERS`) into `folder`; `sizes` overrides the language
    model's config fields (the bench's larger models)."""
    torch.manual_seed(seed)
    model, processor = BUILDERS[family](sizes or {})
    model.generation_config.eos_token_id = model.config.get_text_config().eos_token_id
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    setattr(model.config, UNTRAINED_KEY, True)  # the surfaces then say its answers are noise
    model.eval().save_pretrained(folder)
    if getattr(processor, "video_processor", "") is None:
        save_image_only(processor, folder)
    else:
        processor.save_pretrained(folder)
    return folder


def tiny_family_dir(name: str) -> Path:
    """`tiny-<family>`, built into the cache on first use."""
    last = "tokenizer_config.json"
    return cached_folder(name, lambda folder: build_tiny_family(name.removeprefix("tiny-"), folder), last)
