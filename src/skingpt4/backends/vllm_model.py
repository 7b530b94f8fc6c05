"""SkinGPT-4 on vLLM: vLLM's BLIP-2 model with the five things SkinGPT-4 needs (imported by vLLM only, through
the plugin in `vllm_plugin.py`; it needs vLLM, whose wheel needs CUDA).

1. Photos where the prompt has them. vLLM's BLIP-2 inserts its 32 slots before the first token, whatever the prompt
   holds; SkinGPT-4 reads each photo's 32 slots inside `<Img>...</Img>`, mid-prompt. Here every `<image>` id is
   replaced in place by 32 (vLLM's LLaVA does the same), in prompts given as text (the folder's chat template) or
   as token ids (`serve --engine vllm`, `processing.one_slot_per_image`).
2. Several photos per prompt (vLLM's BLIP-2 allows one); `--limit-mm-per-prompt` bounds them.
3. Our engine's never-generate mask (`folder.load.never_generated`: the `<image>` id, the folder's
   `suppress_tokens`, and the LM head's rows past the tokenizer's vocabulary), logit -inf: vLLM reads only sampling
   fields from generation_config.json, and would otherwise answer with rows that have no text.
4. The photos' pixels by the original's transform (`inputs/pixels.py`), whatever image backend transformers picks.
5. The original's `ln_vision` eps (1e-5; the ViT blocks use config.json's 1e-6, which vLLM would use for both),
   from the folder's `skingpt4.json`.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import BatchFeature
from vllm.model_executor.models.blip2 import (
    Blip2DummyInputsBuilder,
    Blip2ForConditionalGeneration,
    Blip2MultiModalProcessor,
    Blip2ProcessingInfo,
)
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.processing import PromptReplacement

from skingpt4.folder.load import never_generated
from skingpt4.folder.meta import IMAGE_TOKEN, ModelMeta


def image_slots(image_token_id: int, num_query_tokens: int) -> list[PromptReplacement]:
    """Each `<image>` id, in place, becomes its photo's `num_query_tokens` slots."""
    return [
        PromptReplacement(modality="image", target=[image_token_id], replacement=[image_token_id] * num_query_tokens)
    ]


class SkinGPT4ProcessingInfo(Blip2ProcessingInfo):
    def get_supported_mm_limits(self):
        return {"image": None}  # no limit of the model's own; the server's --limit-mm-per-prompt applies


class SkinGPT4DummyInputsBuilder(Blip2DummyInputsBuilder):
    def get_dummy_text(self, mm_counts) -> str:
        return IMAGE_TOKEN * mm_counts.get("image", 0)  # vLLM's memory profiling needs a target per photo


class SkinGPT4MultiModalProcessor(Blip2MultiModalProcessor):
    def _get_prompt_updates(self, mm_items, hf_processor_mm_kwargs, out_mm_kwargs):
        config = self.info.get_hf_config()
        return image_slots(config.image_token_index, config.num_query_tokens)

    @cached_property
    def pixel_spec(self):
        return ModelMeta.load(Path(self.info.ctx.model_config.model)).pixels  # read once, not per request

    def _call_hf_processor(self, hf_data, hf_kwargs):
        """The photos' pixels by our eval transform (`inputs/pixels.py`, the original's), not the folder's HF
        processor: with torchvision installed, as vLLM installs it, transformers picks its torchvision backend, whose
        resize differs from the original's by up to 0.015 after normalisation (seen with transformers 5.20)."""
        pixels = [self.pixel_spec.eval(_pil(image)) for image in hf_data.get("images", [])]
        return BatchFeature({"pixel_values": torch.stack(pixels)} if pixels else {})


@MULTIMODAL_REGISTRY.register_processor(
    SkinGPT4MultiModalProcessor, info=SkinGPT4ProcessingInfo, dummy_inputs=SkinGPT4DummyInputsBuilder
)
class SkinGPT4ForConditionalGeneration(Blip2ForConditionalGeneration):
    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return IMAGE_TOKEN
        raise ValueError("Only image modality is supported")

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        meta = ModelMeta.load(Path(vllm_config.model_config.model))  # a hub name: the original's defaults
        if self.vision_model.post_layernorm is not None:
            self.vision_model.post_layernorm.eps = meta.post_layernorm_eps
        self.tokens, self.never_ids = _never_generated(vllm_config.model_config, self.config.image_token_index)
        self.never = None  # the mask, made on the first step for the logits' width and device

    def compute_logits(self, hidden_states):
        logits = super().compute_logits(hidden_states)
        if logits is not None:  # None on pipeline stages before the last
            if self.never is None or self.never.device != logits.device:
                self.never = never_generated(logits.shape[-1], self.tokens, self.never_ids).to(logits.device)
            logits.masked_fill_(self.never, float("-inf"))
        return logits


def _never_generated(model_config, image_token_id: int) -> tuple[int, list[int]]:
    """What our engine never generates for this model (`folder.load.never_generated`): the rows from its
    tokenizer's size on, and `<image>` with the folder's `suppress_tokens` (a folder or a hub name, as vLLM was
    given it)."""
    from transformers import AutoTokenizer, GenerationConfig

    tokens = len(AutoTokenizer.from_pretrained(model_config.tokenizer))
    try:
        suppressed = GenerationConfig.from_pretrained(model_config.model).suppress_tokens or []
    except OSError:  # no generation_config.json
        suppressed = []
    return tokens, [image_token_id, *suppressed]


def _pil(image) -> Image.Image:
    """A photo as vLLM may hand it over (a PIL image, or an H x W x 3 uint8 array) as an RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    return Image.fromarray(np.asarray(image, dtype=np.uint8)).convert("RGB")
