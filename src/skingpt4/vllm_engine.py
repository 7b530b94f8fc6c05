"""`serve --engine vllm`: vLLM's async engine behind the same surfaces as our own `ChatEngine`.

A `VllmEngine` has the chat engine's shape (`session()`, `encode_images`, `loaded`, `max_batch`), so the HTTP API,
its limits, the sandboxed image decoding, the safety rails and the records run unchanged in front of it; only the
model runs elsewhere: in vLLM, on one GPU or many (tensor and pipeline parallel, several nodes).

What vLLM receives is what the original model reads: the prompt as our token ids (`processing.prompt_ids`, the
original's per-segment tokenization, left-truncated to the context as ours is) with each photo's 32 slots folded to
one `<image>` id, which the skingpt4 vLLM plugin (`vllm_model.py`) unfolds in place; the photos as PIL images;
the template's stop string with every request; and a model that never emits `<image>`. The answer's token ids come
back through the same clean-up as our engine's (`decoding.TextPieces`), so the text rules are one.

vLLM's engine is asyncio code; our surfaces call from worker threads. The engine therefore runs its own event loop
in a background thread, and each answer is pulled from it a token step at a time; a cancelled answer (a client
that went away, Stop) is aborted in vLLM within a quarter second.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skingpt4.chat import ChatEngine, Session
from skingpt4.conversation import get_template
from skingpt4.decoding import TextPieces
from skingpt4.errors import Cancelled, InputError
from skingpt4.folder import ModelMeta
from skingpt4.generation import MAX_BATCH, TOP_K, GenerationSettings
from skingpt4.processing import one_slot_per_image
from skingpt4.serving_files import ARCHITECTURE

POLL_S = 0.25  # how often a waiting answer looks at its cancel flag
STOP_WAIT_S = 30.0  # a cancelled request ends in vLLM within a step; past this something is wrong


@dataclass
class VllmOptions:
    """What `serve --engine vllm` passes to vLLM's engine arguments (one home for each default)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"  # vLLM's choice: the folder's dtype (float16 from `convert`)
    max_model_len: int = GenerationSettings.__dataclass_fields__["max_context"].default
    max_images: int = 4  # per prompt (vLLM reserves encoder memory for this many)
    extra: dict = field(default_factory=dict)  # any other `AsyncEngineArgs` field (--vllm-arg KEY=VALUE)

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise InputError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
        if taken := sorted(set(self.extra) & set(self.engine_args(Path()))):
            raise InputError(f"--vllm-arg {taken[0]}: set by skingpt4 (use its own flag where it has one)")

    def engine_args(self, folder: Path) -> dict:
        return dict(
            model=str(folder),
            tokenizer=str(folder),
            hf_overrides={"architectures": [ARCHITECTURE]},  # folders made before the plugin existed too
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            limit_mm_per_prompt={"image": self.max_images},
        )


def open_vllm(model: str, options: VllmOptions, max_batch: int = MAX_BATCH, template: str | None = None):
    """Start vLLM's async engine on a model folder, or `tiny` (needs `pip install "skingpt4[vllm]"` and GPUs)."""
    from skingpt4.model import resolve_model_path

    folder = resolve_model_path(model)
    try:
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise InputError(f'--engine vllm needs vLLM: pip install "skingpt4[vllm]" ({exc})') from None
    args = AsyncEngineArgs(**options.engine_args(folder), max_num_seqs=max_batch, **options.extra)
    return VllmEngine(AsyncLLM.from_engine_args(args), folder, SamplingParams, max_batch, template)


@dataclass
class Served:
    """What the surfaces read of a loaded model (`model.LoadedModel`'s fields), for a model that vLLM runs."""

    tokenizer: object
    meta: ModelMeta
    model_id: str
    path: Path
    image_token_id: int

    @property
    def warning(self) -> str | None:
        return self.meta.warning


