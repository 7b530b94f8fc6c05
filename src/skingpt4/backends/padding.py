"""Left padding, in one place: rows of different lengths in one batch, padded on the left, with the mask (B, T)
that hides the padding. Prompts are padded so that every row's newest position is the last column; a batch's
key/value cache grows on the right, one column per token step."""

from __future__ import annotations

import torch


def padded(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts' embeddings (T_i, H) left-padded into one batch (B, T, H), with the padding mask (B, T)."""
    width = max(len(e) for e in embeds)
    batch = torch.stack([pad_left(e.T, width - len(e)).T for e in embeds])
    return batch, padding_mask([len(e) for e in embeds], batch.device)


def padding_mask(lengths: list[int], device=None) -> torch.Tensor:
    """The mask (B, T) of rows of these lengths, left-padded to the longest."""
    width = max(lengths)
    return torch.tensor([[0] * (width - n) + [1] * n for n in lengths], device=device)


def pad_left(x: torch.Tensor, count: int, value: int = 0) -> torch.Tensor:
    """`value` (zeros) before the sequence dimension's start (dim -2 of a cache tensor (B, heads, T, D), dim -1 of
    a mask or of ids (B, T) or of a transposed prompt (H, T))."""
    if count == 0:
        return x
    dim = -1 if x.dim() == 2 else -2
    shape = list(x.shape)
    shape[dim] = count
    return torch.cat([x.new_full(shape, value), x], dim=dim)
