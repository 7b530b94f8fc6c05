"""Load a SkinGPT-4 model folder (`folder.py` says what one is) onto a device, in a precision, ready to chat.

This module writes no model code: the network is a stock `transformers.Blip2ForConditionalGeneration`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from skingpt4.errors import ModelLoadError, first_line
from skingpt4.folder import IMAGE_TOKEN, ModelMeta, model_folder
from skingpt4.tiny import tiny_model_dir


@dataclass
class LoadedModel:
    """A model ready for inference: the network, its tokenizer and our metadata."""

    model: torch.nn.Module
    tokenizer: object
    meta: ModelMeta
    model_id: str
    path: Path | None = None
    llm: object | None = None  # the language model on llama.cpp when quantized (`quantized.py`); else in `model`

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_index

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def warning(self) -> str | None:
        return self.meta.warning


# ---------------------------------------------------------------------------------------------------------------
# Loading


def resolve_model_path(model: str | Path) -> Path:
    """`tiny` (built on first use) or a model folder; anything else gets a one-line explanation."""
    return model_folder(model) or tiny_model_dir()


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
    return f"{meta.name or path.name}@{digest.hexdigest()[:12]}"


def load_model(
    model: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | dict | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    quantize: str | None = None,
) -> LoadedModel:
    """Load a SkinGPT-4 folder (or `tiny`) for inference: eval mode, no gradients, original eps restored.
    `quantize` (int8, int4) runs the LLM on llama.cpp on the CPU (`quantized.py`)."""
    from transformers import Blip2ForConditionalGeneration

    path = resolve_model_path(model)
    device = "cpu" if quantize and device in (None, "auto") else resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    if quantize is not None:
        bitsandbytes = load_in_8bit or load_in_4bit
        return _loaded(path, *_load_quantized(path, device, torch_dtype, quantize, device_map, bitsandbytes))
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
    return _loaded(path, net)


def _load_quantized(path: Path, device: str, dtype: torch.dtype, kind: str, device_map, bitsandbytes: bool):
    if device != "cpu" or device_map is not None or bitsandbytes:
        raise ModelLoadError("--quantize runs the LLM on the CPU (llama.cpp): use it with --device cpu alone")
    from skingpt4.quantized import load_quantized

    return load_quantized(path, kind, dtype)


def _loaded(path: Path, net, llm=None) -> LoadedModel:
    meta = ModelMeta.load(path)
    net.vision_model.post_layernorm.eps = meta.post_layernorm_eps
    net.eval().requires_grad_(False)
    tokenizer = load_tokenizer(path, net.config.image_token_index)
    return LoadedModel(net, tokenizer, meta, model_id(path, meta), path, llm)
