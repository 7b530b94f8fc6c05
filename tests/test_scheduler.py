"""Continuous batching (`engine/scheduler.py`): every answer equals the same request answered alone.

Requests join a decoding batch at chosen token steps (a forward hook counts the steps and opens each request's
gate), leave at different lengths, wait for a slot past `max_batch`, and come back for a second turn on their own
caches: every answer must equal the same request answered alone by an engine with `max_batch=1`. The tiny model is
made unable to end early (`endless`), so every step of every row is compared.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from conftest import decode_batches, endless, image_bytes, within

from skingpt4.engine.chat import ChatEngine
from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.engine.sharing import FairLock
from skingpt4.errors import Cancelled, InputError
from skingpt4.inputs.images import load_image


def asked(engine: ChatEngine, n: int):
    """A session with its own photo and a question of its own length."""
    session = engine.session()
    session.add_image(image_bytes(noise_seed=n))
    session.ask(question(n))
    return session


def question(n: int) -> str:
    return f"case {n}: " + "what is this rash? " * (n % 4 + 1)


class Steps:
    """Counts the language model's decoding steps and the batch size of each; lets threads wait for a step."""

    def __init__(self, engine: ChatEngine):
        self.sizes: list[int] = []
        self.prefills: list[int] = []  # rows of each prefill (a forward from embeddings)
        self.changed = threading.Condition()
        self.on_step = None
        self.handle = engine.model.language_model.register_forward_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs, output) -> None:
        if kwargs.get("input_ids") is None:  # a prefill (from embeddings), not a decoding step
            self.prefills.append(kwargs["inputs_embeds"].shape[0])
            return
        with self.changed:
            self.sizes.append(kwargs["input_ids"].shape[0])
            self.changed.notify_all()
        if self.on_step is not None:
            self.on_step(len(self.sizes))

    def wait_for(self, step: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: len(self.sizes) >= step, 60), f"step {step} never came"


def together(engine: ChatEngine, work: list) -> list:
    """Run each `work[i]()` in its own thread, all queued before the scheduler takes any: the engine's lock is
    held until every request waits, so they are admitted into one batch (up to `max_batch`)."""
    results: list = [None] * len(work)

    def run(i):
        try:
            results[i] = work[i]()
        except BaseException as exc:  # returned, and asserted by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    with engine.lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while engine.status().waiting < len(work) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(120)
    return results


@pytest.fixture
def engines(loaded):
    """An engine that batches (4 at a time) and one that answers one at a time, both unable to end early."""
    batched, alone = (
        ChatEngine(loaded, settings=EngineSettings(max_batch=4, cached_sessions=6)),
        ChatEngine(loaded, settings=EngineSettings(max_batch=1)),
    )
    endless(batched)
    endless(alone)
    return batched, alone


