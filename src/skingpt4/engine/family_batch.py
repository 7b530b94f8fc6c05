"""The rows of a family engine's batch (`family.py`): requests waiting to be decoded together, their processor
inputs as one batch, their streams and cancel flags inside transformers' `generate`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from skingpt4.backends.padding import pad_left
from skingpt4.engine.settings import GenerationSettings


@dataclass(eq=False)
class Job:
    """One `generate` call's rows (processor inputs), waiting to be decoded; `result` their new ids."""

    inputs: list
    settings: GenerationSettings
    streamer: object | None = None  # for a lone row
    cancel: threading.Event | None = None
    result: list[list[int]] | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def joins(self, other: Job) -> bool:
        """Whether both may be decoded in one `generate`: the same settings, and no seeded sampling (its draws would
        then depend on what it was batched with)."""
        seeded = self.settings.do_sample and self.settings.seed is not None
        return self.settings == other.settings and not seeded


def sequence_keys(inputs) -> list[str]:
    """The processor outputs that run along the prompt (ids, mask, token types): padded, not concatenated."""
    length = inputs["input_ids"].shape[1]
    return [k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, length)]


def collate(inputs: list, pad_id: int):
    """Prompts' processor inputs as one batch: sequences left-padded (pad id, mask and token types 0), the photos'
    tensors (pixels, grids) concatenated in order, as the family's processor makes a batch."""
    from transformers import BatchFeature

    if len(inputs) == 1:
        return inputs[0]
    length, along = max(one["input_ids"].shape[1] for one in inputs), sequence_keys(inputs[0])
    batch = {}
    for key in dict.fromkeys(k for one in inputs for k in one.keys()):
        parts = [one[key] for one in inputs if key in one]
        if key in along:
            fill = pad_id if key == "input_ids" else 0
            parts = [pad_left(p, length - p.shape[1], fill) for p in parts]
        batch[key] = torch.cat(parts)
    return BatchFeature(batch)


def extended(inputs, target: list[int]):
    """The processor inputs with `target` appended to the prompt (mask 1, token type 0: text)."""
    from transformers import BatchFeature

    out = dict(inputs)
    for key in sequence_keys(inputs):
        tail = (
            torch.tensor([target])
            if key == "input_ids"
            else torch.full((1, len(target)), int(key == "attention_mask"))
        )
        out[key] = torch.cat([inputs[key], tail.to(inputs[key].dtype)], dim=1)
    return BatchFeature(out)


class RowStreams:
    """transformers' streamer protocol in front of ours, for a batch: `generate` first puts the prompt ids, then each
    step's ids (B,), which go to each row's own streamer (None: a row nobody streams)."""

    def __init__(self, streamers: list):
        self.streamers, self.prompt_seen = streamers, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            for streamer, token in zip(self.streamers, value.reshape(-1)):
                if streamer is not None:
                    streamer.put(token.reshape(1))
        self.prompt_seen = True

    def end(self) -> None:
        for streamer in self.streamers:
            if streamer is not None:
                streamer.end()


class RowsCancelled:
    """Stopping criterion: a row ends once its request's cancel flag is set (the other rows go on)."""

    def __init__(self, jobs: list[Job]):
        self.flags = [job.cancel for job in jobs for _ in job.inputs]

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        return torch.tensor([f is not None and f.is_set() for f in self.flags], device=input_ids.device)
