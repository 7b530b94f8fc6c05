"""`serve --engine vllm`: vLLM's async engine behind the same surfaces as our own (`protocol.Engine`).

The HTTP API, its limits, the sandboxed image decoding, the safety rails and the records run unchanged in front of
it; only the model runs elsewhere: in vLLM, on one GPU or many (tensor and pipeline parallel, several nodes).
Sessions, prompts and answers are the same objects and rules as our engine's (`session.py`): what vLLM receives
is what the original model reads: the prompt as our token ids (the original's per-segment tokenization,
left-truncated to the context as ours is) with each photo's 32 slots folded to one `<image>` id, which the skingpt4
vLLM plugin (`backends/vllm_model.py`) unfolds in place; the photos as PIL images; the template's stop string; the
settings translated by `sampler.vllm_options`. The answer's ids come back through the same clean-up as ours.

vLLM's engine is asyncio code; our surfaces call from worker threads. The engine therefore runs its own event loop
in a background thread, and each answer is pulled from it a token step at a time; a cancelled answer (a client
that went away, Stop) is cancelled in vLLM's loop (vLLM's `generate` then aborts the request) within `POLL_S`.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import queue
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import torch

from skingpt4.engine import sampler
from skingpt4.engine.family import FamilyFormat, family_format
from skingpt4.engine.protocol import EngineStatus
from skingpt4.engine.session import ChatFormat, ChatSession, KeptImages, answered
from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.errors import InputError
from skingpt4.folder.family import family_info, family_of
from skingpt4.folder.load import ModelInfo, load_tokenizer
from skingpt4.inputs.conversation import get_template
from skingpt4.inputs.prompt import one_slot_per_image

log = logging.getLogger(__name__)
POLL_S = 0.25  # how often a waiting answer looks at its cancel flag
STOP_WAIT_S = 30.0  # a cancelled request ends in vLLM within a step; past this it is logged and left


class VllmEngine(KeptImages):
    """Our engine's interface over vLLM (`client`: vLLM's `AsyncLLM`, or a stand-in with its `generate`);
    `params` makes vLLM's `SamplingParams` from keyword arguments. vLLM encodes the photos itself, and its prefix
    caching reuses a consultation's earlier positions: a session keeps images and no cache (`KeptImages`)."""

    def __init__(self, client, folder: Path, params, settings: EngineSettings | None = None, template=None):
        """Needs the folder's config, tokenizer and `skingpt4.json` (another family's folder: its processor and
        generation config); the weights are vLLM's to load."""
        self.client, self.params, self.settings = client, params, settings or EngineSettings()
        if (family := family_of(folder)) is not None:
            self.info, self.chat = family_info(folder, family), family_format(folder, family)
        else:
            self.info = ModelInfo.of(folder)
            image_token_id = json.loads((folder / "config.json").read_text(encoding="utf-8"))["image_token_index"]
            tokenizer = load_tokenizer(folder, image_token_id)
            self.chat = ChatFormat(tokenizer, get_template(template or self.info.meta.template), image_token_id)
        self.running, self.peak, self.counting = 0, 0, threading.Lock()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-engine", daemon=True).start()
        atexit.register(self.close)

    def score(self, rows) -> list[float]:
        raise InputError("choice scoring reads the model's logits here: run it on our engine, not --engine vllm")

    def status(self) -> EngineStatus:
        with self.counting:
            return EngineStatus(self.running, 0, self.settings.max_batch, self.peak)

    def close(self) -> None:
        """Stop vLLM's processes and this engine's loop; once, whoever calls first (a command, or the interpreter
        on its way out: vLLM's own clean-up cannot run once the interpreter has begun to tear down)."""
        client, self.client = self.client, None
        if client is None:
            return
        if shutdown := getattr(client, "shutdown", None):
            shutdown()
            client.shutdown = lambda *args, **kwargs: None  # vLLM's __del__ calls it again, maybe mid tear-down
        self.loop.call_soon_threadsafe(self.loop.stop)

    def generate(self, sessions: list[ChatSession], settings=None, streamer=None, cancel=None) -> list[str]:
        """Answer each session's pending question, all sent to vLLM at once (`protocol.Engine.generate`)."""
        settings = settings or GenerationSettings()

        def produce() -> list[list[int]]:
            if len(sessions) == 1:
                return [self._new_ids(sessions[0], settings, streamer, cancel)]
            with ThreadPoolExecutor(len(sessions)) as pool:
                return list(pool.map(lambda s: self._new_ids(s, settings, None, cancel), sessions))

        return answered(sessions, settings, self.chat, streamer, cancel, produce)

    def request(self, session: ChatSession, settings: GenerationSettings) -> tuple[dict, int | None]:
        """vLLM's prompt for the session's pending question (one `<image>` id per kept photo) and its length in
        the model's positions (each photo 32). Another family's: its chat template's text as token ids, one
        placeholder per photo as the template writes it, which vLLM's processor for the family expands as the
        family's own processor does; its length comes back with vLLM's answer."""
        if isinstance(self.chat, FamilyFormat):
            text = self.chat.text(session)
            ids = self.chat.tokenizer(text, add_special_tokens=not self.chat.writes_bos(text)).input_ids
            images, length = session.photos, None
        else:
            ids, images, _ = self.chat.prompt(session, settings)
            ids, length = one_slot_per_image(ids, self.chat.image_token_id), len(ids)
        inputs = {"prompt_token_ids": ids}
        if images:
            inputs["multi_modal_data"] = {"image": list(images)}
        return inputs, length

    def _new_ids(self, session: ChatSession, settings: GenerationSettings, streamer, cancel) -> list[int]:
        params = self.params(**sampler.vllm_options(settings, self.chat.stops(settings)))
        prompt, session.prompt_tokens = self.request(session, settings)
        ids: list[int] = []
        with self._counted():
            for output in self.token_ids(prompt, params, cancel or threading.Event()):
                new = list(output.outputs[0].token_ids)
                if streamer is not None:
                    streamer.put(torch.tensor(new[len(ids) :], dtype=torch.long))
                ids = new
                if session.prompt_tokens is None:  # as vLLM's processor expanded the photos
                    session.prompt_tokens = len(output.prompt_token_ids)
        if streamer is not None:
            streamer.end()
        return ids

    @contextmanager
    def _counted(self):
        """Count a request in flight (`status`)."""
        with self.counting:
            self.running += 1
            self.peak = max(self.peak, self.running)
        try:
            yield
        finally:
            with self.counting:
                self.running -= 1

    def token_ids(self, prompt: dict, params, cancel: threading.Event):
        """Yield vLLM's outputs for the request as it produces them (each with the answer's token ids so far).
        On `cancel`, or when the consumer stops reading, the request is cancelled in vLLM's loop (vLLM's `generate`
        aborts it then), and this waits until it has ended there (at most `STOP_WAIT_S`; past that it is logged,
        never raised over the answer's own outcome)."""
        outputs: queue.Queue = queue.Queue()
        generating = self.client.generate(prompt, params, f"skingpt4-{uuid.uuid4().hex}")
        job = asyncio.run_coroutine_threadsafe(_pump(generating, outputs.put), self.loop)
        try:
            while (item := _next_output(outputs, cancel)) is not None and item is not _ENDED:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            job.cancel()  # nothing to do when it has ended
            if not wait([job], STOP_WAIT_S).done:
                log.warning("a cancelled vLLM request had not ended after %.0f s; left to vLLM", STOP_WAIT_S)


_ENDED = object()  # a request's last item in its queue


async def _pump(generating, put) -> None:
    """In vLLM's loop: pass a request's outputs on as they come, then an error if one was raised, then `_ENDED`.
    Cancelling this (the answer was cancelled) raises `CancelledError` inside vLLM's `generate`, which aborts."""
    try:
        async for output in generating:
            put(output)
    except asyncio.CancelledError:
        pass
    except Exception as exc:  # handed to the answering thread
        put(exc)
    finally:
        put(_ENDED)


def _next_output(outputs: queue.Queue, cancel: threading.Event):
    """The next item of a request's queue; None once `cancel` is set."""
    while not cancel.is_set():
        try:
            return outputs.get(timeout=POLL_S)
        except queue.Empty:
            pass
    return None
