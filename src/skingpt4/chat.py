"""The chat engine: sessions with images and turns, streaming, key/value-cache reuse, batching.

One `ChatEngine` wraps one loaded model and is shared; everything per consultation lives in a `Session`. Each
image is encoded once, when added. A single session's turn reuses the key/value cache of the conversation so far
(the longest prefix on which text *and* images agree), so a turn costs about its new tokens; under greedy decoding
its output is the same as recomputing from scratch. Greedy and sampled turns of any number of threads are decoded
together by the engine's `Scheduler` (continuous batching, `scheduler.py`); beam search, and every turn when
`max_batch` is 1, take the direct path: transformers' `generate`, one call at a time.
"""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

import torch

from skingpt4.conversation import AnswerText, Conversation, get_template
from skingpt4.decoding import Forbid, StopWhen, TextPieces, TokenBytes
from skingpt4.errors import Cancelled, InputError
from skingpt4.generation import MAX_BATCH, GenerationSettings
from skingpt4.images import DEFAULT_LIMITS, load_image, read_source, sha256_bytes
from skingpt4.llm import CACHE_ARGUMENT, TorchLLM
from skingpt4.model import LoadedModel
from skingpt4.processing import common_prefix, image_keys, prompt_ids, truncate_left
from skingpt4.scheduler import Request, Scheduler
from skingpt4.sharing import FairLock, Gathered


