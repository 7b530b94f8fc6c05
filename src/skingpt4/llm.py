"""The language model as the engine's decode loop uses it: prefill prompts into a cache, then one token step.

Two backends have these operations: `TorchLLM` (transformers, here) and `LlamaCppLLM` (llama.cpp, quantized, in
`quantized.py`). The engine computes the input embeddings (token embeddings with the image features in their
slots) itself, so the prompt ids, the image slots, token choice and stop handling are one code path; only the
arithmetic of the transformer layers differs. A cache holds rows, left-padded to one width for the padding mask the
scheduler keeps; the backend joins, selects and splits rows.
"""

from __future__ import annotations

import torch


def _cache_argument() -> str:
    """`generate`'s name for a key/value cache to continue: `cache` from transformers 5.24 (the old name,
    `past_key_values`, still works there but warns), `past_key_values` before."""
    import transformers
    from packaging.version import Version

    return "cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values"


CACHE_ARGUMENT = _cache_argument()


def padded(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts' embeddings (T_i, H) left-padded into one batch (B, T, H), with the padding mask (B, T)."""
    width = max(len(e) for e in embeds)
    batch = torch.stack([torch.cat([e.new_zeros(width - len(e), e.shape[-1]), e]) for e in embeds])
    return batch, padding_mask([len(e) for e in embeds], batch.device)


def padding_mask(lengths: list[int], device=None) -> torch.Tensor:
    """The mask (B, T) of rows of these lengths, left-padded to the longest."""
    width = max(lengths)
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)


class TorchLLM:
    """The transformers language model; its cache is a `DynamicCache` of left-padded rows."""

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


def pad_left(x: torch.Tensor, count: int) -> torch.Tensor:
    """Zeros before the sequence dimension's start (dim -2 of a cache tensor, dim -1 of a mask)."""
    if count == 0:
        return x
    dim = -1 if x.dim() == 2 else -2
    shape = list(x.shape)
    shape[dim] = count
    return torch.cat([x.new_zeros(shape), x], dim=dim)
