"""The one decode loop: every greedy or sampled answer, alone or with others, one token step at a time.

Every surface (API, web app, terminal chat, `diagnose`, `eval`) asks `ChatEngine.generate`; its requests come here,
and one of the waiting callers runs the model for all of them (continuous batching; one request alone is a batch of
one). Requests that arrive while others decode join the batch at the next token boundary: new prompts prefilled
together in one left-padded batch, a prompt that continues its session's key/value cache alone, after that cache;
a finished, cancelled or failed request leaves at once, and a request cancelled while it waits for a row leaves the
queue at once. The batch's cache is the rows' caches left-padded to one length, with an attention mask over the
padding and each row's own positions, so a row computes what it would alone (in float32 its greedy ids are the lone
request's; tests/test_scheduler.py). The back end (`protocol.LanguageModel`) does the arithmetic and keeps the
cache's rows; on llama.cpp each row is a sequence of its own and the padding is only in the mask. Each row's token
is chosen by its own `sampler.Sampler`. Beam search does not come here: it runs alone, on transformers' `generate`,
between token steps (`ChatEngine`).

A back end with a fixed key/value store (llama.cpp: `LanguageModel.capacity` positions) admits a request only when
every row fits it at its longest (prompt and all its new tokens); the others wait their turn in the queue, so the
store never runs out mid-answer. An out-of-memory error in a token step (or in prefilling new prompts together)
fails the requests in the batch (the API answers them 503) and halves the batch the scheduler admits next; it grows
back by one every `REGROW_STEPS` clean steps.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from skingpt4.backends.padding import pad_left
from skingpt4.engine import sampler
from skingpt4.engine.decoding import StopWhen
from skingpt4.engine.protocol import EngineStatus
from skingpt4.engine.settings import GenerationSettings

log = logging.getLogger(__name__)
REGROW_STEPS = 128
POLL_S = 0.1  # how often a caller waiting for the batch looks at its requests' cancel flags


@dataclass(eq=False)
class Request:
    """One session's turn in the scheduler: its prompt, its settings, and what it has generated so far."""

    session: object  # session.ChatSession
    ids: list[int]
    features: torch.Tensor | None
    first_image: int
    settings: GenerationSettings
    stop: StopWhen
    streamer: object | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        self.sampler = sampler.Sampler(self.settings)


def _longest(r: Request) -> int:
    """The positions a request's row holds at most: its prompt and every new token it may ask for."""
    return len(r.ids) + r.settings.max_new_tokens


