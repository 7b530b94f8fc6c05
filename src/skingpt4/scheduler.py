"""Continuous batching: concurrent requests decoded together, one token step at a time.

Every surface (API, web app, terminal chat, `diagnose`, `eval`) asks `ChatEngine.generate`; with `max_batch`
above 1, its greedy and sampled requests come here, and one of the waiting callers runs the model for all of
them. A request that arrives while others decode is prefilled alone, reusing its session's key/value cache as a
lone turn would, and joins the batch at the next token boundary; a finished, cancelled or failed one leaves at
once. The batch's cache is the rows' caches left-padded to one length, with an attention mask over the padding
and each row's own positions, so a row computes what it would alone (in float32 its greedy ids are the lone
request's; tests/test_scheduler.py).

Token choice is transformers' own for these settings, row by row: repetition penalty over the answer so far, the
never-generate mask, then when sampling temperature, top-k 50 and top-p, and a draw. A request with a seed draws
from its own generator, so its answer does not depend on what it was batched with. Beam search does not come
here: it runs alone, on the direct path, between token steps.

An out-of-memory error in a token step fails the requests in the batch (the API answers them 503) and halves the
batch the scheduler admits next; it grows back by one every `REGROW_STEPS` clean steps.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field

import torch

from skingpt4.decoding import StopWhen
from skingpt4.generation import TOP_K, GenerationSettings

log = logging.getLogger(__name__)
REGROW_STEPS = 128


class FairLock:
    """A re-entrant lock taken in the order it was asked for.

    `threading.RLock` lets the thread that just released it take it again at once, so a decode loop that takes
    the model for each token step would keep a photo being encoded, or a beam search, waiting until the batch is
    empty. Here each step queues behind whoever asked first.
    """

    def __init__(self):
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = self._next = self._serving = 0

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket, self._next = self._next, self._next + 1
            while self._serving != ticket:
                self._cond.wait()
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a lock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner, self._serving = None, self._serving + 1
                self._cond.notify_all()

    def owned(self) -> bool:
        """Whether the calling thread holds the lock."""
        return self._owner == threading.get_ident()

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Gathered:
    """Calls of a batched function that wait for the model together are run as one call.

    `work` maps a batch of items (N, ...) to results (N, ...). A caller queues its items, then takes the engine's
    lock; whoever gets it first runs `work` on every queued caller's items at once, and each caller gets its own
    rows back. Photos sent by several clients at once are so encoded in one batch, between two token steps.
    """

    def __init__(self, lock: FairLock, work):
        self.lock, self.work = lock, work
        self.queued: list[dict] = []
        self.guard = threading.Lock()

    def __call__(self, items: torch.Tensor) -> torch.Tensor:
        call = {"items": items}
        with self.guard:
            self.queued.append(call)
        with self.lock:  # whoever held it since our call was queued may have run it already
            with self.guard:
                calls, self.queued = self.queued, []
            if calls:
                self._run(calls)
        if "error" in call:
            raise call["error"]
        return call["result"]

    def _run(self, calls: list[dict]) -> None:
        try:
            results = self.work(torch.cat([c["items"] for c in calls])).split([len(c["items"]) for c in calls])
        except BaseException as exc:  # every caller in the batch gets it (out of memory: 503 to each request)
            for c in calls:
                c["error"] = exc
            return
        for c, result in zip(calls, results):
            c["result"] = result


@dataclass(eq=False)
class Request:
    """One session's turn in the scheduler: its prompt, its settings, and what it has generated so far."""

    session: object  # chat.Session
    ids: list[int]
    features: torch.Tensor | None
    first_image: int
    settings: GenerationSettings
    streamer: object | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    tokens: list[int] = field(default_factory=list)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self):
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        s = self.settings
        self.processors = [RepetitionPenaltyLogitsProcessor(s.repetition_penalty)] if s.repetition_penalty != 1 else []
        self.warpers = []
        if s.do_sample:  # in transformers' order, each only where it changes something
            self.warpers += [TemperatureLogitsWarper(s.temperature)] if s.temperature != 1 else []
            self.warpers += [TopKLogitsWarper(TOP_K)]
            self.warpers += [TopPLogitsWarper(s.top_p)] if s.top_p < 1 else []
        self.generator = None

    @property
    def plain(self) -> bool:
        """Greedy without a penalty: the batch's argmax is this row's choice."""
        return not self.settings.do_sample and not self.processors

    def choose(self, scores: torch.Tensor) -> int:
        """The next token from this row's scores (1, V), already masked."""
        answer = torch.tensor([self.tokens], dtype=torch.long, device=scores.device)
        for process in self.processors + self.warpers:
            scores = process(answer, scores)
        if not self.settings.do_sample:
            return int(scores.argmax(-1))
        if self.generator is None and self.settings.seed is not None:
            self.generator = torch.Generator(scores.device).manual_seed(self.settings.seed)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Batch:
    """The decoding rows' shared state: their left-padded cache, its mask, each row's length and pending token."""

    def __init__(self, cache, length: int, token: int):
        device = cache.layers[0].keys.device
        self.cache = cache
        self.mask = torch.ones(1, length, dtype=torch.long, device=device)
        self.lengths = torch.tensor([length], device=device)
        self.last = torch.tensor([token], device=device)

    def add(self, cache, length: int, token: int) -> None:
        width = max(self.mask.shape[1], length)
        old_pad, new_pad = width - self.mask.shape[1], width - length
        for mine, theirs in zip(self.cache.layers, cache.layers):
            mine.keys = torch.cat([_pad_left(mine.keys, old_pad), _pad_left(theirs.keys, new_pad)])
            mine.values = torch.cat([_pad_left(mine.values, old_pad), _pad_left(theirs.values, new_pad)])
        mask = torch.ones(1, length, dtype=torch.long, device=self.mask.device)
        self.mask = torch.cat([_pad_left(self.mask, old_pad), _pad_left(mask, new_pad)])
        self.lengths = torch.cat([self.lengths, self.lengths.new_tensor([length])])
        self.last = torch.cat([self.last, self.last.new_tensor([token])])

    def keep(self, rows: list[int]) -> None:
        """Keep these rows only, and drop the padding columns no remaining row needs."""
        start = self.mask.shape[1] - int(self.lengths[rows].max())
        index = torch.tensor(rows, device=self.mask.device)
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self.mask, self.lengths, self.last = self.mask[index, start:], self.lengths[index], self.last[index]

    def row_cache(self, row: int, config):
        """A copy of one row's cache without its padding: the session keeps it for its next turn."""
        from transformers import DynamicCache

        cache, start = DynamicCache(config=config), self.mask.shape[1] - int(self.lengths[row])
        for i, layer in enumerate(self.cache.layers):
            cache.update(
                layer.keys[row : row + 1, :, start:].clone(), layer.values[row : row + 1, :, start:].clone(), i
            )
        return cache


