"""Our engine for the other model families (`folder/family.py`): the surfaces' `protocol.Engine` over the family's
own transformers model, processor and chat template.

Exact by construction: a prompt is the family's chat template rendered from the consultation
(`inputs/family_prompt.py`) and its processor's inputs; an answer is the model's own `generate` on them, with its
own generation config (its EOS ids) and our settings. What is ours is around it: the stop strings, the cancel flag
(`decoding.StopWhen`, checked after each step: they end an answer, never change its ids), the stream, the reasoning
kept apart, the rails and records of the surfaces. One decode thread runs the model; requests queue for it and are
decoded together, `--max-batch` rows at a time, left-padded as the family's processor pads a batch: the sessions of
one `generate` call (a `diagnose` or `eval` batch) and the requests of other threads (API clients) waiting
meanwhile. A batch runs to its longest answer (static batching: a request that arrives during one waits for the
next).
"""

from __future__ import annotations

import copy
import threading

import torch

from skingpt4.engine.decoding import StopWhen, TokenBytes
from skingpt4.engine.family_batch import Job, RowsCancelled, RowStreams, collate, extended
from skingpt4.engine.protocol import EngineStatus
from skingpt4.engine.sampler import TOP_K
from skingpt4.engine.session import ChatFormat, ChatSession, KeptImages, answered
from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.errors import InputError
from skingpt4.folder.family import LoadedFamily
from skingpt4.inputs.family_prompt import FamilyConversation, ThinkingAnswer, family_template


class FamilyFormat(ChatFormat):
    """The family's processor and chat template: consultations in, processor inputs out; answers cleaned as ours
    are (the request's stops, special tokens, control characters), a leading thought kept apart."""

    def __init__(self, processor, family, generation_config, context: int):
        tokenizer = processor.tokenizer
        super().__init__(tokenizer, family_template(family.name), image_token_id=None)
        self.processor, self.family, self.context = processor, family, context
        added = {t.content for t in tokenizer.added_tokens_decoder.values() if t.special}
        self.special_tokens = tuple(sorted(added | set(self.special_tokens)))
        eos = generation_config.eos_token_id
        self.eos_ids = list(eos) if isinstance(eos, list) else [eos]
        self.end_id = self._turn_end()  # ends a choice-mode target sentence, as the model ends an answer

    def _turn_end(self) -> int:
        """The EOS id the chat template writes after an answer (Gemma's `<end_of_turn>`, Qwen's `<|im_end|>`), else
        the first EOS id (LLaVA-1.5's template writes none: its answers end with `</s>`)."""
        said = [{"role": r, "content": [{"type": "text", "text": "x"}]} for r in ("user", "assistant")]
        text = self.processor.apply_chat_template(said, tokenize=False)
        after = self.tokenizer(text[text.rindex("x") + 1 :], add_special_tokens=False).input_ids
        return next((i for i in after if i in self.eos_ids), self.eos_ids[0])

    def conversation(self) -> FamilyConversation:
        return FamilyConversation(self.template, special_tokens=self.special_tokens, max_images=self.family.max_images)

    def text(self, session: ChatSession) -> str:
        """The prompt as the family's chat template writes it."""
        messages = session.conversation.chat_messages(self.family.system, self.family.system_in_question)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, session: ChatSession):
        """The processor's inputs for the session's next answer (a batch of one)."""
        text = self.text(session)
        return self.processor(
            text=[text],
            images=list(session.photos) or None,
            return_tensors="pt",
            add_special_tokens=not self.writes_bos(text),
        )

    def writes_bos(self, text: str) -> bool:
        """Whether the chat template wrote the BOS token itself (Gemma's): the tokenizer must then add none."""
        bos = self.tokenizer.bos_token
        return bool(bos) and text.startswith(bos)

    def prompt(self, session: ChatSession, settings: GenerationSettings) -> tuple[list[int], list, int]:
        """The prompt ids (photos expanded to their tokens) and, as its only "photo", the processor's inputs."""
        inputs = self.inputs(session)
        ids = inputs["input_ids"][0].tolist()
        if len(ids) + settings.max_new_tokens > self.context:
            raise InputError(
                f"this consultation is {len(ids)} tokens with its photos; with {settings.max_new_tokens} for the "
                f"answer it passes the model's context of {self.context}: start a new consultation"
            )
        return ids, [inputs], 0

    def answer_text(self, settings: GenerationSettings) -> ThinkingAnswer:
        return ThinkingAnswer(self.template, settings.stop, self.special_tokens)

    def trimmed(self, ids: list[int]) -> list[int]:
        """An answer's ids up to its EOS (the rows of a batch that ended early are padded after it)."""
        end = next((i for i, t in enumerate(ids) if t in self.eos_ids), len(ids))
        ids = ids[:end]
        while ids and ids[-1] == self.tokenizer.pad_token_id:
            ids.pop()
        return ids