class ChatEngine:
    """Shared, thread-safe wrapper around one model; whatever runs the model holds `lock` (taken in turn)."""

    def __init__(
        self,
        loaded: LoadedModel,
        template: str | None = None,
        cached_sessions: int | None = None,
        max_batch: int = MAX_BATCH,
    ):
        self.loaded = loaded
        # Key/value caches are kept for the most recently answered sessions only: on a 13B model one 2000-token
        # cache is about 1.6 GB, and a web app may hold dozens of idle sessions. Others recompute their prefix.
        # By default as many as are decoded together (a batch holds their caches anyway), and at least 4.
        self.cached_sessions = max(4, max_batch) if cached_sessions is None else cached_sessions
        self._cached: OrderedDict[int, weakref.ref] = OrderedDict()
        self.model = loaded.model
        self.llm = loaded.llm or TorchLLM(self.model.language_model)  # llama.cpp when quantized (`quantized.py`)
        self.tokenizer = loaded.tokenizer
        self.template = get_template(template or loaded.meta.template)
        self.lock = FairLock()
        if max_batch < 1:
            raise InputError("max_batch must be at least 1 (1: one answer at a time)")
        # llama.cpp (a quantized LLM) decodes only through the scheduler; transformers with one row directly too.
        self.max_batch = max_batch
        self.scheduler = Scheduler(self, max_batch) if max_batch > 1 or loaded.llm else None
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
        mask = torch.zeros(rows, dtype=torch.bool)
        mask[self._suppressed] = True
        mask[self.tokens :] = True
        self.forbid = Forbid(mask.to(self.loaded.device))

    def session(self) -> Session:
        return Session(self)

    # -- images ---------------------------------------------------------------------------------------------------

    def encode_images(self, images: list) -> torch.Tensor:
        """PIL images -> projected Q-Former features (N, 32, H) in the LLM's dtype, on the embeddings' device."""
        return self._encode(torch.stack([self.loaded.meta.pixels.eval(img) for img in images]))

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

    # -- generation -------------------------------------------------------------------------------------------------

    def prepare(self, session: Session, settings: GenerationSettings) -> tuple[list[int], torch.Tensor | None, int]:
        """Ids of the session's prompt (left-truncated to the budget), its image features, first kept image."""
        ids, kept, dropped = self.prompt(session, settings)
        return ids, (torch.stack(kept) if kept else None), dropped

    def prompt(self, session: Session, settings: GenerationSettings) -> tuple[list, list, int]:
        """The session's prompt ids, left-truncated to the budget, the images kept (as the session holds them), and
        how many were dropped from the left."""
        ids = prompt_ids(self.tokenizer, session.conversation.prompt(), self.loaded.image_token_id)
        ids, dropped = truncate_left(ids, settings.max_context - settings.max_new_tokens, self.loaded.image_token_id)
        return ids, session.features[dropped:], dropped

    @torch.no_grad()
    def generate(self, sessions: list[Session], settings=None, streamer=None, cancel=None):
        """Answer each session's pending question; returns the answers and appends them to the sessions.

        `cancel` (a `threading.Event`) stops generation after the token step in progress; the turn is then
        withdrawn and `Cancelled` raised.
        """
        settings = settings or GenerationSettings()
        for s in sessions:
            if not s.conversation.awaiting_answer:
                raise InputError("ask a question first")
        try:
            new_tokens = self._generate(sessions, settings, streamer, cancel)
            if cancel is not None and cancel.is_set():
                raise Cancelled("generation cancelled")
        except BaseException:
            for s in sessions:  # the question goes back: a retry must not pile up unanswered turns
                s.conversation.drop_question()
            raise
        answers = []
        for session, tokens in zip(sessions, new_tokens):
            if streamer is not None:  # what was streamed is the answer, to the character
                text = streamer.answer.text
            else:
                text = self.answer_text(settings).whole(self.tokenizer.decode(tokens, skip_special_tokens=True))
            session.completion_tokens = len(tokens)
            answers.append(session.conversation.add_answer(text))
        return answers

    def answer_text(self, settings: GenerationSettings) -> AnswerText:
        """The clean-up of one answer: the template's and the request's stops, this tokenizer's special tokens."""
        return AnswerText(self.template, settings.stop, tuple(self.tokenizer.all_special_tokens))

    def stops(self, settings: GenerationSettings) -> list[str]:
        return [s for s in (self.template.stop, *settings.stop) if s]

    def _generate(self, sessions: list[Session], settings: GenerationSettings, streamer, cancel) -> list[torch.Tensor]:
        prepared = [self.prepare(s, settings) for s in sessions]
        for session, (ids, _, _) in zip(sessions, prepared):
            session.prompt_tokens = len(ids)
        if self.loaded.llm is not None and settings.num_beams > 1:
            raise InputError("beam search needs the unquantized model; --quantize answers greedy or sampled")
        if self.scheduler is not None and settings.num_beams == 1:
            requests = [
                Request(s, *p, settings, streamer, cancel or threading.Event()) for s, p in zip(sessions, prepared)
            ]
            return self.scheduler.run(requests)
        with self.lock:
            if cancel is not None and cancel.is_set():  # gave up while waiting for the lock
                return [torch.zeros(0, dtype=torch.long)] * len(sessions)
            with seeded(settings.seed):
                if len(sessions) == 1 and settings.num_beams == 1:
                    return [self._generate_cached(sessions[0], *prepared[0], settings, streamer, cancel)]
                return self._generate_batch([p[:2] for p in prepared], settings, streamer, cancel)

    def _run(self, ids, mask, features, settings, streamer, cancel=None, cache=None) -> torch.Tensor:
        """Generate after `ids` (B, T); returns only the new tokens (B, N)."""
        from transformers import LogitsProcessorList, StoppingCriteriaList

        embeds = self.embed(ids, features)
        stop = self.stops(settings)
        # Only embeddings, as the original: the output is the new tokens alone, and a repetition penalty sees only
        # them (given the prompt ids, transformers would penalise the whole conversation). The mask is applied
        # where transformers' own `suppress_tokens` would be: after a repetition penalty, before sampling.
        return self.model.language_model.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            generation_config=settings.to_config(self.tokenizer),
            streamer=streamer,
            logits_processor=LogitsProcessorList([self.forbid]),
            stopping_criteria=StoppingCriteriaList([StopWhen(self.pieces, stop, cancel)] if stop or cancel else []),
            **({CACHE_ARGUMENT: cache} if cache is not None else {}),
        )

    def _generate_cached(self, session, ids, features, first_image, settings, streamer, cancel) -> torch.Tensor:
        """One session: reuse its cache for the prefix shared with the last turn, run only the rest."""
        cache, reuse, keys = self.reusable(session, ids, first_image)
        row = torch.tensor([ids], device=self.loaded.device)
        new = self._run(row, torch.ones_like(row), features, settings, streamer, cancel, cache)[0]
        session.cache, session.cache_keys = cache, (keys + new.tolist())[: cache.get_seq_length()]
        session.reused_tokens = reuse
        self.remember(session)
        return new

    def reusable(self, session: Session, ids: list[int], first_image: int):
        """The session's cache cut to the prefix it shares with `ids` (at least one id is left to run), the length
        of that prefix, and `ids`' cache keys. The session lets go of its cache: a failed turn leaves none."""
        keys = image_keys(ids, self.loaded.image_token_id, first_image)
        cache, reuse = session.cache, 0
        if cache is not None:
            reuse = min(common_prefix(session.cache_keys, keys), len(ids) - 1, cache.get_seq_length())
        if cache is None or reuse == 0:
            cache = self.new_cache()
        elif cache.get_seq_length() > reuse:
            cache.crop(reuse - cache.get_seq_length())  # a negative count removes that many positions
        session.cache, session.cache_keys = None, []
        return cache, reuse, keys

    def new_cache(self):
        return self.llm.new_cache()

    def prefill(self, prompts: list[tuple[list[int], torch.Tensor | None]], cache, reuse: int = 0):
        """Run prompts (ids, image features) into `cache`, left-padded into one batch, after the cache's first
        `reuse` positions (only a lone prompt continues a cache): returns the padding mask (B, T) and the logits
        (B, V) for the first new tokens."""
        device = self.loaded.device
        embeds = [self.embed(torch.tensor([ids], device=device), features)[0] for ids, features in prompts]
        return self.llm.prefill(embeds, cache, reuse)

    def step(self, tokens: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache) -> torch.Tensor:
        """One decoding step for a left-padded batch (`llm.py`); returns the next logits (B, V)."""
        return self.llm.step(tokens, mask, positions, cache)

    @torch.no_grad()
    def settle(self, session: Session) -> int:
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
            text = session.conversation.history() + self.template.roles[0].rpartition(" ")[0]
            ids = prompt_ids(self.tokenizer, text, self.loaded.image_token_id)
            if len(ids) >= _DEFAULTS.max_context - _DEFAULTS.max_new_tokens:  # the next turn may cut the left
                return 0
            keys = image_keys(ids, self.loaded.image_token_id)
            reuse = min(common_prefix(session.cache_keys, keys), session.cache.get_seq_length())
            if reuse == 0 or reuse >= len(ids):  # nothing shared (a dropped llama.cpp row), or nothing to add
                return 0
            cache, session.cache, session.cache_keys = session.cache, None, []  # no half-updated cache survives
            if cache.get_seq_length() > reuse:
                cache.crop(reuse - cache.get_seq_length())  # a negative count removes that many positions
            features = torch.stack(session.features) if session.features else None
            self.prefill([(ids, features)], cache, reuse)
            session.cache, session.cache_keys = cache, keys
            self.remember(session)
            return len(ids) - reuse

    def remember(self, session: Session) -> None:
        """Mark `session` as the most recent cache holder; drop the caches of sessions beyond the budget."""
        self._cached[id(session)] = weakref.ref(session)
        self._cached.move_to_end(id(session))
        while len(self._cached) > self.cached_sessions:
            _, ref = self._cached.popitem(last=False)
            if (old := ref()) is not None:
                old.cache, old.cache_keys = None, []

    def _generate_batch(self, prepared, settings, streamer, cancel) -> list[torch.Tensor]:
        """Several prompts in one left-padded batch (no cache reuse); identical to one at a time under greedy."""
        width = max(len(ids) for ids, _ in prepared)
        pad = self.tokenizer.pad_token_id
        rows = [[pad] * (width - len(ids)) + ids for ids, _ in prepared]
        mask = [[0] * (width - len(ids)) + [1] * len(ids) for ids, _ in prepared]
        features = [f for _, f in prepared if f is not None]
        device = self.loaded.device
        ids = torch.tensor(rows, device=device)
        features = torch.cat(features) if features else None
        return list(self._run(ids, torch.tensor(mask, device=device), features, settings, streamer, cancel))


