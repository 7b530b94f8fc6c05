"""What a folder of another model family is, and loading one: any transformers folder that
`AutoModelForImageTextToText` and `AutoProcessor` load and whose processor has a chat template (MedGemma / Gemma 3,
SkinGPT-R1 / Qwen2.5-VL, llava-hf LLaVA-1.5, ...), beside SkinGPT-4's own folders (`meta.py`).

No model code and no prompt format is written here: the model is the family's own transformers class, the prompt is
its processor's chat template. What this adds per family is only what its model card asks of a caller (`Family`):
a system prompt, how many photos it reads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from skingpt4.errors import ModelLoadError, first_line
from skingpt4.folder.meta import ModelMeta

SKINGPT4_TYPE = "blip-2"  # SkinGPT-4's own folders (`meta.py`)
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")
UNTRAINED_KEY = "skingpt4_untrained"  # in config.json: a random folder (`tiny_families.py`), whatever its name


@dataclass(frozen=True)
class Family:
    """What a family's model card (or its authors' own inference code) asks of the caller."""

    name: str  # config.json's model_type
    system: str = ""  # the system prompt it asks for ("" for none)
    system_in_question: bool = False  # written before the first question, not as a system turn
    max_images: int | None = None  # photos per consultation it was trained to read (None: no limit of its own)
    pixels: tuple[int, int] | None = None  # (min, max) pixels per photo its processor is loaded with


FAMILIES = {
    # MedGemma's card: a system turn naming the expert ("You are an expert radiologist." for X-rays).
    "gemma3": Family("gemma3", system="You are an expert dermatologist."),
    # SkinGPT-R1's inference code: its system prompt before the question, photos of 256 to 1280 28 x 28 patches
    # (Qwen2.5-VL's own processor allows 16384, over 12 megapixels).
    "qwen2_5_vl": Family(
        "qwen2_5_vl",
        system="You are a professional AI dermatology assistant.",
        system_in_question=True,
        pixels=(256 * 28 * 28, 1280 * 28 * 28),
    ),
    "llava": Family("llava", max_images=1),  # LLaVA-1.5 was trained on one image per conversation
}
TINY_FAMILIES = tuple(f"tiny-{name}" for name in FAMILIES)  # `--model tiny-gemma3`...: `tiny_families.py`


def read_config(folder: Path) -> dict:
    """The folder's config.json as a dict (no transformers import)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        config = None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{folder / 'config.json'} is not a readable model config")
    return config


def model_type(folder: Path) -> str:
    return read_config(folder).get("model_type", "")


def text_config(folder: Path) -> dict:
    """The language model's config; folders that keep it at the top level (Qwen2.5-VL's) too."""
    config = read_config(folder)
    return config.get("text_config") or config


def head_dim(text: dict) -> int:
    return text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]


def family_of(folder: Path | None) -> Family | None:
    """The family of a folder that is not SkinGPT-4's (None for SkinGPT-4 folders and the tiny model)."""
    if folder is None or (kind := model_type(folder)) == SKINGPT4_TYPE:
        return None
    return FAMILIES.get(kind) or Family(kind)


def family_info(folder: Path, family: Family):
    """The `load.ModelInfo` every surface reads (the random folders of `tiny_families.py` are marked untrained)."""
    from skingpt4.folder.load import ModelInfo, model_id

    meta = ModelMeta(template=family.name, name=folder.name, description=f"{family.name} image-text-to-text folder")
    meta.untrained = read_config(folder).get(UNTRAINED_KEY) is True
    return ModelInfo(model_id(folder, meta), meta, folder)


@dataclass
class LoadedFamily:
    model: object  # the family's `...ForConditionalGeneration`
    processor: object
    family: Family
    info: object  # `load.ModelInfo`


def load_family(folder: Path, family: Family, device: str, dtype, device_map=None) -> LoadedFamily:
    """The folder's model (`AutoModelForImageTextToText`) in `dtype` on `device` (or spread by `device_map`) and its
    processor, with left padding (batched rows end where their answers begin)."""
    from transformers import AutoModelForImageTextToText

    processor = load_processor(folder, pixel_options(folder, family))
    try:
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, device_map=device_map)
    except Exception as exc:  # transformers raises many kinds here; the user needs one line
        raise ModelLoadError(f"cannot load {folder} as an image-text-to-text model ({first_line(exc)})") from None
    if device_map is None:
        model.to(device)
    return LoadedFamily(model.eval().requires_grad_(False), processor, family, family_info(folder, family))


def load_processor(folder: Path, options: dict | None = None):
    """`AutoProcessor` (with `options` for its image processor), or where it needs what is not installed
    (Qwen2.5-VL's video processor wants torchvision) the folder's processor class over its tokenizer and image
    processor alone."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    options = options or {}
    try:
        processor = AutoProcessor.from_pretrained(folder, **options)
    except Exception as auto_error:
        try:
            images = AutoImageProcessor.from_pretrained(folder, **options)
            tokenizer = AutoTokenizer.from_pretrained(folder)
            processor = image_only(_processor_class(folder), images, tokenizer, _chat_template(folder))
        except Exception:
            raise ModelLoadError(f"cannot load the processor in {folder} ({first_line(auto_error)})") from None
    if not getattr(processor, "chat_template", None):
        raise ModelLoadError(f"{folder}: its processor has no chat template (skingpt4 needs the model's own format)")
    processor.tokenizer.padding_side = "left"
    if processor.tokenizer.pad_token is None:
        processor.tokenizer.pad_token = processor.tokenizer.eos_token
    return processor


def pixel_options(folder: Path, family: Family) -> dict:
    """The family's photo size bounds over the folder's own: at most its largest, at least its smallest."""
    path = folder / "preprocessor_config.json"
    if family.pixels is None or not path.is_file():
        return {}
    config = json.loads(path.read_text(encoding="utf-8"))
    size = config.get("size") or {}
    low, high = (
        config.get("min_pixels") or size.get("shortest_edge"),
        config.get("max_pixels") or size.get("longest_edge"),
    )
    if not (low and high):
        return {}
    high = min(high, family.pixels[1])
    return {"min_pixels": min(max(low, family.pixels[0]), high), "max_pixels": high}


def image_only(cls, image_processor, tokenizer, chat_template: str | None):
    """A `cls` processor for photos and text only: its other parts (a video processor) left out."""

    class ImageOnly(cls):
        def check_argument_for_proper_class(self, name, value):
            if value is not None:
                return super().check_argument_for_proper_class(name, value)

    parts = dict.fromkeys(cls.get_attributes()) | dict(image_processor=image_processor, tokenizer=tokenizer)
    return ImageOnly(**parts, chat_template=chat_template)


def save_image_only(processor, folder: Path) -> None:
    """Save what `image_only` made: its tokenizer, image processor and chat template, as a real folder has them."""
    processor.tokenizer.save_pretrained(folder)
    processor.image_processor.save_pretrained(folder)
    (folder / TEMPLATE_FILES[0]).write_text(processor.chat_template, encoding="utf-8")


def _processor_class(folder: Path):
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    return getattr(transformers, PROCESSOR_MAPPING_NAMES[model_type(folder)])


def _chat_template(folder: Path) -> str | None:
    for name in TEMPLATE_FILES:
        if (path := folder / name).is_file():
            text = path.read_text(encoding="utf-8")
            return json.loads(text)["chat_template"] if name.endswith(".json") else text
    return None
