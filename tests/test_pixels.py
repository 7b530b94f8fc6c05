"""Tests for skingpt4.inputs.pixels: the LAVIS/torchvision eval and train transforms rebuilt on PIL + torch."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from skingpt4.inputs.pixels import (
    CLIP_MEAN,
    CLIP_STD,
    IMAGE_SIZE,
    PixelSpec,
    eval_transform,
    random_resized_crop_box,
    to_pixel_batch,
    train_transform,
)

MEAN = np.array(CLIP_MEAN, dtype=np.float32)
STD = np.array(CLIP_STD, dtype=np.float32)


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def reference_tensor(img: Image.Image) -> np.ndarray:
    """ToTensor + Normalize written independently in numpy, float32 like torchvision."""
    array = np.asarray(img, dtype=np.uint8).astype(np.float32) / np.float32(255)
    return ((array - MEAN) / STD).transpose(2, 0, 1)


class ScriptedRandom(random.Random):
    """A random.Random whose uniform/randint return scripted values and record the call order."""

    def __init__(self, uniforms=(), ints=()):
        super().__init__(0)
        self.uniforms, self.ints, self.calls = list(uniforms), list(ints), []

    def uniform(self, a, b):
        fraction = self.uniforms.pop(0)
        self.calls.append(("uniform", a, b))
        return a + (b - a) * fraction

    def randint(self, a, b):
        self.calls.append(("randint", a, b))
        return self.ints.pop(0)


def test_constants_are_openai_clip():
    assert IMAGE_SIZE == 224
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)


# --- eval --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("colour", [(0, 0, 0), (255, 255, 255), (200, 10, 30), (1, 128, 254)])
@pytest.mark.parametrize("size", [(300, 170), (224, 224), (50, 400)])
def test_uniform_colour_gives_exact_normalised_values(colour, size):
    out = eval_transform(Image.new("RGB", size, colour))
    assert out.shape == (3, 224, 224) and out.dtype == torch.float32
    expected = (np.array(colour) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    for channel in range(3):
        assert torch.allclose(out[channel], torch.full((224, 224), expected[channel], dtype=torch.float32), atol=1e-6)


def test_black_and_white_extremes():
    black = eval_transform(Image.new("RGB", (10, 10), (0, 0, 0)))
    white = eval_transform(Image.new("RGB", (10, 10), (255, 255, 255)))
    assert black[0, 0, 0].item() == pytest.approx(-0.48145466 / 0.26862954, abs=1e-6)  # -1.7923
    assert white[2, 0, 0].item() == pytest.approx((1 - 0.40821073) / 0.27577711, abs=1e-6)  # 2.1459


def test_eval_matches_independent_bicubic_squash():
    img = noise(317, 141)
    expected = reference_tensor(img.resize((224, 224), Image.Resampling.BICUBIC))
    out = eval_transform(img)
    assert out.shape == (3, 224, 224)
    assert out.is_contiguous()
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6, rtol=0)


def test_eval_values_are_torchvisions_to_the_bit():
    """ToTensor then Normalize as torchvision computes them, with torch's own float32 operations: the transform's
    NumPy arithmetic (which keeps torch off each request's thread) gives the same bits."""
    for seed in range(5):
        img = noise(200 + 37 * seed, 120 + 11 * seed, seed=seed).resize((224, 224), Image.Resampling.BICUBIC)
        tensor = torch.from_numpy(np.array(img)).permute(2, 0, 1).contiguous().to(torch.float32).div(255)
        expected = tensor.sub_(torch.tensor(CLIP_MEAN).view(3, 1, 1)).div_(torch.tensor(CLIP_STD).view(3, 1, 1))
        assert torch.equal(eval_transform(img), expected)


def test_eval_squashes_instead_of_cropping():
    img = Image.new("RGB", (400, 100), (255, 0, 0))
    img.paste((0, 0, 255), (300, 0, 400, 100))  # the rightmost quarter is blue
    out = eval_transform(img)
    red_r, blue_r = (255 / 255 - CLIP_MEAN[0]) / CLIP_STD[0], (0 - CLIP_MEAN[0]) / CLIP_STD[0]
    assert out[0, :, 0].mean().item() == pytest.approx(red_r, abs=1e-5)  # left edge still red
    assert out[0, :, -1].mean().item() == pytest.approx(blue_r, abs=1e-5)  # right edge still blue: not cropped
    assert out[0, 112, 150].item() == pytest.approx(red_r, abs=1e-5)  # 150/224 < 3/4 of the width
    assert out[0, 112, 190].item() == pytest.approx(blue_r, abs=1e-5)  # 190/224 > 3/4 of the width


def test_eval_custom_size():
    img = noise(64, 40)
    out = eval_transform(img, size=32)
    assert out.shape == (3, 32, 32)
    np.testing.assert_allclose(
        out.numpy(), reference_tensor(img.resize((32, 32), Image.Resampling.BICUBIC)), atol=1e-6
    )


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "CMYK", "P"])
def test_non_rgb_input_is_refused(mode):
    with pytest.raises(ValueError, match="load_image"):
        eval_transform(Image.new(mode, (10, 10)))
    with pytest.raises(ValueError, match="load_image"):
        train_transform(Image.new(mode, (10, 10)), random.Random(0))