def test_requests_joining_at_token_steps_answer_as_if_alone(engines):
    batched, alone = engines
    steps = Steps(batched)
    lengths = [24, 40, 12, 30, 18, 36]
    joins = [0, 0, 3, 7, 12, 20]  # the decoding step each request waits for before it is asked
    sessions = [asked(batched, n) for n in range(6)]
    answers: list = [None] * 6

    def consult(i):
        if joins[i]:
            steps.wait_for(joins[i])
        settings = GenerationSettings.greedy(max_new_tokens=lengths[i])
        if i % 2:  # streamed and plain answers both go through the scheduler
            answers[i] = "".join(sessions[i].stream(settings)) and sessions[i].conversation.messages[-1][1]
        else:
            answers[i] = sessions[i].answer(settings)

    threads = [threading.Thread(target=consult, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    steps.handle.remove()
    lone = []
    for n in range(6):
        session = asked(alone, n)
        lone.append(session.answer(GenerationSettings.greedy(max_new_tokens=lengths[n])))
        assert session.completion_tokens == lengths[n] == sessions[n].completion_tokens
    assert answers == lone
    # rows really joined mid-answer and left at their own lengths; never more than max_batch at once
    assert max(steps.sizes) == 4 == batched.status().peak and len(set(steps.sizes)) >= 3
    assert len(steps.sizes) < sum(lengths)  # fewer steps than one request at a time would take

    # a second turn, all at once: each continues its own cache, and answers as it would alone
    for s in sessions:
        s.ask("What treatment do you suggest?")
    second = together(batched, [lambda s=s: s.answer(GenerationSettings.greedy(max_new_tokens=16)) for s in sessions])
    assert all(s.reused_tokens > 0 for s in sessions)
    expected = []
    for n in range(6):
        session = asked(alone, n)
        session.answer(GenerationSettings.greedy(max_new_tokens=lengths[n]))
        session.ask("What treatment do you suggest?")
        expected.append(session.answer(GenerationSettings.greedy(max_new_tokens=16)))
    assert second == expected


def test_sampling_with_a_seed_and_a_repetition_penalty_are_the_same_batched(engines):
    """A seeded request draws from its own generator: batched or alone, it draws the same tokens."""
    batched, alone = engines
    settings = [
        GenerationSettings(max_new_tokens=30, seed=1),
        GenerationSettings(max_new_tokens=30, seed=2, temperature=0.7, top_p=0.8),
        GenerationSettings.greedy(max_new_tokens=30, repetition_penalty=1.3),
        GenerationSettings(max_new_tokens=30, seed=1, repetition_penalty=1.2, top_p=1.0),
    ]
    sessions = [asked(batched, n) for n in range(4)]
    together_ = together(batched, [lambda s=s, g=g: s.answer(g) for s, g in zip(sessions, settings)])
    lone = [asked(alone, n).answer(g) for n, g in enumerate(settings)]
    assert batched.status().peak == 4
    assert together_ == lone
    assert len(set(lone)) == 4  # the settings (and seeds) made four different answers


def test_one_cancelled_of_eight_leaves_at_the_next_step_and_seven_answer_as_alone(loaded, engines):
    _, alone = engines
    batched = ChatEngine(loaded, settings=EngineSettings(max_batch=8))
    assert batched.settings.cached_sessions == 8  # as many caches kept as are decoded together, by default
    endless(batched)
    steps = Steps(batched)
    cancel = threading.Event()
    steps.on_step = lambda n: cancel.set() if n == 10 else None  # during the 10th step, from the model's thread
    sessions = [asked(batched, n) for n in range(8)]
    settings = GenerationSettings.greedy(max_new_tokens=40)
    results = together(
        batched, [lambda s=s: s.answer(settings, cancel if s is sessions[3] else None) for s in sessions]
    )
    steps.handle.remove()
    assert isinstance(results[3], Cancelled)
    assert "rash" not in str(sessions[3].conversation.messages)  # the question was withdrawn, the photo stays
    assert steps.sizes == [8] * 10 + [7] * (39 - 10)
    assert steps.prefills == [8]  # eight new prompts of four lengths, prefilled in one left-padded batch
    others = [n for n in range(8) if n != 3]
    assert [results[n] for n in others] == [asked(alone, n).answer(settings) for n in others]


def test_out_of_memory_fails_that_batch_halves_the_next_and_serving_goes_on(engines, monkeypatch):
    batched, alone = engines
    real, failed = batched.llm.step, []

    def step(tokens, *args):
        if tokens.shape[0] == 4 and not failed:
            failed.append(1)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(tokens, *args)

    monkeypatch.setattr(batched.llm, "step", step)
    settings = GenerationSettings.greedy(max_new_tokens=12)
    sessions = [asked(batched, n) for n in range(4)]
    results = together(batched, [lambda s=s: s.answer(settings) for s in sessions])
    assert all(isinstance(r, torch.OutOfMemoryError) for r in results)
    assert all("rash" not in str(s.conversation.messages) for s in sessions)  # withdrawn: a retry is clean
    assert batched.status().limit == 2
    steps = Steps(batched)
    for n, s in enumerate(sessions):
        s.ask(question(n))
    retried = together(batched, [lambda s=s: s.answer(settings) for s in sessions])
    steps.handle.remove()
    assert max(steps.sizes) == 2  # the next batches held half as many rows
    assert retried == [asked(alone, n).answer(settings) for n in range(4)]


def test_out_of_memory_in_a_joint_prefill_also_halves_the_next_batch(engines, monkeypatch):
    batched, alone = engines
    real = batched.prefill

    def prefill(prompts, *args, **kwargs):
        if len(prompts) == 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(batched, "prefill", prefill)
    settings = GenerationSettings.greedy(max_new_tokens=12)
    sessions = [asked(batched, n) for n in range(4)]
    results = together(batched, [lambda s=s: s.answer(settings) for s in sessions])
    assert all(isinstance(r, torch.OutOfMemoryError) for r in results)
    assert batched.status().limit == 2
    for n, s in enumerate(sessions):
        s.ask(question(n))
    retried = together(batched, [lambda s=s: s.answer(settings) for s in sessions])
    assert retried == [asked(alone, n).answer(settings) for n in range(4)]


def test_a_photo_is_encoded_between_token_steps_not_after_the_batch(engines):
    """The engine's lock is taken in turn: a photo encoded while an answer decodes waits about one step. (The photo
    is decoded and resized first: that work, outside the lock, overlaps the steps by design and takes longer under
    load; the steps are counted from the moment the encoding asks for the model.)"""
    batched, _ = engines
    steps = Steps(batched)
    session = asked(batched, 0)
    photo = load_image(image_bytes(noise_seed=9))
    answering = threading.Thread(target=session.answer, args=(GenerationSettings.greedy(max_new_tokens=300),))
    answering.start()
    steps.wait_for(5)
    encode, asked_at = batched._encode, []
    batched._encode = lambda pixels: (asked_at.append(len(steps.sizes)), encode(pixels))[1]
    try:
        within(60, batched.encode_images, [photo])
    finally:
        batched._encode = encode
    waited = len(steps.sizes) - asked_at[0]
    answering.join(120)
    steps.handle.remove()
    assert waited <= 2 and len(steps.sizes) == 299  # it waited a step or two of the 299, not the whole answer


def test_fair_lock_is_reentrant_and_knows_its_owner():
    lock = FairLock()
    with lock:
        with lock:
            assert lock.owned()
        assert lock.owned()
    assert not lock.owned()
    with pytest.raises(RuntimeError, match="does not hold"):
        lock.release()
    order = []
    lock.acquire()
    threads = [
        threading.Thread(target=lambda i=i: (lock.acquire(), order.append(i), lock.release())) for i in range(5)
    ]
    for t in threads:  # each queues in turn behind the holder
        t.start()
        while lock._next <= threads.index(t) + 1:
            pass
    lock.release()
    for t in threads:
        t.join(10)
    assert order == [0, 1, 2, 3, 4]


def test_max_batch_one_answers_one_at_a_time_and_zero_is_refused(loaded):
    engine = ChatEngine(loaded, settings=EngineSettings(max_batch=1))
    endless(engine)
    sessions = [asked(engine, n) for n in range(2)]
    settings = GenerationSettings.greedy(max_new_tokens=6)
    with decode_batches(engine) as sizes:
        answers = together(engine, [lambda s=s: s.answer(settings) for s in sessions])
    assert sizes == [1] * 10  # each answer's first token comes from its prefill, then 5 steps of one row
    assert answers == [asked(engine, n).answer(settings) for n in range(2)]
    with pytest.raises(InputError, match="--max-batch must be at least 1"):
        EngineSettings(max_batch=0)


def test_a_request_cancelled_while_it_waits_for_a_row_leaves_the_queue_at_once(loaded):
    """Behind a full batch, a request whose client went away does not keep its place until a row is free."""
    engine = ChatEngine(loaded, settings=EngineSettings(max_batch=1))
    endless(engine)
    steps = Steps(engine)
    running = threading.Thread(target=asked(engine, 0).answer, args=(GenerationSettings.greedy(max_new_tokens=1500),))
    running.start()
    steps.wait_for(5)
    queued, cancel, outcome = asked(engine, 1), threading.Event(), []
    waiter = threading.Thread(target=lambda: outcome.append(_raised(queued.answer, GREEDY_8, cancel)))
    waiter.start()
    deadline = time.monotonic() + 30
    while engine.status().waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.status().waiting == 1
    cancel.set()
    waiter.join(10)
    at_return = len(steps.sizes)
    assert isinstance(outcome[0], Cancelled) and engine.status().waiting == 0
    running.join(120)
    steps.handle.remove()
    assert at_return < 1000 < len(steps.sizes) == 1499  # it left while the running answer was still decoding
    assert "case 1" not in str(queued.conversation.messages)  # the question was withdrawn


def test_a_waiter_interrupted_by_ctrl_c_gives_up_its_turn():
    """Ctrl+C on the main thread (which drives `diagnose` and `eval`) while it waits for the model: its place in
    the lock's queue is given up, and whoever waits behind it, and everyone after, gets the lock."""
    import signal

    lock, held, release = FairLock(), threading.Event(), threading.Event()

    def holder():
        with lock:
            held.set()
            release.wait(10)

    first = threading.Thread(target=holder)
    first.start()
    assert held.wait(5)

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    behind = threading.Thread(target=lambda: (time.sleep(0.1), lock.acquire(), lock.release()))
    behind.start()  # asks after the main thread: it waits behind the interrupted ticket
    try:
        with pytest.raises(KeyboardInterrupt):
            lock.acquire()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    release.set()
    first.join(5)
    behind.join(5)
    assert not behind.is_alive()  # it was served, not stuck behind a ticket nobody will use
    within(5, lambda: (lock.acquire(), lock.release()))


GREEDY_8 = GenerationSettings.greedy(max_new_tokens=8)


def _raised(work, *args):
    try:
        return work(*args)
    except BaseException as exc:  # returned, and asserted by the test
        return exc


def test_photos_waiting_together_are_encoded_in_one_batch_as_if_alone(loaded, monkeypatch):
    engine = ChatEngine(loaded)
    photos = [load_image(image_bytes(noise_seed=n)) for n in range(3)]
    alone = [engine.encode_images([p]) for p in photos]
    batches = []
    hook = engine.model.vision_model.register_forward_pre_hook(
        lambda module, args, kwargs: batches.append(kwargs["pixel_values"].shape[0]), with_kwargs=True
    )
    encoded = together_encoded(engine, [[p] for p in photos])
    hook.remove()
    assert batches == [3] and all(torch.equal(e, a) for e, a in zip(encoded, alone))

    def out_of_memory(module, args, kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    hook = engine.model.vision_model.register_forward_pre_hook(out_of_memory, with_kwargs=True)
    failed = together_encoded(engine, [[p] for p in photos[:2]])
    hook.remove()
    assert all(isinstance(f, torch.OutOfMemoryError) for f in failed)  # each caller of the batch is told
    assert torch.equal(engine.encode_images(photos[:1]), alone[0]) and engine.status().encoding == 0


def together_encoded(engine: ChatEngine, groups: list[list]) -> list:
    """`engine.encode_images(group)` for each group in its own thread, all queued while the lock is held."""
    results: list = [None] * len(groups)

    def run(i):
        try:
            results[i] = engine.encode_images(groups[i])
        except BaseException as exc:  # returned, and asserted by the test
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(groups))]
    with engine.lock:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while engine.status().encoding < len(groups) and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(60)
    return results
