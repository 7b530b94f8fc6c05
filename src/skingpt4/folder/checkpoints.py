"""Reading foreign weight files safely: `.pth` pickles with `weights_only=True`, safetensors lazily, hub folders.

A file that carries code is refused, never executed; a truncated or corrupt file gets one line naming it.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Iterator
from pathlib import Path

import torch

from skingpt4.errors import ConversionError, first_line


def load_pth(path: Path) -> dict:
    """torch.load with weights_only=True (memory-mapped when possible); one-line errors for the classic faults."""
    if not path.is_file():
        raise ConversionError(f"file not found: {path}")
    try:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            data = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a refused object: the bytes are not a checkpoint at all
            raise ConversionError(f"{path.name} is truncated or corrupt (not a PyTorch checkpoint)") from None
        raise ConversionError(
            f"{path.name} contains pickled Python objects other than tensors; refusing to load it (it could run code)"
        ) from None
    except Exception as exc:  # zip, pickle and storage errors of every kind: one line naming the file
        raise ConversionError(f"{path.name} is truncated or corrupt ({first_line(exc)})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path.name} holds a {type(data).__name__}, not a state dict")
    return data


def state_dict(data: dict) -> dict[str, torch.Tensor]:
    """The LAVIS runner format `{"model": {...}, "optimizer": ...}`, or a flat dict of tensors."""
    inner = data.get("model", data)
    if not isinstance(inner, dict):
        raise ConversionError("checkpoint's 'model' entry is not a state dict")
    return {k: v for k, v in inner.items() if isinstance(v, torch.Tensor)}


def weight_files(folder: Path) -> list[Path]:
    """A HF folder's weight files: safetensors shards if any, else pytorch_model*.bin."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(f"no *.safetensors or pytorch_model*.bin weights in {folder}")
    return files


def tensor_keys(path: Path) -> list[str]:
    """The tensor names of one weight file, without reading the tensors of a safetensors file."""
    if path.suffix != ".safetensors":
        return list(state_dict(load_pth(path)))
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except SafetensorError as exc:
        raise ConversionError(f"{path.name} is truncated or corrupt ({first_line(exc)})") from None


def iter_tensors(path: Path, keys: list[str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors of one weight file (all, or `keys`), one at a time (safetensors) or memory-mapped (.bin)."""
    if path.suffix != ".safetensors":
        sd = state_dict(load_pth(path))
        yield from ((k, sd[k]) for k in (keys if keys is not None else list(sd)))
        return
    from safetensors import SafetensorError, safe_open

    try:
        for key in tensor_keys(path) if keys is None else keys:
            # A fresh handle per tensor: safetensors hands out views of its memory map, and pages read through one
            # handle stay resident until it closes (9.7 GB for a Llama-2-7B shard, measured by bench/).
            with safe_open(path, framework="pt") as f:
                tensor = f.get_tensor(key)
            yield key, tensor
    except SafetensorError as exc:
        raise ConversionError(f"{path.name} is truncated or corrupt ({first_line(exc)})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(folder: Path) -> str:
    """One SHA-256 for a model folder's weights: over each weight file's name and SHA-256, in name order.

    Records name the exact weights they came from. Reading every byte takes a while for a 13B model (about a
    minute per 10 GB), so callers compute it once per process, and only when records are kept.
    """
    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def hub_folder(name: str, patterns: list[str]) -> Path:
    """A local folder, or a hub id downloaded (only `patterns`) into the Hugging Face cache.

    Weights come as safetensors when the repository has them; only repositories without any (Vicuna v0
    conversions, say) fetch `pytorch_model*.bin`, so a repo that has both is never downloaded twice.
    """
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists() or name.count("/") != 1:
        raise ConversionError(f"{name} is neither a folder nor a Hugging Face hub id (org/name)")
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(name, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")):
            folder = Path(snapshot_download(name, allow_patterns=[*patterns, "pytorch_model*.bin"]))
        return folder
    except Exception as exc:  # network, auth, missing repo: one line for the user
        raise ConversionError(f"cannot download {name} from the Hugging Face hub ({first_line(exc)})") from None
