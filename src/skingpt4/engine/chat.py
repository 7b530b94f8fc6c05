"""Our engine: one loaded model shared by every surface and thread (`protocol.Engine`).

Each photo is encoded once, when added (photos that wait for the model together, in one batch). Every greedy or
sampled answer is decoded by the `Scheduler` (`scheduler.py`), alone or with others; a session's turn continues
the key/value cache of its conversation so far (the longest prefix on which text *and* photos agree), so a turn
costs about its new tokens; under greedy decoding its output is the same as recomputing from scratch. Beam search
runs on transformers' `generate`, alone, between token steps. The language model is a `protocol.LanguageModel`:
transformers, or llama.cpp when quantized; the engine computes its input embeddings and chooses its tokens.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import weakref
from contextlib import contextmanager

import torch

from skingpt4.engine import sampler
from skingpt4.engine.decoding import Forbid, StopWhen, TokenBytes
from skingpt4.engine.protocol import EngineStatus
from skingpt4.engine.scheduler import Request, Scheduler
from skingpt4.engine.session import ChatFormat, ChatSession, answered
from skingpt4.engine.settings import MAX_CONTEXT, EngineSettings, GenerationSettings
from skingpt4.engine.sharing import FairLock, Gathered
from skingpt4.folder.load import LoadedModel, never_generated
from skingpt4.inputs.conversation import get_template
from skingpt4.inputs.prompt import common_prefix, image_keys, prompt_ids

SETTLE_BUDGET = MAX_CONTEXT - GenerationSettings.max_new_tokens  # past it, the next turn may cut the left


class ChatEngine:
    """Shared, thread-safe wrapper around one model; whatever runs the model holds `lock` (taken in turn)."""

    def __init__(self, loaded: LoadedModel, template: str | None = None, settings: EngineSettings | None = None):
        self.loaded, self.info, self.settings = loaded, loaded.info, settings or EngineSettings()
        self.model, self.llm, self.tokenizer = loaded.model, loaded.llm, loaded.tokenizer
        self.chat = ChatFormat(
            self.tokenizer, get_template(template or loaded.info.meta.template), loaded.image_token_id
        )
        self.lock = FairLock()
        self.scheduler = Scheduler(self, self.settings.max_batch)
        self.caches = KeptCaches(self.settings.cached_sessions)
        self._encode = Gathered(self.lock, self._encode_pixels)  # photos that wait together: one batch
        self.pieces = TokenBytes(self.tokenizer)  # each token's text, for the stop-string check
        # Never emit the image placeholder, nor vocabulary rows that have no token (a random model may have them).
        self.tokens = len(self.tokenizer)
        folder = getattr(self.model.generation_config, "suppress_tokens", None) or []
        self.suppress_tokens = [loaded.image_token_id, *folder]

    @property
    def suppress_tokens(self) -> list[int]:
        """Ids never generated (besides the rows past the tokenizer's vocabulary); setting them remakes the mask."""
        return self._suppressed

    @suppress_tokens.setter
    def suppress_tokens(self, ids) -> None:
        rows = self.model.language_model.get_output_embeddings().weight.shape[0]
        self._suppressed = sorted({i for i in ids if i < self.tokens})
        self.forbid = Forbid(never_generated(rows, self.tokens, self._suppressed).to(self.loaded.device))

    def session(self) -> ChatSession:
        return ChatSession(self)

    def status(self) -> EngineStatus:
        return dataclasses.replace(self.scheduler.status(), encoding=len(self._encode.queued))

    def close(self) -> None:
        """Nothing to let go of: the model is freed with the engine."""

    # -- photos -----------------------------------------------------------------------------------------------------

    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> projected Q-Former features (N, 32, H) in the LLM's dtype, on the embeddings' device."""
        return self._encode(torch.stack([self.info.meta.pixels.eval(img) for img in images]))

    @torch.no_grad()
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        vision = self.model.vision_model.embeddings.patch_embedding.weight
        out = self.model.get_image_features(pixel_values=pixels.to(vision.device, vision.dtype))
        embeddings = self.model.get_input_embeddings().weight
        return out.pooler_output.to(embeddings.device, embeddings.dtype)

    def embed(self, ids: torch.Tensor, features: torch.Tensor | None) -> torch.Tensor:
        """Token embeddings (B, T, H) with image features scattered into the placeholder positions, in order."""
        embeds = self.model.get_input_embeddings()(ids)
        slots = (ids == self.loaded.image_token_id).unsqueeze(-1)
        count = int(slots.sum()) * embeds.shape[-1]
        given = 0 if features is None else features.numel()
        if count != given:
            raise ValueError(f"prompt has {count // embeds.shape[-1]} image slots but {given} feature values")
        if features is None:
            return embeds
        return embeds.masked_scatter(slots, features.to(embeds.dtype))

    def prefill(self, prompts: list[tuple[list[int], torch.Tensor | None]], cache, reuse: int = 0):
        """Prompts (ids, image features) into `cache` (`protocol.LanguageModel.prefill`)."""
        device = self.loaded.device
        embeds = [self.embed(torch.tensor([ids], device=device), features)[0] for ids, features in prompts]
        return self.llm.prefill(embeds, cache, reuse)

    # -- answers ----------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, sessions: list[ChatSession], settings=None, streamer=None, cancel=None) -> list[str]:
        """Answer each session's pending question (`protocol.Engine.generate`)."""
        settings = settings or GenerationSettings()
        return answered(
            sessions,
            settings,
            self.chat,
            streamer,
            cancel,
            lambda: self._new_ids(sessions, settings, streamer, cancel),
        )

    def _new_ids(self, sessions: list[ChatSession], settings: GenerationSettings, streamer, cancel) -> list:
        prompts = [self.chat.prompt(s, settings) for s in sessions]
        for session, (ids, _, _) in zip(sessions, prompts):
            session.prompt_tokens = len(ids)
        if settings.num_beams > 1:
            return self._beam_search(prompts, settings, cancel)
        cancel, stop = cancel or threading.Event(), StopWhen(self.pieces, self.chat.stops(settings))
        requests = [
            Request(s, ids, _stacked(photos), first, settings, stop, streamer, cancel)
            for s, (ids, photos, first) in zip(sessions, prompts)
        ]
        return self.scheduler.run(requests)

    def _beam_search(self, prompts: list, settings: GenerationSettings, cancel) -> list:
        """Prompts in one left-padded batch through transformers' beam search (no cache reuse)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        stops = self.chat.stops(settings)
        stopping = StoppingCriteriaList([StopWhen(self.pieces, stops, cancel)] if stops or cancel else [])
        with self.lock, seeded(settings.seed):
            if cancel is not None and cancel.is_set():  # gave up while waiting for the lock
                return [[] for _ in prompts]
            device = self.loaded.device
            embeds = [self.embed(torch.tensor([ids], device=device), _stacked(p))[0] for ids, p, _ in prompts]
            config = sampler.generation_config(settings, self.tokenizer)
            return self.llm.beam_search(embeds, config, LogitsProcessorList([self.forbid]), stopping)

    @torch.no_grad()
    def score(self, rows: list[tuple[list[int], list, list[int]]]) -> list[float]:
        """Summed log-probability of each target after its prompt and photos (`protocol.Engine.score`)."""
        device = self.loaded.device
        with self.lock:  # the model is shared with every other caller of the engine
            embeds = [self.embed(torch.tensor([[*p, *t]], device=device), _stacked(f))[0] for p, f, t in rows]
            logits = self.llm.logits_at(embeds, [[len(p) - 1 + k for k in range(len(t))] for p, _, t in rows])
        logits[:, self.tokens :] = float("-inf")  # ids without a token are never generated either
        wanted = torch.tensor([k for _, _, t in rows for k in t], device=logits.device)
        logp = torch.log_softmax(logits, -1).gather(1, wanted[:, None])[:, 0].double().cpu()
        owner = torch.tensor([n for n, (_, _, t) in enumerate(rows) for _ in t])
        return torch.zeros(len(rows), dtype=torch.float64).index_add_(0, owner, logp).tolist()

    # -- key/value caches kept between turns ------------------------------------------------------------------------

    def reusable(self, session: ChatSession, ids: list[int], first_image: int):
        """The session's cache cut to the prefix it shares with `ids` (at least one id is left to run), the length
        of that prefix, and `ids`' cache keys. The session lets go of its cache: a failed turn leaves none."""
        keys = image_keys(ids, self.loaded.image_token_id, first_image)
        cache, reuse = session.cache, 0
        if cache is not None:
            reuse = min(common_prefix(session.cache_keys, keys), len(ids) - 1, cache.get_seq_length())
        if cache is None or reuse == 0:
            cache = self.llm.new_cache()
        elif cache.get_seq_length() > reuse:
            cache.crop(reuse - cache.get_seq_length())  # a negative count removes that many positions
        session.cache, session.cache_keys = None, []
        return cache, reuse, keys

    def keep_cache(self, session: ChatSession, cache, keys: list[int]) -> None:
        """The session keeps `cache` (holding `keys`) for its next turn, if it is among the most recent."""
        session.cache, session.cache_keys = cache, keys
        self.llm.park(cache)
        self.caches.keep(session)

    @torch.no_grad()
    def settle(self, session: ChatSession) -> int:
        """Bring a session's cache up to its conversation as the next turn will read it; returns the positions added.

        A turn's cache holds the ids the model generated, but the next prompt re-tokenizes the answer's text (as
        the original does, and as exactness needs), so reuse stops where the two differ: often at the answer's
        first token (`Assistant: ` puts a space before it that the generated token may lack). This computes the
        re-tokenized part now, so the next turn prefills only its question. The surfaces call it when an answer
        is done, in the background, while the person reads and types; a question asked meanwhile waits for it.
        """
        with self.lock:
            if session.cache is None or session.conversation.awaiting_answer:
                return 0
            # The next message begins with the user role (`answer###Human: ...`): its text up to the space joins
            # the answer's last word, so it is tokenized with it; after the space a new word begins. (Were that
            # not so for some tokenizer, the next turn would just reuse less: it compares before it reuses.)
            text = session.conversation.history() + self.chat.template.roles[0].rpartition(" ")[0]
            ids = prompt_ids(self.tokenizer, text, self.loaded.image_token_id)
            if len(ids) >= SETTLE_BUDGET:
                return 0
            keys = image_keys(ids, self.loaded.image_token_id)
            reuse = min(common_prefix(session.cache_keys, keys), session.cache.get_seq_length())
            if reuse == 0 or reuse >= len(ids):  # nothing shared (a dropped llama.cpp row), or nothing to add
                return 0
            cache, session.cache, session.cache_keys = session.cache, None, []  # no half-updated cache survives
            if cache.get_seq_length() > reuse:
                cache.crop(reuse - cache.get_seq_length())  # a negative count removes that many positions
            self.prefill([(ids, _stacked(session.photos))], cache, reuse)
            self.keep_cache(session, cache, keys)
            return len(ids) - reuse


class KeptCaches:
    """Which sessions keep a key/value cache between turns: the `limit` most recently answered. A session that is
    gone leaves at once (a weak reference: its cache goes with it), so only live sessions count."""

    def __init__(self, limit: int):
        self.limit, self.ticks = limit, itertools.count()
        self.last_used: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # session -> tick of its last turn

    def keep(self, session: ChatSession) -> None:
        """Mark `session` as the most recent holder; sessions past the limit let go of their caches. Called with
        the engine's lock held."""
        self.last_used[session] = next(self.ticks)
        while len(self.last_used) > self.limit:
            oldest = min(self.last_used, key=self.last_used.get)
            del self.last_used[oldest]
            oldest.cache, oldest.cache_keys = None, []

    def __len__(self) -> int:
        return len(self.last_used)


def _stacked(photos: list) -> torch.Tensor | None:
    return torch.stack(photos) if photos else None


@contextmanager
def seeded(seed: int | None):
    """Draw from a generator seeded for this request only: the global RNG is restored afterwards, so a later
    request without a seed is not made deterministic by an earlier one with a seed."""
    if seed is None:
        yield
        return
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield
