"""What a SkinGPT-4 model folder is: a Blip2 config with a Llama text model, one image token, and `skingpt4.json`.

A SkinGPT-4 model is a stock `transformers.Blip2ForConditionalGeneration` with a Llama text model and one added
image placeholder token: the 32 projected Q-Former outputs of each image are scattered into the 32 positions that
hold that token, exactly where the original spliced its image embeddings between `<Img>` and `</Img>`.
A model folder is an ordinary Hugging Face folder plus `skingpt4.json` (`ModelMeta`): the prompt template, image
constants, the `ln_vision` eps that a stock config cannot express, and the provenance of every source file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from skingpt4.errors import ModelLoadError
from skingpt4.inputs.pixels import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, PixelSpec

IMAGE_TOKEN = "<image>"  # one added special token; 32 copies stand for each image
NUM_QUERY_TOKENS = 32
META_FILE = "skingpt4.json"
TINY = "tiny"  # `--model tiny`: the random tiny model, built offline on first use
TRAINING_IMAGES = "training-images.sha256"  # a trained model's training images, by content (`eval` warns on them)


@dataclass
class ModelMeta:
    """What a SkinGPT-4 folder needs beyond the stock transformers files (saved as `skingpt4.json`)."""

    template: str = "skingpt4"
    image_size: int = IMAGE_SIZE
    image_mean: tuple[float, float, float] = CLIP_MEAN  # the pixel transforms use these (`pixels`)
    image_std: tuple[float, float, float] = CLIP_STD
    post_layernorm_eps: float = 1e-5  # the original `ln_vision`; the ViT blocks use 1e-6 (in config.json)
    untrained: bool = False
    name: str = ""  # what reports call the model; the folder's name when empty (a trained model: its run's name)
    description: str = ""
    sources: list[dict] = field(default_factory=list)  # [{"role", "name", "sha256", "bytes"}]

    @property
    def warning(self) -> str | None:
        if self.untrained:
            return "UNTRAINED random model: its answers are noise, for trying the software only."
        return None

    @property
    def pixels(self) -> PixelSpec:
        return PixelSpec(self.image_size, self.image_mean, self.image_std)

    def save(self, folder: str | Path) -> None:
        (Path(folder) / META_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> ModelMeta:
        path = Path(folder) / META_FILE
        if not path.is_file():
            return cls(description="plain BLIP-2 folder without skingpt4.json; original defaults assumed")
        damaged = ModelLoadError(f"{path} is damaged (not what skingpt4 writes); convert the model again")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
            for key in ("image_mean", "image_std"):
                if key in known:
                    known[key] = tuple(float(x) for x in known[key])
            meta = cls(**known)
        except (ValueError, TypeError, AttributeError):  # not JSON, not an object, or fields of the wrong kind
            raise damaged from None
        if len(meta.image_mean) != 3 or len(meta.image_std) != 3 or not isinstance(meta.image_size, int):
            raise damaged
        return meta


def make_config(vision: dict, qformer: dict, text_config, image_token_index: int):
    """A Blip2Config for SkinGPT-4 from plain dicts of sizes (see `vision_config` / `qformer_config`)."""
    from transformers import Blip2Config

    text = text_config.to_dict() if hasattr(text_config, "to_dict") else dict(text_config)
    return Blip2Config(
        vision_config=vision,
        qformer_config=qformer,
        text_config=text,
        num_query_tokens=NUM_QUERY_TOKENS,
        image_token_index=image_token_index,
    )


def vision_config(width=1408, depth=39, heads=16, mlp=6144, image_size=224, patch_size=14) -> dict:
    """EVA ViT-g as used by SkinGPT-4: 39 of 40 blocks, q/v biases, exact GELU, block LayerNorm eps 1e-6."""
    return dict(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=mlp,
        image_size=image_size,
        patch_size=patch_size,
        hidden_act="gelu",
        qkv_bias=True,
        layer_norm_eps=1e-6,
    )


def qformer_config(width=768, depth=12, heads=12, ffn=3072, encoder_width=1408) -> dict:
    """BLIP-2 Q-Former (BERT-base, query path only, cross-attention every 2nd layer)."""
    return dict(
        hidden_size=width,
        num_hidden_layers=depth,
        num_attention_heads=heads,
        intermediate_size=ffn,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        cross_attention_frequency=2,
        encoder_hidden_size=encoder_width,
        use_qformer_text_input=False,
    )


def add_image_token(tokenizer) -> int:
    """Add the image placeholder as a special token (pad = eos, as the original) and return its id."""
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def model_folder(model: str | Path) -> Path | None:
    """The folder `model` names, checked to be a model folder (None for the built-in tiny model: `tiny`, unless a
    folder of that name is here, which wins); cheap, without loading anything."""
    if str(model) == TINY and not Path(TINY).exists():
        return None
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model folder not found: {model} (give a folder made by `skingpt4 convert`, or `--model tiny`)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{model} has no config.json: is it a model folder made by `skingpt4 convert`?")
    return path


def save_tokenizer(tokenizer, folder: Path) -> None:
    """Save `tokenizer` into a model folder, its tokenizer_config.json naming a class that reads the saved
    tokenizer.json as it is. A byte-level tokenizer (Llama 3 style) declared as `LlamaTokenizer` would be warned
    about on every load (transformers then swaps the class); it is declared `TokenizersBackend` instead.
    SentencePiece-style tokenizers (Metaspace with byte fallback, Llama 1/2) keep their class."""
    tokenizer.save_pretrained(folder)
    serialized = json.loads((Path(folder) / "tokenizer.json").read_text(encoding="utf-8"))
    parts = [serialized.get("pre_tokenizer") or {}, serialized.get("decoder") or {}]
    parts += [p for part in parts for p in part.get("pretokenizers", []) + part.get("decoders", [])]
    if any(p.get("type") == "ByteLevel" for p in parts):
        config_file = Path(folder) / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config["tokenizer_class"] = "TokenizersBackend"
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def home_dir() -> Path:
    """Where we cache things (the tiny model, conversions): $SKINGPT4_HOME or ~/.cache/skingpt4."""
    return Path(os.environ.get("SKINGPT4_HOME") or Path.home() / ".cache" / "skingpt4")