def test_eval_does_not_modify_input():
    img = noise(50, 30)
    before = img.tobytes()
    eval_transform(img)
    assert img.tobytes() == before and img.size == (50, 30)


def test_to_pixel_batch_stacks_eval_transform():
    images = [noise(300, 200, seed=1), noise(64, 64, seed=2), Image.new("RGB", (30, 90), (9, 99, 199))]
    batch = to_pixel_batch(images)
    assert batch.shape == (3, 3, 224, 224) and batch.dtype == torch.float32
    for index, img in enumerate(images):
        assert torch.equal(batch[index], eval_transform(img))
    assert to_pixel_batch([]).shape == (0, 3, 224, 224)


# --- train: crop box ---------------------------------------------------------------------------------------


def test_crop_box_statistics_over_500_draws():
    width, height = 640, 480
    rng = np.random.default_rng(1234)
    boxes = [random_resized_crop_box(width, height, rng) for _ in range(500)]
    fractions = np.array([w * h / (width * height) for _, _, w, h in boxes])
    aspects = np.array([w / h for _, _, w, h in boxes])
    assert fractions.min() >= 0.5 - 0.003  # rounding of w and h only
    assert fractions.max() <= 1.0
    assert fractions.min() < 0.52 and fractions.max() > 0.95  # the whole range is used
    assert 0.6 < fractions.mean() < 0.72  # accepted draws skew small: big crops with off ratios do not fit
    assert aspects.min() >= 0.75 - 0.01 and aspects.max() <= 4 / 3 + 0.01
    for left, top, w, h in boxes:
        assert 0 <= left <= width - w and 0 <= top <= height - h
    assert len({left for left, _, _, _ in boxes}) > 50 and len({top for _, top, _, _ in boxes}) > 50


def test_crop_box_with_python_random_has_same_properties():
    rng = random.Random(7)
    for _ in range(500):
        left, top, w, h = random_resized_crop_box(300, 300, rng)
        assert 0.5 - 0.01 <= w * h / 90_000 <= 1.0
        assert 0 <= left <= 300 - w and 0 <= top <= 300 - h


def test_crop_box_follows_torchvision_get_params_step_by_step():
    # first try: area x1.0 at ratio 4/3 on a square does not fit; second: area x0.75, ratio 1 fits.
    rng = ScriptedRandom(uniforms=[1.0, 1.0, 0.5, 0.5], ints=[0, 17])
    assert random_resized_crop_box(100, 100, rng) == (17, 0, 87, 87)  # w = h = round(sqrt(7500)) = 87
    log = (math.log(3 / 4), math.log(4 / 3))
    assert rng.calls == [
        ("uniform", 0.5, 1.0),
        ("uniform", *log),
        ("uniform", 0.5, 1.0),
        ("uniform", *log),
        ("randint", 0, 13),  # top first (torchvision's i), inclusive upper bound height - h
        ("randint", 0, 13),  # then left (j)
    ]


