"""The engine's two kinds of settings, each default in one place.

`GenerationSettings` are per answer (every surface passes them; the defaults are the released demo's).
`EngineSettings` are per engine: how many answers are decoded together, how many sessions keep a key/value cache
between turns, and how many requests may wait for a row. `sampler.py` turns generation settings into token choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from skingpt4.errors import InputError


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
        _check(checks)

    @classmethod
    def greedy(cls, **overrides) -> GenerationSettings:
        return cls(do_sample=False, **overrides)


MAX_CONTEXT = GenerationSettings.max_context  # prompt and answer together, in the model's positions


@dataclass(frozen=True)
class EngineSettings:
    """How one engine shares its model (`--max-batch`, `--cached-sessions`, `--queue-size`).

    `max_batch`: answers decoded together, one token step for all (`scheduler.py`; vLLM's `max_num_seqs`); 1 answers
    one at a time. `cached_sessions`: sessions whose key/value cache is kept between turns (on a 13B model one
    2000-token cache is about 1.6 GB); the others recompute their history. `queue_size`: requests that may wait
    for a row beyond those decoding; a surface refuses more (the API answers 503, the web app says it is busy).
    """

    max_batch: int = 8  # bench/bench_concurrency.py
    cached_sessions: int = 8
    queue_size: int = 16

    def __post_init__(self):
        _check(
            [
                (self.max_batch >= 1, "--max-batch must be at least 1 (1: one answer at a time)"),
                (self.cached_sessions >= 0, "--cached-sessions must be 0 or more"),
                (self.queue_size >= 0, "--queue-size must be 0 or more"),
            ]
        )


def _check(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise InputError(message)


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
