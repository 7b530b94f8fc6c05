"""Decoding options, with the released demo's defaults in one place.

`GenerationSettings` is what every surface passes to the chat engine; `folder_generation_config` writes the same
defaults into a model folder's generation_config.json, so plain transformers users get them too.
"""

from __future__ import annotations

from dataclasses import dataclass

from skingpt4.errors import InputError

TOP_K = 50  # transformers' default, which the original's sampling inherited (it sets no top_k)
MAX_BATCH = 8  # answers decoded together by default (`--max-batch`, scheduler.py); bench/bench_concurrency.py


@dataclass
class GenerationSettings:
    """Decoding options; the defaults are the released demo's (sampling, top_p 0.9, 300 new tokens)."""

    max_new_tokens: int = 300
    do_sample: bool = True
    temperature: float = 1.0
    top_p: float = 0.9
    num_beams: int = 1
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_context: int = 2000  # the original `max_length`: prompt and answer together
    stop: tuple[str, ...] = ()  # extra stop strings (the template's own stop string always applies)

    def __post_init__(self):
        if self.temperature == 0:  # as in OpenAI's API and most tools: no randomness at all
            self.do_sample, self.temperature = False, 1.0
        checks = [
            (1 <= self.max_new_tokens < self.max_context, f"max_new_tokens must be 1..{self.max_context - 1}"),
            (0.0 <= self.temperature <= 5.0, "temperature must be in [0, 5] (0: greedy)"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (1 <= self.num_beams <= 10, "num_beams must be 1..10"),
            (0.0 < self.repetition_penalty <= 10.0, "repetition_penalty must be in (0, 10]"),
            (len(self.stop) <= 4 and all(0 < len(s) <= 64 for s in self.stop), "at most 4 stop strings of 1-64 chars"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)

    @classmethod
    def greedy(cls, **overrides) -> GenerationSettings:
        return cls(do_sample=False, **overrides)

    def to_config(self, tokenizer, suppress_tokens: list[int] | None = None):
        """These settings as a transformers `GenerationConfig` (sampling knobs only when sampling).

        The chat engine passes no `suppress_tokens` and no stop strings: it applies both itself, at O(1) per token
        (`decoding.py`); a model folder's generation_config.json carries the suppressed ids for plain transformers.
        """
        from transformers import GenerationConfig

        options = dict(
            max_new_tokens=self.max_new_tokens,
            do_sample=self.do_sample,
            num_beams=self.num_beams,
            repetition_penalty=self.repetition_penalty,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        if suppress_tokens:
            options["suppress_tokens"] = list(suppress_tokens)
        if self.do_sample:
            options.update(temperature=self.temperature, top_k=TOP_K, top_p=self.top_p)
        return GenerationConfig(**options)


def setting_rows(settings: dict, prefix: str = "") -> list[list[str]]:
    """Named settings as table rows: nested settings one row each ("settings: temperature"), lists joined."""
    rows = []
    for key, value in settings.items():
        name = f"{prefix}{key}".replace("_", " ")
        if isinstance(value, dict):
            rows += setting_rows(value, f"{name}: ")
        elif isinstance(value, (list, tuple)):
            rows.append([name, "; ".join(map(str, value)) if value else "none"])
        else:
            rows.append([name, "none" if value is None else str(value)])
    return rows


def folder_generation_config(tokenizer, image_token_id: int):
    """generation_config.json for a model folder: the demo's defaults, and never the image placeholder."""
    return GenerationSettings().to_config(tokenizer, suppress_tokens=[image_token_id])
