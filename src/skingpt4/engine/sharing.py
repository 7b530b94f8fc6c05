"""Sharing one model between threads: a lock taken in turn, and calls that wait for it served as one batch.

The engine's model is used by every surface at once: the scheduler's token steps (`scheduler.py`),
photos being encoded, beam searches, idle-time cache preparation. Whatever runs the model holds the engine's
`FairLock`; `Gathered` lets the photos of several callers that wait for it be encoded in one forward pass.
"""

from __future__ import annotations

import threading

import torch


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
        self._abandoned: set[int] = set()  # tickets of waiters that gave up (Ctrl+C while waiting)

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            ticket, self._next = self._next, self._next + 1
            try:
                while self._serving != ticket:
                    self._cond.wait()
            except BaseException:  # interrupted while waiting: the ticket is skipped, whoever is behind goes on
                if self._serving == ticket:
                    self._advance()
                else:
                    self._abandoned.add(ticket)
                raise
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("release of a lock this thread does not hold")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._advance()

    def _advance(self) -> None:
        """Serve the next ticket that is still wanted."""
        self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.remove(self._serving)
            self._serving += 1
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
