"""The language model on transformers: the engine's `LanguageModel` (`engine/protocol.py`) for any device and
precision PyTorch runs (and bitsandbytes' 8/4-bit on CUDA).

The engine hands it input embeddings (token embeddings with the image features in their slots); a cache is a
transformers `DynamicCache` of left-padded rows (`padding.py`), which this joins, selects and splits. Beam search
runs on transformers' own `generate`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from skingpt4.backends.padding import pad_left, padded
from skingpt4.errors import ModelLoadError, first_line
from skingpt4.folder.family import family_of
from skingpt4.folder.load import LoadedModel, ready, resolve_device, resolve_dtype, resolve_model_path


def _cache_argument() -> str:
    """`generate`'s name for a key/value cache to continue: `cache` from transformers 5.24 (the old name,
    `past_key_values`, still works there but warns), `past_key_values` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


class TransformersLLM:
    """The transformers language model (`Blip2ForConditionalGeneration.language_model`)."""

    capacity = None  # caches grow as needed, as far as the device's memory goes (then out of memory: 503)

    def __init__(self, language_model: torch.nn.Module):
        self.model = language_model

    def new_cache(self):
        from transformers import DynamicCache  # an empty key/value cache for the language model

        return DynamicCache(config=self.model.config)

    def prefill(self, embeds: list[torch.Tensor], cache, reuse: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Run prompts (their embeddings) into `cache`, after its first `reuse` positions (only a lone prompt
        continues a cache): returns the padding mask (B, T) and the logits (B, V) for the first new tokens."""
        batch, mask = padded(embeds)
        out = self.model(
            inputs_embeds=batch[:, reuse:],
            attention_mask=mask,
            position_ids=(mask.cumsum(-1) - 1).clamp(min=0)[:, reuse:],
            use_cache=True,
            logits_to_keep=1,
            **{CACHE_ARGUMENT: cache},
        )
        return mask, out.logits[:, -1]

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step for a left-padded batch: each row's pending token (B,) at its own position (B,),
        over a cache whose padding `mask` (B, L+1) hides; returns the next logits (B, V)."""
        out = self.model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions[:, None],
            use_cache=True,
            **{CACHE_ARGUMENT: cache},
        )
        return out.logits[:, -1]

    @staticmethod
    def join(cache, old_pad: int, other, new_pad: int) -> None:
        """Append `other`'s rows to `cache`'s, each side padded on the left by its count."""
        for mine, theirs in zip(cache.layers, other.layers):
            mine.keys = torch.cat([pad_left(mine.keys, old_pad), pad_left(theirs.keys, new_pad)])
            mine.values = torch.cat([pad_left(mine.values, old_pad), pad_left(theirs.values, new_pad)])

    @staticmethod
    def keep(cache, rows: list[int], start: int) -> None:
        """Keep these rows, from column `start` on."""
        index = torch.tensor(rows, device=cache.layers[0].keys.device)
        for layer in cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]

    def row(self, cache, row: int, start: int):
        """One row's cache from column `start` on, as a cache of its own (a session keeps it for its next turn)."""
        out = self.new_cache()
        for i, layer in enumerate(cache.layers):
            out.update(layer.keys[row : row + 1, :, start:].clone(), layer.values[row : row + 1, :, start:].clone(), i)
        return out

    def park(self, cache) -> None:
        """A session keeps `cache` between turns; it stays where it is (the engine bounds how many are kept)."""

    def beam_search(self, embeds: list[torch.Tensor], config, logits_processor, stopping_criteria) -> list:
        """Prompts (their embeddings), left-padded into one batch, through transformers' `generate` with this
        `GenerationConfig`: each prompt's new token ids (shorter ones padded after their end)."""
        batch, mask = padded(embeds)
        out = self.model.generate(
            inputs_embeds=batch,
            attention_mask=mask,
            generation_config=config,
            logits_processor=logits_processor,
            stopping_criteria=stopping_criteria,
        )
        return out.tolist()

    def logits_at(self, embeds: list[torch.Tensor], positions: list[list[int]]) -> torch.Tensor:
        """Whole sequences (their embeddings, right-padded into one batch) read at once: the logits (N, V), in
        float32, after each sequence's listed positions, in order. Only those positions go through the LM head
        (all of them would be B x T x V)."""
        width = max(len(e) for e in embeds)
        batch = torch.stack([torch.cat([e, e.new_zeros(width - len(e), e.shape[-1])]) for e in embeds])
        mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in embeds], device=batch.device)
        hidden = self.model.get_decoder()(inputs_embeds=batch, attention_mask=mask).last_hidden_state
        rows = torch.tensor([n for n, at in enumerate(positions) for _ in at], device=batch.device)
        columns = torch.tensor([k for at in positions for k in at], device=batch.device)
        return self.model.get_output_embeddings()(hidden[rows, columns]).float()


# -- loading ---------------------------------------------------------------------------------------------------


def load_model(
    model: str | Path,
    device: str | None = None,
    dtype: str | None = None,
    device_map: str | dict | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
) -> LoadedModel:
    """Load a SkinGPT-4 folder (or `tiny`) for inference on transformers: eval mode, no gradients, original eps
    restored. (`backends/llamacpp.py` loads one with its language model on llama.cpp instead.)"""
    from transformers import Blip2ForConditionalGeneration

    path = resolve_model_path(model)
    if (family := family_of(path)) is not None:  # the commands that answer take those (`engine/family.py`)
        raise ModelLoadError(f"{path} is a {family.name} folder; this needs a SkinGPT-4 folder (`skingpt4 convert`)")
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
    return ready(path, net, TransformersLLM(net.language_model))


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
