"""Build, load and save SkinGPT-4 models.

A SkinGPT-4 model is a stock `transformers.Blip2ForConditionalGeneration` with a Llama text model and one added
image placeholder token: the 32 projected Q-Former outputs of each image are scattered into the 32 positions that
hold that token, exactly where the original spliced its image embeddings between `<Img>` and `</Img>`.
A model folder is an ordinary Hugging Face folder plus `skingpt4.json` (`ModelMeta`): the prompt template, image
constants, the `ln_vision` eps that a stock config cannot express, and the provenance of every source file.

This module writes no model code; it only builds configs, the tiny random model, and loads folders.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from skingpt4.errors import ModelLoadError, first_line
from skingpt4.generation import folder_generation_config
from skingpt4.pixels import CLIP_MEAN, CLIP_STD, IMAGE_SIZE, PixelSpec

IMAGE_TOKEN = "<image>"  # one added special token; 32 copies stand for each image
NUM_QUERY_TOKENS = 32
META_FILE = "skingpt4.json"
TINY = "tiny"


@dataclass
class ModelMeta:
    """What a SkinGPT-4 folder needs beyond the stock transformers files (saved as `skingpt4.json`)."""

    template: str = "skingpt4"
    image_size: int = IMAGE_SIZE
    image_mean: tuple[float, float, float] = CLIP_MEAN  # the pixel transforms use these (`pixels`)
    image_std: tuple[float, float, float] = CLIP_STD
    post_layernorm_eps: float = 1e-5  # the original `ln_vision`; the ViT blocks use 1e-6 (in config.json)
    untrained: bool = False
    description: str = ""
    sources: list[dict] = field(default_factory=list)  # [{"role", "name", "sha256", "bytes"}]

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


@dataclass
class LoadedModel:
    """A model ready for inference: the network, its tokenizer and our metadata."""

    model: torch.nn.Module
    tokenizer: object
    meta: ModelMeta
    model_id: str
    path: Path | None = None

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_index

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def warning(self) -> str | None:
        if self.meta.untrained:
            return "UNTRAINED random model: its answers are noise, for trying the software only."
        return None


# ---------------------------------------------------------------------------------------------------------------
# Configs


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


# ---------------------------------------------------------------------------------------------------------------
# The tiny random model: plumbing for tests and for trying the software offline


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
    tokenizer = tokenizer or build_tiny_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text = {**text, "vocab_size": max(text.get("vocab_size", 0), len(tokenizer))}
    config = make_config(vision, qformer, LlamaConfig(**text), image_token_id)
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    model.generation_config = folder_generation_config(tokenizer, image_token_id)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    ModelMeta(untrained=True, description=f"random model, seed {seed}").save(out)
    return out


def create_tiny_model(out: str | Path, seed: int = 0) -> Path:
    """The tiny random model: real structure (224 px, patch 14, 32 queries), toy widths. Builds in seconds."""
    tokenizer = build_tiny_tokenizer()
    return create_random_model(out, *tiny_configs(vocab_size=len(tokenizer)), seed=seed, tokenizer=tokenizer)


def home_dir() -> Path:
    """Where we cache things (the tiny model, conversions): $SKINGPT4_HOME or ~/.cache/skingpt4."""
    return Path(os.environ.get("SKINGPT4_HOME") or Path.home() / ".cache" / "skingpt4")


def tiny_model_dir() -> Path:
    """The cached tiny model, built offline on first use."""
    folder = home_dir() / "tiny-model"
    if not (folder / META_FILE).is_file():
        home_dir().mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="tiny-", dir=home_dir()))
        create_tiny_model(tmp)
        try:
            tmp.rename(folder)  # atomic: a half-written cache never looks complete
        except OSError:  # another process won the race
            pass
    return folder


def resolve_model_path(model: str | Path) -> Path:
    """`tiny` or a model folder; anything else gets a one-line explanation."""
    if str(model) == TINY:
        return tiny_model_dir()
    path = Path(model).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"model folder not found: {model} (give a folder made by `skingpt4 convert`, or `--model tiny`)"
        )
    if not (path / "config.json").is_file():
        raise ModelLoadError(f"{model} has no config.json: is it a model folder made by `skingpt4 convert`?")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Loading


DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_device(device: str | None) -> str:
    """`auto`/None picks cuda, then mps, then cpu; an unavailable device is a clear error."""
    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {device}: no CUDA GPU is visible to PyTorch on this machine")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"--device {device}: Apple MPS is not available on this machine")
    if kind not in ("cpu", "cuda", "mps"):
        raise ModelLoadError(f"--device {device}: expected cpu, cuda, cuda:N, mps or auto")
    return device


def resolve_dtype(dtype: str | None, device: str) -> torch.dtype:
    """None means the original's precision: float16 on a GPU, float32 on the CPU."""
    if dtype in (None, "auto"):
        return torch.float16 if device.startswith("cuda") else torch.float32
    if dtype not in DTYPES:
        raise ModelLoadError(f"--dtype {dtype}: expected one of float32, float16, bfloat16")
    return DTYPES[dtype]