class Batch:
    """The decoding rows' shared state: their left-padded cache, its mask, each row's length and pending token.
    The language model back end joins, selects and splits the cache's rows."""

    def __init__(self, llm, cache, mask: torch.Tensor, tokens: torch.Tensor):
        self.llm, self.cache, self.mask, self.lengths, self.last = llm, cache, mask, mask.sum(-1), tokens

    def add(self, cache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        """Rows prefilled together (a left-padded cache with its mask) join; both sides are padded to one width."""
        width = max(self.mask.shape[1], mask.shape[1])
        old_pad, new_pad = width - self.mask.shape[1], width - mask.shape[1]
        self.llm.join(self.cache, old_pad, cache, new_pad)
        self.mask = torch.cat([pad_left(self.mask, old_pad), pad_left(mask, new_pad)])
        self.lengths = torch.cat([self.lengths, mask.sum(-1)])
        self.last = torch.cat([self.last, tokens])

    def keep(self, rows: list[int]) -> None:
        """Keep these rows only, and drop the padding columns no remaining row needs."""
        start = self.mask.shape[1] - int(self.lengths[rows].max())
        self.llm.keep(self.cache, rows, start)
        index = torch.tensor(rows, device=self.mask.device)
        self.mask, self.lengths, self.last = self.mask[index, start:], self.lengths[index], self.last[index]

    def row_cache(self, row: int):
        """One row's cache without its padding: the session keeps it for its next turn."""
        return self.llm.row(self.cache, row, self.mask.shape[1] - int(self.lengths[row]))

    def step(self) -> torch.Tensor:
        """One token for every row: the next logits (B, V)."""
        mask = torch.cat([self.mask, self.mask.new_ones(len(self.last), 1)], dim=1)
        logits = self.llm.step(self.last, mask, self.lengths, self.cache)
        self.mask, self.lengths = mask, self.lengths + 1
        return logits


class Scheduler:
    """Decodes the requests of any number of threads together, at most `max_batch` at a time.

    There is no thread of its own: one of the waiting callers drives the batch (admits, steps) until its own
    requests are done, then another caller with work left takes over. So the model runs on the callers' threads:
    on a CPU, PyTorch's parallel ops run slower on any thread but the first to use OpenMP (libgomp spins less once
    it manages more threads than there are cores), so `diagnose` and `eval`, which call from the main thread, keep
    its speed.
    """

    def __init__(self, engine, max_batch: int):
        self.engine, self.max_batch, self.limit = engine, max_batch, max_batch
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.batch: Batch | None = None
        self.wake = threading.Condition()
        self.driving = False  # whether a caller is driving the batch now
        self.clean_steps = self.peak = 0  # peak: the largest batch decoded so far

    def status(self) -> EngineStatus:
        with self.wake:
            return EngineStatus(len(self.active), len(self.waiting), self.limit, self.peak)

    def run(self, requests: list[Request]) -> list[list[int]]:
        """Queue the requests and see them answered; returns each one's new ids, or raises the first error."""
        with self.wake:
            self.waiting.extend(requests)
            self.wake.notify_all()
        try:
            self._see_through(requests)
        except BaseException:  # Ctrl+C: the requests leave at the next step
            for r in requests:
                r.cancel.set()
            raise
        for r in requests:
            if r.error is not None:
                raise r.error
        return [r.tokens for r in requests]

    def _see_through(self, requests: list[Request]) -> None:
        """Wait while another caller drives the batch; if `requests` are not done by then, drive it until they are.
        A request cancelled while it waits for a row leaves the queue within `POLL_S`."""

        def done() -> bool:
            return all(r.done.is_set() for r in requests)

        with self.wake:
            while self.driving and not done():
                self._drop_cancelled()
                self.wake.wait(POLL_S)
            if done():
                return
            self.driving = True
        try:
            while not done():
                self._iteration()
        finally:
            with self.wake:  # a caller whose requests are still in the batch takes over
                self.driving = False
                self.wake.notify_all()

    def _drop_cancelled(self) -> None:
        """Requests cancelled while waiting for a row leave the queue (their callers return `Cancelled`)."""
        for r in [r for r in self.waiting if r.cancel.is_set()]:
            self.waiting.remove(r)
            self._end(r)

    def _iteration(self) -> None:
        """Admit who waits (up to the limit), then one token step."""
        joining = []
        try:
            with self.engine.lock, torch.no_grad():
                with self.wake:  # whoever came while the lock was busy joins now, in order, as far as rows fit
                    self._drop_cancelled()
                    while self.waiting and self._fits(self.waiting[0], joining):
                        joining.append(self.waiting.popleft())
                self._admit(joining)
                if self.active:
                    self._step()
        except BaseException as exc:  # never leave a request waiting: fail those the broken step held
            if isinstance(exc, Exception):  # not Ctrl+C: that is no failure to report
                unexpected = not isinstance(exc, torch.OutOfMemoryError)
                log.error("token step failed: %s", type(exc).__name__, exc_info=exc if unexpected else None)
            self._fail([r for r in joining if not r.done.is_set() and r not in self.active], exc)
            self._fail(self.active, exc)
            if not isinstance(exc, Exception):  # Ctrl+C and the like reach the caller
                raise

    def _fits(self, r: Request, joining: list[Request]) -> bool:
        """Whether `r` may join now: a row is free, and the back end can hold every row at its longest (its prompt
        and all the new tokens it may ask for) beside the others'. A request that waits keeps its place in line."""
        rows = [*self.active, *joining]
        if len(rows) >= self.limit:
            return False
        capacity = self.engine.llm.capacity
        return capacity is None or not rows or sum(map(_longest, [*rows, r])) <= capacity

    def _admit(self, joining: list[Request]) -> None:
        """Prefill the joining requests and add them to the batch: new prompts together, in one left-padded batch;
        a prompt that continues its session's cache alone, after that cache (as a lone turn would)."""
        fresh = []
        for r in joining:
            if r.cancel.is_set():
                self._end(r)
                continue
            try:
                cache, reuse, r.keys = self.engine.reusable(r.session, r.ids, r.first_image)
                r.session.reused_tokens = reuse
                if reuse == 0:
                    fresh.append(r)
                    continue
                mask, logits = self.engine.prefill([(r.ids, r.features)], cache, reuse)
                self._join([r], cache, mask, logits)
            except Exception as exc:  # this request alone fails (503 for out of memory); the batch goes on
                self._fail([r], exc)
        if fresh:
            try:
                cache = self.engine.llm.new_cache()
                mask, logits = self.engine.prefill([(r.ids, r.features) for r in fresh], cache)
                self._join(fresh, cache, mask, logits)
            except Exception as exc:  # these requests fail (503 for out of memory); the batch goes on
                if isinstance(exc, torch.OutOfMemoryError):
                    self._shrink(len(self.active) + len(fresh))
                self._fail(fresh, exc)

    def _join(self, requests: list[Request], cache, mask: torch.Tensor, logits: torch.Tensor) -> None:
        """Prefilled rows choose their first token and join the batch; any already finished leaves at once."""
        tokens = self._choose(requests, logits)
        last = torch.tensor(tokens, device=mask.device)
        if self.batch is None:
            self.batch = Batch(self.engine.llm, cache, mask, last)
        else:
            self.batch.add(cache, mask, last)
        first = len(self.active)
        self.active += requests
        self.peak = max(self.peak, len(self.active))
        self._leave([first + i for i, (r, t) in enumerate(zip(requests, tokens)) if self._emit(r, t)])

    def _step(self) -> None:
        """One token for every active row; finished rows leave."""
        self._leave([i for i, r in enumerate(self.active) if r.cancel.is_set()])
        if not self.active:
            return
        try:
            logits = self.batch.step()
        except torch.OutOfMemoryError as exc:
            self._shrink(len(self.active))
            return self._fail(self.active, exc)
        tokens = self._choose(self.active, logits)
        self.batch.last = self.batch.last.new_tensor(tokens)
        self._leave([i for i, (r, t) in enumerate(zip(self.active, tokens)) if self._emit(r, t)])
        self.clean_steps += 1
        if self.limit < self.max_batch and self.clean_steps % REGROW_STEPS == 0:
            self.limit += 1

    def _shrink(self, rows: int) -> None:
        """Out of memory with `rows` rows: the next batches hold half as many (growing back as steps succeed)."""
        self.limit = max(1, rows // 2)
        log.warning("out of memory in a batch of %d; the next batches hold at most %d", rows, self.limit)

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        return sampler.choose([r.sampler for r in requests], [r.tokens for r in requests], logits, self.engine.forbid)

    def _emit(self, r: Request, token: int) -> bool:
        """Add a token to a row's answer; whether the row is finished."""
        r.tokens.append(token)
        if r.streamer is not None:
            r.streamer.put(torch.tensor([token]))
        return (
            token == self.engine.tokenizer.eos_token_id
            or len(r.tokens) >= r.settings.max_new_tokens
            or r.cancel.is_set()
            or r.stop.hit(r.tokens)
        )

    def _leave(self, rows: list[int]) -> None:
        if not rows:
            return
        for i in rows:
            self._end(self.active[i], self.batch.row_cache(i))
        kept = [i for i in range(len(self.active)) if i not in rows]
        self.active = [self.active[i] for i in kept]
        if kept:
            self.batch.keep(kept)
        else:
            self.batch = None

    def _end(self, r: Request, cache=None) -> None:
        """A request is answered (or cancelled): its session keeps the cache, its streamer ends, its caller wakes."""
        if cache is not None:
            self.engine.keep_cache(r.session, cache, (r.keys + r.tokens)[: cache.get_seq_length()])
        if r.streamer is not None:
            r.streamer.end()
        self._done(r)

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        if isinstance(exc, torch.OutOfMemoryError):  # its frames hold the batch's tensors, the memory it wants
            exc.__traceback__ = None
        for r in list(requests):
            r.error = exc
            self._done(r)
        if requests is self.active:
            self.active, self.batch = [], None

    def _done(self, r: Request) -> None:
        with self.wake:
            r.done.set()
            self.wake.notify_all()
