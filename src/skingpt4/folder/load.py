"""What loading a model folder (`meta.py` says what one is) needs whichever back end runs it: the folder or `tiny`,
the device and precision, the tokenizer, the model's id and info, and the loaded model as the engine takes it.

The back ends load it: `backends/transformers_llm.py` (`load_model`, any device and precision) and
`backends/llamacpp.py` (`load_quantized`). No model code is written here or there: the network is a stock
`transformers.Blip2ForConditionalGeneration`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from skingpt4.errors import ModelLoadError, first_line
from skingpt4.folder.meta import IMAGE_TOKEN, ModelMeta, model_folder
from skingpt4.folder.tiny import tiny_model_dir


@dataclass(frozen=True)
class ModelInfo:
    """What every surface reads of a model, whichever engine runs it: its id, folder and metadata."""

    model_id: str
    meta: ModelMeta
    path: Path | None = None

    @property
    def warning(self) -> str | None:
        return self.meta.warning

    @classmethod
    def of(cls, path: Path) -> ModelInfo:
        meta = ModelMeta.load(path)
        return cls(model_id(path, meta), meta, path)


@dataclass
class LoadedModel:
    """A model ready for inference: the network (vision tower, Q-Former, projection, token embeddings), its
    language model behind the engine's `LanguageModel` interface (`engine/protocol.py`), its tokenizer, its info."""

    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo
    llm: object  # a `LanguageModel`: `backends.transformers_llm.TransformersLLM` or `backends.llamacpp.LlamaCppLLM`

    @property
    def image_token_id(self) -> int:
        return self.model.config.image_token_index

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device


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


def never_generated(rows: int, tokens: int, ids) -> torch.Tensor:
    """The never-generate mask, a boolean row over the LM head's `rows`: `ids` (the `<image>` placeholder and the
    folder's `suppress_tokens`) and every row past the tokenizer's `tokens`, which has no text (a random model's
    head may be larger). Our engine and the vLLM plugin both apply it, so both answer with the same ids."""
    mask = torch.zeros(rows, dtype=torch.bool)
    mask[sorted({i for i in ids if i < tokens})] = True
    mask[tokens:] = True
    return mask


def model_id(path: Path, meta: ModelMeta) -> str:
    """Folder name plus a short fingerprint of its config and provenance (cheap: no weight hashing)."""
    digest = hashlib.sha256((path / "config.json").read_bytes())
    digest.update(json.dumps(asdict(meta), sort_keys=True).encode())
    return f"{meta.name or path.name}@{digest.hexdigest()[:12]}"


def ready(path: Path, net, llm) -> LoadedModel:
    """A loaded network made ready for inference (eval mode, no gradients, the original's eps) with its tokenizer."""
    info = ModelInfo.of(path)
    net.vision_model.post_layernorm.eps = info.meta.post_layernorm_eps
    net.eval().requires_grad_(False)
    return LoadedModel(net, load_tokenizer(path, net.config.image_token_index), info, llm)