def quantization_config(load_in_8bit: bool, load_in_4bit: bool, dtype: torch.dtype):
    """BitsAndBytes for the LLM only; the towers and the projection stay in `dtype`. CUDA only."""
    if not (load_in_8bit or load_in_4bit):
        return None
    if load_in_8bit and load_in_4bit:
        raise ModelLoadError("choose one of --load-in-8bit and --load-in-4bit")
    if not torch.cuda.is_available():
        raise ModelLoadError("8-bit and 4-bit loading need a CUDA GPU (bitsandbytes); use --dtype on this machine")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError("8-bit and 4-bit loading need bitsandbytes: pip install 'skingpt4[quant]'") from exc
    from transformers import BitsAndBytesConfig

    skip = ["vision_model", "qformer", "language_projection", "lm_head"]
    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=skip
    )


def load_tokenizer(path: Path, image_token_id: int):
    """The folder's tokenizer, checked to carry the image placeholder at the config's id."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except Exception as exc:  # transformers raises many kinds here; the user needs one line
        raise ModelLoadError(
            f"cannot load the tokenizer in {path} ({first_line(exc)}); a SentencePiece-only folder needs "
            "`pip install protobuf sentencepiece`"
        ) from None
    if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != image_token_id:
        raise ModelLoadError(f"tokenizer in {path} lacks the {IMAGE_TOKEN} token at id {image_token_id}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def model_id(path: Path, meta: ModelMeta) -> str:
    """Folder name plus a short fingerprint of its config and provenance (cheap: no weight hashing)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    digest.update(json.dumps(asdict(meta), sort_keys=True).encode())
    return f"{path.name}@{digest.hexdigest()[:12]}"


def load_model(
    model: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | dict | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load a SkinGPT-4 folder (or `tiny`) for inference: eval mode, no gradients, original eps restored."""
    from transformers import Blip2ForConditionalGeneration

    path = resolve_model_path(model)
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    quant = quantization_config(load_in_8bit, load_in_4bit, torch_dtype)
    kwargs: dict = {"dtype": torch_dtype}
    if quant is not None:  # bitsandbytes models cannot be moved after loading: place them on the chosen GPU
        kwargs.update(quantization_config=quant, device_map=device_map or {"": torch.device(device).index or 0})
    elif device_map is not None:
        kwargs["device_map"] = device_map
    try:
        net = Blip2ForConditionalGeneration.from_pretrained(path, **kwargs)
    except Exception as exc:  # safetensors, OSError, shape mismatches...: the user needs one line, not a traceback
        raise ModelLoadError(f"cannot load the model in {path}: {first_line(exc, 300)}") from None
    if quant is None and device_map is None:
        net.to(device)
    meta = ModelMeta.load(path)
    net.vision_model.post_layernorm.eps = meta.post_layernorm_eps
    net.eval().requires_grad_(False)
    tokenizer = load_tokenizer(path, net.config.image_token_index)
    return LoadedModel(net, tokenizer, meta, model_id(path, meta), path)
