"""The engine's two interfaces, written down.

`Engine` is what every surface (`serve/`, `evaluate/`, `review/`, `cli/`) calls, and all it may call: our engine
(`chat.ChatEngine`, on transformers or llama.cpp), vLLM's (`vllm.VllmEngine`) and, for other model families'
folders, `family.FamilyEngine` implement it. A surface holds sessions (`Session`, one per consultation;
`session.ChatSession` is the one implementation, shared by all three) and asks the engine for answers through them.

`LanguageModel` is what our engine's decode loop (`scheduler.py`) calls: transformers
(`backends/transformers_llm.py`) and llama.cpp (`backends/llamacpp.py`) implement it. The engine computes the
input embeddings itself (token embeddings with each photo's features in its slots), so the prompt ids, the image
slots, token choice (`sampler.py`) and stop handling are one code path for both; a back end does only the
arithmetic of the transformer layers and keeps their key/value caches. A cache holds rows: a running batch's, or a
session's one row kept between turns.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.folder.load import ModelInfo
from skingpt4.inputs.conversation import Conversation


@dataclass(frozen=True)
class EngineStatus:
    """What an engine is doing now: requests decoding, requests waiting for a row, rows it admits at most now
    (below `max_batch` after an out-of-memory error, growing back), the largest batch it has decoded, and callers
    whose photos wait to be encoded."""

    decoding: int
    waiting: int
    limit: int
    peak: int
    encoding: int = 0


class Session(Protocol):
    """One consultation: its photos, its turns, and whatever the engine keeps for it between turns."""

    conversation: Conversation
    image_hashes: list[str]
    prompt_tokens: int  # of the last turn (usage reports)
    completion_tokens: int
    reused_tokens: int  # positions of the last turn's prompt that a kept cache already held
    reasoning: str  # the last answer's thought (a reasoning model's `<think>` block), kept apart from the answer

    def add_image(self, source: str | Path | bytes) -> str:
        """Decode (through the one image loader) and add a photo; returns its SHA-256."""

    def add_encoded(self, photo: Any, sha256: str = "") -> None:
        """Add a photo already encoded by `Engine.encode_images`."""

    def ask(self, text: str) -> str:
        """Add a question; returns it as the model will read it (reserved strings neutralised)."""

    def answer(self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None) -> str:
        """Answer the pending question; the answer is stored. `cancel` stops it (raises `errors.Cancelled`)."""

    def stream(
        self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None
    ) -> Iterator[str]:
        """The answer as text pieces while it is generated; closing the iterator early cancels it."""

    def withdraw(self) -> None:
        """Take back the last question and its answer, if it has one (an answer that was never shown)."""

    def settle(self) -> int:
        """Idle-time work before the next turn (`ChatEngine.settle`); returns positions computed."""

    def reset(self) -> None:
        """A new consultation: no photos, no turns."""


class Engine(Protocol):
    """One loaded model, shared by every surface and thread."""

    info: ModelInfo  # id, folder, metadata, warning of the model it runs
    chat: Any  # `session.ChatFormat`: tokenizer, template, prompt ids, stops, answer clean-up
    settings: EngineSettings  # rows decoded together, session caches kept, queue length

    def session(self) -> Session:
        """A new, empty consultation on this engine."""

    def encode_images(self, images: list) -> list:
        """PIL images -> what a session keeps of each (our engine: projected features; vLLM: the image)."""

    def generate(self, sessions: list[Session], settings: GenerationSettings, streamer=None, cancel=None) -> list[str]:
        """Answer each session's pending question, together; stores and returns the answers. `streamer` (one
        session only) receives the answer's token ids as they are made (`decoding.TextPieces`); `cancel` stops
        generation after the token step in progress, withdraws the questions and raises `errors.Cancelled`."""

    def settle(self, session: Session) -> int:
        """Bring a session's kept state up to its conversation before its next turn; returns positions added."""

    def score(self, rows: list[tuple[list[int], Any, list[int]]]) -> list[float]:
        """For each (prompt ids, photos, target ids): the summed log-probability of the target after the prompt
        (choice-mode evaluation)."""

    def status(self) -> EngineStatus:
        """Requests decoding and waiting now."""

    def close(self) -> None:
        """Let go of the model (a server's engine, at shutdown)."""


class Cache(Protocol):
    """A back end's key/value cache. `get_seq_length` and `crop` are those of a lone row (a session's cache)."""

    def get_seq_length(self) -> int: ...

    def crop(self, count: int) -> None:
        """A negative count removes that many positions from the end."""


class LanguageModel(Protocol):
    """The transformer layers, as our engine's decode loop uses them."""

    capacity: int | None  # positions its key/value store holds for all rows together (None: bounded by memory)

    def new_cache(self) -> Cache:
        """An empty cache."""

    def prefill(self, embeds: list[torch.Tensor], cache: Cache, reuse: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts' embeddings (T_i, H) into `cache`, left-padded into one batch (or a lone prompt after the cache's
        first `reuse` positions): the padding mask (B, T) and the logits (B, V) for each first new token."""

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache: Cache) -> torch.Tensor:
        """Each row's pending token (B,) at its position (B,), over a cache whose padding `mask` (B, L+1) hides:
        the next logits (B, V)."""

    def join(self, cache: Cache, old_pad: int, other: Cache, new_pad: int) -> None:
        """Append `other`'s rows to `cache`'s, each side padded on the left by its count."""

    def keep(self, cache: Cache, rows: list[int], start: int) -> None:
        """Keep these rows only, from column `start` on."""

    def row(self, cache: Cache, row: int, start: int) -> Cache:
        """One row, from column `start` on, as a cache of its own (a session keeps it)."""

    def park(self, cache: Cache) -> None:
        """A session keeps `cache` between turns: the back end may drop it under memory pressure, never a row
        that is decoding."""

    def beam_search(self, embeds: list[torch.Tensor], config, logits_processor, stopping_criteria) -> list:
        """Prompts' embeddings through transformers' beam search (`GenerationConfig`): each one's new ids."""

    def logits_at(self, embeds: list[torch.Tensor], positions: list[list[int]]) -> torch.Tensor:
        """Whole sequences read at once: the float32 logits (N, V) after each sequence's listed positions."""