class FamilyEngine(KeptImages):
    """`protocol.Engine` over a family folder's model (`folder.family.load_family`); its processor reads the photos
    when a prompt is made (`KeptImages`)."""

    def __init__(self, loaded: LoadedFamily, settings: EngineSettings | None = None):
        self.model, self.info, self.settings = loaded.model, loaded.info, settings or EngineSettings()
        context = loaded.model.config.get_text_config().max_position_embeddings
        self.chat = FamilyFormat(loaded.processor, loaded.family, loaded.model.generation_config, context)
        self.pieces = TokenBytes(self.chat.tokenizer)
        self.turn, self.counting = threading.Lock(), threading.Lock()  # the model; the queue and the counts
        self.wake = threading.Condition(self.counting)
        self.queue: list[Job] = []
        self.running = self.peak = 0
        self.worker: threading.Thread | None = None
        self.closed = False

    def status(self) -> EngineStatus:
        with self.counting:
            waiting = sum(len(job.inputs) for job in self.queue)
            return EngineStatus(self.running, waiting, self.settings.max_batch, self.peak)

    def close(self) -> None:
        """Stop the decode thread once the batch in progress ends (a server's engine, at shutdown)."""
        with self.counting:
            self.closed, waiting, self.queue = True, self.queue, []
            self.wake.notify_all()
        for job in waiting:
            job.error = InputError("the engine was closed before this request was answered")
            job.done.set()

    def generate(self, sessions, settings: GenerationSettings, streamer=None, cancel=None) -> list[str]:
        def produce():
            inputs = [self.chat.prompt(s, settings)[1][0] for s in sessions]
            for session, one in zip(sessions, inputs):
                session.prompt_tokens, session.reused_tokens = one["input_ids"].shape[1], 0
            size, answers = self.settings.max_batch, []
            for start in range(0, len(inputs), size):
                answers += self._decode(inputs[start : start + size], settings, streamer, cancel)
            return answers

        return answered(sessions, settings, self.chat, streamer, cancel, produce)

    def _decode(self, inputs: list, settings: GenerationSettings, streamer, cancel) -> list[list[int]]:
        """These rows' new ids, from the decode thread: the request waits in its queue meanwhile."""
        job = Job(inputs, settings, streamer, cancel)
        with self.counting:
            if self.closed:
                raise InputError("the engine is closed")
            if self.worker is None:
                self.worker = threading.Thread(target=self._work, name="family-decode", daemon=True)
                self.worker.start()
            self.queue.append(job)
            self.wake.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _work(self) -> None:
        """The decode thread, the one that runs `generate` (one thread: PyTorch's CPU thread pool is made once, not
        per request). It takes the oldest request with every waiting one that can join it (`Job.joins`), up to
        `--max-batch` rows, and hands each its answer."""
        while True:
            with self.counting:
                self.wake.wait_for(lambda: self.queue or self.closed)
                if self.closed:
                    return
            with self.turn:
                self._run(self._take())

    def _take(self) -> list[Job]:
        """The oldest job and the waiting jobs that join it, in arrival order, as many as fit in `--max-batch`
        rows."""
        with self.counting:
            job = self.queue[0]
            taken, rows = [job], len(job.inputs)
            for other in self.queue:
                if other is not job and job.joins(other) and rows + len(other.inputs) <= self.settings.max_batch:
                    taken.append(other)
                    rows += len(other.inputs)
            self.queue = [j for j in self.queue if j not in taken]
            self.running, self.peak = rows, max(self.peak, rows)
        return taken

    def _run(self, jobs: list[Job]) -> None:
        """Decode the jobs' rows as one batch; each job hears of its answers, or of the error (out of memory...)."""
        try:
            new = iter(self._generate(jobs))
            for job in jobs:
                job.result = [self.chat.trimmed(next(new)) for _ in job.inputs]
        except BaseException as exc:
            for job in jobs:
                job.error = exc
        finally:
            with self.counting:
                self.running = 0
            for job in jobs:
                job.done.set()

    @torch.no_grad()
    def _generate(self, jobs: list[Job]) -> list[list[int]]:
        rows = [one for job in jobs for one in job.inputs]
        batch = collate(rows, self.chat.tokenizer.pad_token_id).to(self.model.device)
        settings = jobs[0].settings
        stops = [StopWhen(self.pieces, self.chat.stops(settings)), RowsCancelled(jobs)]
        streams = [s for job in jobs for s in [job.streamer] + [None] * (len(job.inputs) - 1)]
        if settings.do_sample and settings.seed is not None:  # such a job runs alone (`Job.joins`)
            torch.manual_seed(settings.seed)
        out = self.model.generate(
            **batch,
            generation_config=self.generation_config(settings),
            stopping_criteria=stops,
            streamer=RowStreams(streams) if any(streams) else None,
        )
        return out[:, batch["input_ids"].shape[1] :].tolist()

    def generation_config(self, settings: GenerationSettings):
        """The folder's own generation config (its EOS ids) with the request's settings."""
        config = copy.deepcopy(self.model.generation_config)
        s = settings
        config.update(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, num_beams=s.num_beams)
        config.update(repetition_penalty=s.repetition_penalty)
        sampling = dict(temperature=s.temperature, top_k=TOP_K, top_p=s.top_p)
        config.update(**(sampling if s.do_sample else dict.fromkeys(sampling)))
        return config

    @torch.no_grad()
    def score(self, rows) -> list[float]:
        """Each (prompt ids, [processor inputs], target ids): the target's summed log-probability after the prompt,
        one sequence at a time (choice-mode evaluation)."""
        scores = []
        for ids, (inputs,), target in rows:
            batch = extended(inputs, target).to(self.model.device)
            with self.turn:
                logits = self.model(**batch).logits[0, len(ids) - 1 : len(ids) + len(target) - 1].float()
            picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(target, device=logits.device)[:, None])
            scores.append(float(picked.sum()))
        return scores


def family_format(folder, family) -> FamilyFormat:
    """A family folder's prompt format without its weights (vLLM loads those): its processor, generation config
    and context."""
    from transformers import GenerationConfig

    from skingpt4.folder.family import load_processor, pixel_options, text_config

    processor = load_processor(folder, pixel_options(folder, family))
    try:
        config = GenerationConfig.from_pretrained(folder)
    except OSError:  # no generation_config.json: the tokenizer's EOS
        config = GenerationConfig(eos_token_id=processor.tokenizer.eos_token_id)
    return FamilyFormat(processor, family, config, text_config(folder)["max_position_embeddings"])


def open_family(options, family) -> FamilyEngine:
    """The engine for a family folder, on `--device` in `--dtype` (default: float32 on the CPU, bfloat16 on a GPU,
    as the families are published) or spread by `--device-map`."""
    from skingpt4.folder.family import load_family
    from skingpt4.folder.load import DTYPES, resolve_device, resolve_dtype, resolve_model_path

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device) if options.dtype or device == "cpu" else DTYPES["bfloat16"]
    loaded = load_family(resolve_model_path(options.model), family, device, dtype, options.device_map)
    return FamilyEngine(loaded, options.settings)
