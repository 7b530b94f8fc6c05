"""The tiny random model: SkinGPT-4's structure at toy widths, with a real tokenizer trained in-process.

Plumbing for tests and for trying the software offline (`--model tiny`); UNTRAINED, and every surface says so.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import torch

from skingpt4.engine.sampler import folder_generation_config
from skingpt4.errors import InputError
from skingpt4.folder.meta import (
    IMAGE_TOKEN,
    META_FILE,
    ModelMeta,
    add_image_token,
    home_dir,
    make_config,
    qformer_config,
    save_tokenizer,
    vision_config,
)
from skingpt4.folder.serving import write_serving_files

TINY_CORPUS = (
    "Give the following image: <Img>ImageContent</Img>. You will be able to see the image once I provide it to "
    "you. Please answer my questions.",
    "###Human: <Img><ImageHere></Img> What's wrong with my skin?###Assistant: This is a skin disease image with "
    "the following clinical concepts: Plaque, Erythema, Scale, Papule, Crust, Ulcer, Nodule.###",
    "Could you describe the skin disease in this image for me? This could be a skin disease image of psoriasis, "
    "eczema, melanoma, basal cell carcinoma, actinic keratosis, acne, rosacea or seborrheic keratosis.",
    "Please provide a paragraph listing additional features you observed in the image.",
    "Based on the previous information, please provide a detailed explanation of the cause of this skin disease.",
    "What treatment and medication should be recommended for this case? See a dermatologist.",
)


def train_tiny_sentencepiece(vocab_size: int = 512) -> bytes:
    """A real SentencePiece BPE model (byte fallback, Llama's ids unk=0 bos=1 eos=2) trained in-process."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TINY_CORPUS * 8),
        model_writer=buffer,
        vocab_size=vocab_size,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        character_coverage=1.0,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return buffer.getvalue()


def build_tiny_tokenizer(vocab_size: int = 512, with_image_token: bool = True):
    """A Llama tokenizer over `train_tiny_sentencepiece`, loaded the way a real Llama folder's is."""
    from transformers import LlamaTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "tokenizer.model").write_bytes(train_tiny_sentencepiece(vocab_size))
        tokenizer = LlamaTokenizer.from_pretrained(tmp)
    if with_image_token:
        add_image_token(tokenizer)
    return tokenizer


def tiny_configs(vocab_size: int) -> tuple[dict, dict, dict]:
    """Sizes of the tiny model: real structure (224 px, patch 14, 32 queries), toy widths."""
    vision = vision_config(width=32, depth=2, heads=4, mlp=88)
    qformer = qformer_config(width=48, depth=2, heads=4, ffn=96, encoder_width=32)
    text = dict(
        model_type="llama",
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        rms_norm_eps=1e-6,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
    )
    return vision, qformer, text


def create_random_model(
    out: str | Path, vision: dict, qformer: dict, text: dict, seed: int = 0, tokenizer=None
) -> Path:
    """Write a complete random SkinGPT-4 folder of the given sizes (tokenizer included). UNTRAINED, and says so.

    `text["vocab_size"]` may exceed the tokenizer (benchmarks use 32000 like Llama); the chat engine never
    generates ids the tokenizer lacks.
    """
    from transformers import Blip2ForConditionalGeneration, LlamaConfig

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):  # never mix random weights into a model folder
        raise InputError(f"{out} exists and is not an empty folder: give a new folder for the tiny model")
    tokenizer = tokenizer or build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = {**text, "vocab_size": max(text.get("vocab_size", 0), len(tokenizer))}
    config = make_config(vision, qformer, LlamaConfig(**text), image_token_id)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config = folder_generation_config(tokenizer, image_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    save_tokenizer(tokenizer, out)
    ModelMeta(untrained=True, description=f"random model, seed {seed}").save(out)
    write_serving_files(out)
    return out


def create_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """The tiny random model: real structure (224 px, patch 14, 32 queries), toy widths. Builds in seconds."""
    tokenizer = build_tiny_tokenizer()
    return create_random_model(out, *tiny_configs(vocab_size=len(tokenizer)), seed=seed, tokenizer=tokenizer)


def tiny_model_dir() -> Path:
    """The cached tiny model, built offline on first use."""
    return cached_folder("tiny-model", create_tiny_model, META_FILE)


def cached_folder(name: str, build, last_file: str) -> Path:
    """`name` in the cache, made by `build(folder)` on first use (`last_file`: what a finished one holds)."""
    folder = home_dir() / name
    if not (folder / last_file).is_file():
        home_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=home_dir()))
        build(tmp)
        try:
            tmp.rename(folder)  # atomic: a half-written cache never looks complete
        except OSError:  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def without_endings(folder: Path) -> Path:
    """Make a model folder's answers run to their token budget: EOS and every piece with `#` (the template's stop
    string) go into its generation_config.json's suppress_tokens, which the engine honours. For benchmarks and
    tests that must compare or time answers of a known length."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    config = json.loads((folder / "generation_config.json").read_text(encoding="utf-8"))
    ends = [i for i, piece in enumerate(vocab) if "#" in piece] + [tokenizer.eos_token_id]
    config["suppress_tokens"] = sorted({*config.get("suppress_tokens", []), *ends})
    (folder / "generation_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder
