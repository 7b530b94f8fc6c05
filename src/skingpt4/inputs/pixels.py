"""SkinGPT-4's pixel transforms (LAVIS ``blip2_image_eval`` / ``blip2_image_train``), without torchvision.

docs/reference.md §1.2: eval is ``Resize((224, 224), BICUBIC)`` (squashes, aspect ratio not kept) ->
``ToTensor`` -> ``Normalize(CLIP_MEAN, CLIP_STD)``; train is ``RandomResizedCrop(224, scale=(0.5, 1.0),
BICUBIC)`` -> ``ToTensor`` -> the same ``Normalize``, no flip and no colour jitter. The functions below
reproduce torchvision's PIL code path step by step, so released weights see the pixels they were trained on.
Inputs must already be 8-bit RGB, i.e. come from :func:`skingpt4.inputs.images.load_image`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

if TYPE_CHECKING:  # torch is imported where tensors are made: a model folder's metadata needs none of it
    import torch

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGE_SIZE",
    "PixelSpec",
    "eval_transform",
    "random_resized_crop_box",
    "to_pixel_batch",
    "train_transform",
]

IMAGE_SIZE = 224
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TRAIN_SCALE = (0.5, 1.0)
TRAIN_RATIO = (3 / 4, 4 / 3)

Rng = np.random.Generator | random.Random
Triple = tuple[float, float, float]


@dataclass(frozen=True)
class PixelSpec:
    """What a model folder says about its input pixels (`skingpt4.json`); the defaults are SkinGPT-4's."""

    size: int = IMAGE_SIZE
    mean: Triple = CLIP_MEAN
    std: Triple = CLIP_STD

    def eval(self, img: Image.Image) -> torch.Tensor:
        return eval_transform(img, self.size, self.mean, self.std)

    def train(self, img: Image.Image, rng: Rng) -> torch.Tensor:
        return train_transform(img, rng, self.size, mean=self.mean, std=self.std)


def eval_transform(
    img: Image.Image, size: int = IMAGE_SIZE, mean: Triple = CLIP_MEAN, std: Triple = CLIP_STD
) -> torch.Tensor:
    """Inference transform: bicubic squash to ``size`` x ``size``, scale to [0, 1], normalise. [3, size, size]."""
    _require_rgb(img)
    return _to_normalised_tensor(img.resize((size, size), Image.Resampling.BICUBIC), mean, std)


def train_transform(
    img: Image.Image,
    rng: Rng,
    size: int = IMAGE_SIZE,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
    mean: Triple = CLIP_MEAN,
    std: Triple = CLIP_STD,
) -> torch.Tensor:
    """Training transform: torchvision ``RandomResizedCrop`` driven by ``rng`` (not torch's global RNG), so runs
    are reproducible per sample. Crop then resize, as ``F.resized_crop`` does: ``resize(box=...)`` would let the
    bicubic kernel read pixels outside the crop."""
    _require_rgb(img)
    left, top, w, h = random_resized_crop_box(img.width, img.height, rng, scale, ratio)
    crop = img.crop((left, top, left + w, top + h))
    return _to_normalised_tensor(crop.resize((size, size), Image.Resampling.BICUBIC), mean, std)


def to_pixel_batch(images: Sequence[Image.Image], size: int = IMAGE_SIZE) -> torch.Tensor:
    """Stack ``eval_transform`` outputs into [B, 3, size, size]; an empty list gives a [0, 3, size, size] tensor."""
    import torch

    if len(images) == 0:
        return torch.empty((0, 3, size, size), dtype=torch.float32)
    return torch.stack([eval_transform(img, size) for img in images])


def random_resized_crop_box(
    width: int,
    height: int,
    rng: Rng,
    scale: tuple[float, float] = TRAIN_SCALE,
    ratio: tuple[float, float] = TRAIN_RATIO,
) -> tuple[int, int, int, int]:
    """torchvision ``RandomResizedCrop.get_params``, returned as (left, top, w, h).

    Ten tries of area ~ U(scale) x image area and aspect ~ exp(U(log ratio)); the first that fits wins at a
    uniform position. Otherwise a central crop clamped to the ratio range (which, for very elongated images,
    can cover far less than ``scale[0]`` of the area; this is torchvision's behaviour and is kept).
    """
    if not isinstance(rng, (random.Random, np.random.Generator)):
        raise TypeError(f"rng must be numpy.random.Generator or random.Random, got {type(rng).__name__}")
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"scale and ratio must be positive (min, max) pairs, got {scale} and {ratio}")
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = _randint_inclusive(rng, 0, height - h)
            left = _randint_inclusive(rng, 0, width - w)
            return left, top, w, h
    return _central_fallback(width, height, ratio)


def _central_fallback(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """torchvision's fallback: whole image if its ratio is in range, else the largest centred in-range crop."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def _randint_inclusive(rng: Rng, low: int, high: int) -> int:
    """``torch.randint(low, high + 1)`` for either RNG kind."""
    if isinstance(rng, random.Random):
        return rng.randint(low, high)
    return int(rng.integers(low, high + 1))


def _require_rgb(img: Image.Image) -> None:
    """ToTensor on other modes changes the channel count or value range; decoding belongs to images.load_image."""
    if img.mode != "RGB":
        raise ValueError(f"expected an 8-bit RGB image (use skingpt4.inputs.images.load_image), got mode {img.mode!r}")


def _to_normalised_tensor(img: Image.Image, mean: Triple, std: Triple) -> torch.Tensor:
    """torchvision ``ToTensor`` then ``Normalize``: the same float32 operations in the same order (each one IEEE
    rounded, so the values are torchvision's to the bit), computed with NumPy: on a server the transform runs on
    each request's own thread, where a torch op would start a pool of OpenMP threads of its own (tested against
    torch's own operations in tests/test_pixels.py)."""
    import torch

    chw = np.array(img, dtype=np.uint8).transpose(2, 0, 1).astype(np.float32)  # [3, H, W]
    chw /= np.float32(255)
    chw -= np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    chw /= np.asarray(std, dtype=np.float32).reshape(3, 1, 1)
    return torch.from_numpy(np.ascontiguousarray(chw))