class VllmEngine:
    """A `ChatEngine` look-alike whose model runs in vLLM (`client`: vLLM's `AsyncLLM`, or a stand-in with its
    `generate` and `abort`); `params` makes vLLM's `SamplingParams` from keyword arguments."""

    def __init__(self, client, folder: Path, params, max_batch: int = MAX_BATCH, template: str | None = None):
        """Needs the folder's config, tokenizer and `skingpt4.json`; the weights are vLLM's to load."""
        from skingpt4.model import load_tokenizer, model_id

        self.client, self.params, self.max_batch = client, params, max_batch
        meta = ModelMeta.load(folder)
        image_token_id = json.loads((folder / "config.json").read_text(encoding="utf-8"))["image_token_index"]
        tokenizer = load_tokenizer(folder, image_token_id)
        self.loaded = Served(tokenizer, meta, model_id(folder, meta), folder, image_token_id)
        self.tokenizer, self.template = tokenizer, get_template(template or meta.template)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="vllm-engine", daemon=True).start()

    def session(self) -> VllmSession:
        return VllmSession(self)

    def encode_images(self, images: list) -> list:
        """vLLM encodes the photos itself (its ViT and Q-Former): a session keeps the images."""
        return list(images)

    answer_text = ChatEngine.answer_text  # the one clean-up rule (template, stops, special tokens)

    prompt = ChatEngine.prompt  # the same prompt ids, truncation and kept photos as our engine's
    stops = ChatEngine.stops

    def request(self, session: Session, settings: GenerationSettings) -> tuple[dict, int]:
        """vLLM's prompt for the session's pending question (one `<image>` id per kept photo) and its length in
        the model's positions (each photo 32)."""
        ids, images, _ = self.prompt(session, settings)
        inputs = {"prompt_token_ids": one_slot_per_image(ids, self.loaded.image_token_id)}
        if images:
            inputs["multi_modal_data"] = {"image": images}
        return inputs, len(ids)

    def sampling(self, settings: GenerationSettings):
        return self.params(**sampling_options(settings, self.stops(settings)))

    def token_ids(self, prompt: dict, params, cancel: threading.Event):
        """Yield the answer's token ids as vLLM produces them (all so far, each time). On `cancel`, or when the
        consumer stops reading, the request is cancelled in vLLM's loop (vLLM's `generate` aborts it then), and
        this waits until it has ended there."""
        outputs: queue.Queue = queue.Queue()
        generating = self.client.generate(prompt, params, f"skingpt4-{uuid.uuid4().hex}")
        job = asyncio.run_coroutine_threadsafe(_pump(generating, outputs.put), self.loop)
        item = outputs.get(timeout=STOP_WAIT_S)  # _STARTED: from now on the pump always ends with _ENDED
        try:
            while (item := _next_output(outputs, cancel)) is not None and item is not _ENDED:
                if isinstance(item, BaseException):
                    raise item
                yield list(item.outputs[0].token_ids)
        finally:
            job.cancel()  # nothing to do when it has ended
            while item is not _ENDED:
                item = outputs.get(timeout=STOP_WAIT_S)

    def close(self) -> None:
        if shutdown := getattr(self.client, "shutdown", None):
            shutdown()
        self.loop.call_soon_threadsafe(self.loop.stop)


class VllmSession(Session):
    """A consultation's photos and turns, answered by vLLM. No key/value cache is kept here: vLLM's prefix caching
    reuses a conversation's earlier positions on its side."""

    def stream(self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None):
        settings, cancel = settings or GenerationSettings(), cancel or threading.Event()
        if not self.conversation.awaiting_answer:
            raise InputError("ask a question first")
        engine, produced = self.engine, 0
        streamer = TextPieces(engine.tokenizer, engine.answer_text(settings))
        streamer.prompt_seen = True  # vLLM sends the new ids only
        try:
            if settings.num_beams > 1 or settings.repetition_penalty != 1.0:
                raise InputError(
                    "num_beams and repetition_penalty need the embedded engine: vLLM has no beam search here, and "
                    "its repetition penalty also counts the prompt (the original's counts the answer only)"
                )
            prompt, self.prompt_tokens = engine.request(self, settings)
            for ids in engine.token_ids(prompt, engine.sampling(settings), cancel):
                streamer.put(torch.tensor(ids[produced:]))
                produced = len(ids)
                yield from streamer.ready()
            if cancel.is_set():
                raise Cancelled("generation cancelled")
            streamer.end()
            yield from streamer.ready()
        except BaseException:  # the question goes back: a retry must not pile up unanswered turns
            self.conversation.drop_question()
            raise
        self.completion_tokens = produced
        self.conversation.add_answer(streamer.answer.text)

    def answer(self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None) -> str:
        for _ in self.stream(settings, cancel):
            pass
        return self.conversation.messages[-1][1]

    def settle(self) -> int:
        return 0


def sampling_options(settings: GenerationSettings, stops: list[str]) -> dict:
    """vLLM `SamplingParams` fields for our settings: the original's sampling (top-k 50, transformers' default,
    then top-p and temperature) or greedy (temperature 0), the answer budget, the stop strings, a seed."""
    options = dict(max_tokens=settings.max_new_tokens, stop=[s for s in stops if s], seed=settings.seed)
    if settings.do_sample:
        options.update(temperature=settings.temperature, top_p=settings.top_p, top_k=TOP_K)
    else:
        options.update(temperature=0.0)
    return options


_STARTED, _ENDED = object(), object()  # a request's first and last items in its queue


async def _pump(generating, put) -> None:
    """In vLLM's loop: pass a request's outputs on as they come, then an error if one was raised, then `_ENDED`.
    Cancelling this (the answer was cancelled) raises `CancelledError` inside vLLM's `generate`, which aborts.
    `_STARTED` comes first: a task cancelled before its first step would never run its `finally`."""
    try:
        put(_STARTED)
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