_DEFAULTS = GenerationSettings()


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


class Session:
    """One consultation: its images (encoded once), its turns, and its key/value cache."""

    def __init__(self, engine: ChatEngine):
        self.engine = engine
        self.reset()

    def reset(self) -> None:
        tokenizer = self.engine.tokenizer
        self.conversation = Conversation(self.engine.template, special_tokens=tuple(tokenizer.all_special_tokens))
        self.features: list[torch.Tensor] = []
        self.image_hashes: list[str] = []
        self.cache, self.cache_keys, self.reused_tokens = None, [], 0
        self.prompt_tokens = self.completion_tokens = 0  # of the last turn (usage reports)

    def add_image(self, source: str | Path | bytes) -> str:
        """Decode (through the one image loader), encode once, and add an image; returns its SHA-256."""
        data = read_source(source, DEFAULT_LIMITS.max_bytes)  # read once: the hash is of the pixels we decode
        image = load_image(data)  # rejects unsafe or broken images with a one-line reason
        self.add_encoded(self.engine.encode_images([image])[0], sha256_bytes(data))
        return self.image_hashes[-1]

    def add_encoded(self, features: torch.Tensor, sha256: str = "") -> None:
        """Add an image already encoded by `ChatEngine.encode_images` (used for batches)."""
        self.conversation.add_image()
        self.features.append(features)
        self.image_hashes.append(sha256)

    def ask(self, text: str) -> str:
        """Add a question; returns it as the model will read it (reserved strings neutralised)."""
        return self.conversation.add_question(text)

    def answer(self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None) -> str:
        return self.engine.generate([self], settings, cancel=cancel)[0]

    def settle(self) -> int:
        """Prepare the cache for the next turn (`ChatEngine.settle`); idle-time work."""
        return self.engine.settle(self)

    def stream(self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None):
        """Yield the answer as text pieces while it is generated (the final, cleaned answer is stored).

        Closing the iterator early (a client that went away) cancels generation and withdraws the question.
        """
        settings = settings or GenerationSettings()
        cancel = cancel or threading.Event()
        if settings.num_beams > 1:  # beam search cannot stream: the answer arrives in one piece
            yield self.answer(settings, cancel)
            return
        streamer = TextPieces(self.engine.tokenizer, self.engine.answer_text(settings))
        failure: list[BaseException] = []

        def work():
            try:
                self.engine.generate([self], settings, streamer, cancel)
            except BaseException as exc:  # surfaced in the consumer's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from streamer
        except GeneratorExit:  # the consumer stopped reading: stop after the current token step
            cancel.set()
            thread.join()
            raise
        thread.join()
        if failure:
            raise failure[0]