def test_crop_box_fallback_for_extreme_aspect_ratios():
    rng = np.random.default_rng(0)
    # no crop of at least half the area with ratio in [3/4, 4/3] fits: centred crop clamped to ratio 4/3 or 3/4
    assert random_resized_crop_box(1000, 10, rng) == (493, 0, 13, 10)
    assert random_resized_crop_box(10, 1000, rng) == (0, 493, 10, 13)


def test_crop_box_fallback_whole_image_when_ratio_in_range():
    rng = ScriptedRandom(uniforms=[1.0] * 20)  # always area x1.0 at ratio 4/3: never fits a square
    assert random_resized_crop_box(200, 200, rng) == (0, 0, 200, 200)
    assert len(rng.calls) == 20  # exactly ten attempts


def test_crop_box_argument_checks():
    with pytest.raises(ValueError):
        random_resized_crop_box(100, 100, random.Random(0), scale=(1.0, 0.5))
    with pytest.raises(ValueError):
        random_resized_crop_box(100, 100, random.Random(0), ratio=(0.0, 1.0))
    with pytest.raises(TypeError):
        random_resized_crop_box(100, 100, np.random.RandomState(0))


# --- train: full transform ---------------------------------------------------------------------------------


@pytest.mark.parametrize("make_rng", [np.random.default_rng, random.Random])
def test_train_transform_deterministic_per_seed(make_rng):
    img = noise(320, 240)
    first = train_transform(img, make_rng(42))
    again = train_transform(img, make_rng(42))
    other = train_transform(img, make_rng(43))
    assert first.shape == (3, 224, 224) and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_train_transform_is_crop_then_bicubic_resize_then_normalise():
    img = noise(320, 240, seed=5)
    left, top, w, h = random_resized_crop_box(320, 240, np.random.default_rng(9))
    crop = img.crop((left, top, left + w, top + h)).resize((224, 224), Image.Resampling.BICUBIC)
    out = train_transform(img, np.random.default_rng(9))
    np.testing.assert_allclose(out.numpy(), reference_tensor(crop), atol=1e-6, rtol=0)
    # resize(box=...) reads pixels outside the crop at the border, so it is measurably different
    boxed = img.resize((224, 224), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    if (left, top, w, h) != (0, 0, 320, 240):
        assert not np.allclose(out.numpy(), reference_tensor(boxed), atol=1e-6)


def test_train_transform_uniform_colour_and_small_input():
    out = train_transform(Image.new("RGB", (8, 8), (10, 20, 30)), random.Random(0), size=16)
    expected = (np.array((10, 20, 30)) / 255.0 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    assert out.shape == (3, 16, 16)
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(expected[:, None, None], (3, 16, 16)), atol=1e-6)


def test_model_folder_normalisation_reaches_the_transform(tmp_path):
    """skingpt4.json's image_mean/image_std are what the transforms use, not fixed CLIP values."""
    from skingpt4.folder.meta import META_FILE, ModelMeta

    (tmp_path / META_FILE).write_text('{"image_size": 8, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.25, 0.5, 1]}')
    spec = ModelMeta.load(tmp_path).pixels
    out = spec.eval(Image.new("RGB", (3, 5), (255, 0, 255)))  # channel values 1, 0, 1 after ToTensor
    assert out.shape == (3, 8, 8)
    assert torch.allclose(out[:, 0, 0], torch.tensor([(1 - 0.5) / 0.25, (0 - 0.5) / 0.5, (1 - 0.5) / 1]))
    assert ModelMeta().pixels == PixelSpec()  # the defaults are SkinGPT-4's CLIP values, in one place
