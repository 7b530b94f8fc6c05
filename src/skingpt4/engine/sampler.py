"""Token choice: generation settings -> the next token, in one place, for every decode path.

Our engine's scheduler chooses every row's token here, whichever back end computed the logits (transformers or
llama.cpp); beam search and a model folder's generation_config.json take the same settings as a transformers
`GenerationConfig`, and vLLM as its `SamplingParams` fields, each translated once below.

The choice is transformers' own for these settings: the never-generate mask (`decoding.Forbid`), the repetition
penalty over the answer so far (the original's penalty sees only the answer, never the prompt), then when
sampling temperature, top-k 50 and top-p, and a draw. A request with a seed draws from its own generator, so its
answer does not depend on what it was batched with.
"""

from __future__ import annotations

import torch

from skingpt4.engine.settings import GenerationSettings

TOP_K = 50  # transformers' default, which the original's sampling inherited (it sets no top_k)


class Sampler:
    """One answer's token choice, row by row."""

    def __init__(self, settings: GenerationSettings):
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        s = self.settings = settings
        self.steps = [RepetitionPenaltyLogitsProcessor(s.repetition_penalty)] if s.repetition_penalty != 1 else []
        if s.do_sample:  # in transformers' order, each only where it changes something
            self.steps += [TemperatureLogitsWarper(s.temperature)] if s.temperature != 1 else []
            self.steps += [TopKLogitsWarper(TOP_K)]
            self.steps += [TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []
        self.generator = None

    @property
    def plain(self) -> bool:
        """Greedy without a penalty: the argmax of the masked scores is this row's choice."""
        return not self.settings.do_sample and not self.steps

    def choose(self, scores: torch.Tensor, answer: list[int]) -> int:
        """The next token from this row's masked scores (1, V), given the answer's ids so far."""
        ids = torch.tensor([answer], dtype=torch.long, device=scores.device)
        for step in self.steps:
            scores = step(ids, scores)
        if not self.settings.do_sample:
            return int(scores.argmax(-1))
        if self.generator is None and self.settings.seed is not None:
            self.generator = torch.Generator(scores.device).manual_seed(self.settings.seed)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def choose(samplers: list[Sampler], answers: list[list[int]], logits: torch.Tensor, forbid) -> list[int]:
    """Each row's next token from the batch's logits (B, V): masked by `forbid`, then the row's own sampler."""
    scores = forbid(None, logits.to(torch.float32, copy=True))
    chosen = scores.argmax(-1).tolist()
    for i, (sampler, answer) in enumerate(zip(samplers, answers)):
        if not sampler.plain:
            chosen[i] = sampler.choose(scores[i : i + 1], answer)
    return chosen


def generation_config(settings: GenerationSettings, tokenizer, suppress_tokens: list[int] | None = None):
    """The settings as a transformers `GenerationConfig` (sampling knobs only when sampling): for beam search,
    which runs on transformers' `generate`, and for a model folder's generation_config.json (with the ids it must
    never generate), so that plain transformers users get the demo's defaults too."""
    from transformers import GenerationConfig

    options = dict(
        max_new_tokens=settings.max_new_tokens,
        do_sample=settings.do_sample,
        num_beams=settings.num_beams,
        repetition_penalty=settings.repetition_penalty,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if suppress_tokens:
        options["suppress_tokens"] = list(suppress_tokens)
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_k=TOP_K, top_p=settings.top_p)
    return GenerationConfig(**options)


def folder_generation_config(tokenizer, image_token_id: int):
    """generation_config.json for a model folder: the demo's defaults, and never the image placeholder."""
    return generation_config(GenerationSettings(), tokenizer, suppress_tokens=[image_token_id])


def vllm_options(settings: GenerationSettings, stops: list[str]) -> dict:
    """vLLM `SamplingParams` fields for these settings: the original's sampling (top-k 50, then top-p and
    temperature) or greedy (temperature 0), the answer budget, the stop strings and a seed.

    Refused, with the reason: beams (vLLM has none here) and a repetition penalty (vLLM's also counts the prompt;
    the original's counts the answer only)."""
    from skingpt4.errors import InputError

    if settings.num_beams > 1 or settings.repetition_penalty != 1.0:
        raise InputError(
            "num_beams and repetition_penalty need the embedded engine: vLLM has no beam search here, and "
            "its repetition penalty also counts the prompt (the original's counts the answer only)"
        )
    options = dict(max_tokens=settings.max_new_tokens, stop=[s for s in stops if s], seed=settings.seed)
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=TOP_K)
    else:
        options.update(temperature=0.0)
    return options