def _pad_left(x: torch.Tensor, count: int) -> torch.Tensor:
    """Zeros before the sequence dimension's start (dim -2 of a cache tensor, dim -1 of a mask)."""
    if count == 0:
        return x
    dim = -1 if x.dim() == 2 else -2
    shape = list(x.shape)
    shape[dim] = count
    return torch.cat([x.new_zeros(shape), x], dim=dim)


class Scheduler:
    """Decodes the requests of any number of threads together, at most `max_batch` at a time.

    There is no thread of its own: one of the waiting callers drives the batch (admits, steps) until its own
    requests are done, then another caller with work left takes over. So the model runs on the callers' threads,
    as on the direct path: on a CPU, PyTorch's parallel ops run slower on any thread but the first to use OpenMP
    (libgomp spins less once it manages more threads than there are cores), so `diagnose` and `eval`, which call
    from the main thread, keep its speed.
    """

    def __init__(self, engine, max_batch: int):
        self.engine, self.max_batch, self.limit = engine, max_batch, max_batch
        self.waiting: deque[Request] = deque()
        self.active: list[Request] = []
        self.batch: Batch | None = None
        self.wake = threading.Condition()
        self.driving = False  # whether a caller is driving the batch now
        self.clean_steps = self.peak = 0  # peak: the largest batch decoded so far

    def run(self, requests: list[Request]) -> list[torch.Tensor]:
        """Queue the requests and see them answered; returns each one's new tokens, or raises the first error."""
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
        return [torch.tensor(r.tokens, dtype=torch.long) for r in requests]

    def _see_through(self, requests: list[Request]) -> None:
        """Wait while another caller drives the batch; if `requests` are not done by then, drive it until they are."""

        def done() -> bool:
            return all(r.done.is_set() for r in requests)

        with self.wake:
            while self.driving and not done():
                self.wake.wait()
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

    def _iteration(self) -> None:
        """Admit who waits (up to the limit), then one token step."""
        joining = []
        try:
            with self.engine.lock, torch.no_grad():
                with self.wake:  # whoever came while the lock was busy joins now
                    while self.waiting and len(self.active) + len(joining) < self.limit:
                        joining.append(self.waiting.popleft())
                for r in joining:
                    self._admit(r)
                if self.active:
                    self._step()
        except BaseException as exc:  # never leave a request waiting: fail those the broken step held
            log.error("token step failed: %s", type(exc).__name__)
            self._fail([r for r in joining if not r.done.is_set() and r not in self.active], exc)
            self._fail(self.active, exc)
            if not isinstance(exc, Exception):  # Ctrl+C and the like reach the caller
                raise

    def _admit(self, r: Request) -> None:
        """Prefill one request alone (reusing its session's cache) and add it to the batch."""
        if r.cancel.is_set():
            return self._end(r)
        engine = self.engine
        try:
            cache, r.keys, logits = engine.prefill(r.session, r.ids, r.features, r.first_image)
            r.stop = StopWhen(engine.pieces, engine.stops(r.settings))
            if r.streamer is not None:  # as transformers' generate does: first the prompt ids (none: embeddings)
                r.streamer.put(torch.zeros(1, 0, dtype=torch.long))
            token = self._choose([r], logits)[0]
        except Exception as exc:  # this request alone fails (503 for out of memory); the batch goes on
            return self._fail([r], exc)
        if self._emit(r, token):
            return self._end(r, cache)
        if self.batch is None:
            self.batch = Batch(cache, len(r.ids), token)
        else:
            self.batch.add(cache, len(r.ids), token)
        self.active.append(r)
        self.peak = max(self.peak, len(self.active))

    def _step(self) -> None:
        """One token for every active row; finished rows leave."""
        self._leave([i for i, r in enumerate(self.active) if r.cancel.is_set()])
        if not self.active:
            return
        b = self.batch
        mask = torch.cat([b.mask, b.mask.new_ones(len(self.active), 1)], dim=1)
        try:
            logits = self.engine.step(b.last, mask, b.lengths, b.cache)
        except torch.OutOfMemoryError as exc:
            self.limit = max(1, len(self.active) // 2)
            log.warning(
                "out of memory in a batch of %d; the next batches hold at most %d", len(self.active), self.limit
            )
            return self._fail(self.active, exc)
        b.mask, b.lengths = mask, b.lengths + 1
        tokens = self._choose(self.active, logits)
        b.last = b.last.new_tensor(tokens)
        self._leave([i for i, (r, t) in enumerate(zip(self.active, tokens)) if self._emit(r, t)])
        self.clean_steps += 1
        if self.limit < self.max_batch and self.clean_steps % REGROW_STEPS == 0:
            self.limit += 1

    def _choose(self, requests: list[Request], logits: torch.Tensor) -> list[int]:
        scores = self.engine.forbid(None, logits.to(torch.float32, copy=True))
        chosen = scores.argmax(-1).tolist()
        for i, r in enumerate(requests):
            if not r.plain:
                chosen[i] = r.choose(scores[i : i + 1])
        return chosen

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
        config = self.engine.model.language_model.config
        for i in rows:
            self._end(self.active[i], self.batch.row_cache(i, config))
        kept = [i for i in range(len(self.active)) if i not in rows]
        self.active = [self.active[i] for i in kept]
        if kept:
            self.batch.keep(kept)
        else:
            self.batch = None

    def _end(self, r: Request, cache=None) -> None:
        """A request is answered (or cancelled): its session keeps the cache, its streamer ends, its caller wakes."""
        session = r.session
        if cache is not None:
            session.cache, session.cache_keys = cache, (r.keys + r.tokens)[: cache.get_seq_length()]
            session.engine.remember(session)
        if r.streamer is not None:
            r.streamer.end()
        self._done(r)

    def _fail(self, requests: list[Request], exc: BaseException) -> None:
        exc.__traceback__ = None  # its frames hold the batch's tensors (for an out-of-memory error, the memory)
        for r in list(requests):
            r.error = exc
            self._done(r)
        if requests is self.active:
            self.active, self.batch = [], None

    def _done(self, r: Request) -> None:
        with self.wake:
            r.done.set()
            self.wake.notify_all()
