"""Our engine for the other model families (`folder/family.py`): the surfaces' `protocol.Engine` over the family's
own transformers model, processor and chat template.

Exact by construction: a prompt is the family's chat template rendered from the consultation
(`inputs/family_prompt.py`) and its processor's inputs; an answer is the model's own `generate` on them, with its
own generation config (its EOS ids) and our settings. What is ours is around it: the stop strings, the cancel flag
(`decoding.StopWhen`, checked after each step: they end an answer, never change its ids), the stream, the reasoning
kept apart, the rails and records of the surfaces. The sessions of one `generate` call (a `diagnose` or `eval`
batch) are decoded together, `--max-batch` at a time, left-padded as the family's processor pads a batch; calls from
several threads (API clients) take turns, one batch at a time.
"""

from __future__ import annotations

import copy
import threading
from contextlib import contextmanager

import torch

from skingpt4.engine.decoding import StopWhen, TokenBytes
from skingpt4.engine.protocol import EngineStatus
from skingpt4.engine.sampler import TOP_K
from skingpt4.engine.session import ChatFormat, ChatSession, answered
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
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.end_id = eos[0] if isinstance(eos, list) else eos  # ends a choice-mode target sentence

    def conversation(self) -> FamilyConversation:
        return FamilyConversation(self.template, special_tokens=self.special_tokens, max_images=self.family.max_images)

    def text(self, session: ChatSession) -> str:
        """The prompt as the family's chat template writes it."""
        messages = session.conversation.chat_messages(self.family.system)
        return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)

    def inputs(self, session: ChatSession):
        """The processor's inputs for the session's next answer (a batch of one)."""
        text, bos = self.text(session), self.tokenizer.bos_token
        return self.processor(
            text=[text],
            images=list(session.photos) or None,
            return_tensors="pt",
            add_special_tokens=not (bos and text.startswith(bos)),  # a template that writes BOS itself
        )

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


class FamilyEngine:
    """`protocol.Engine` over a family folder's model (`folder.family.load_family`)."""

    def __init__(self, loaded: LoadedFamily, settings: EngineSettings | None = None):
        self.model, self.info, self.settings = loaded.model, loaded.info, settings or EngineSettings()
        context = loaded.model.config.get_text_config().max_position_embeddings
        self.chat = FamilyFormat(loaded.processor, loaded.family, loaded.model.generation_config, context)
        self.pieces = TokenBytes(self.chat.tokenizer)
        self.turn, self.counting = threading.Lock(), threading.Lock()
        self.running = self.waiting = self.peak = 0

    def session(self) -> ChatSession:
        return ChatSession(self)

    def encode_images(self, images: list) -> list:
        """The family's processor reads the photos when a prompt is made: a session keeps the images."""
        return list(images)

    def settle(self, session: ChatSession) -> int:
        return 0

    def status(self) -> EngineStatus:
        with self.counting:
            return EngineStatus(self.running, self.waiting, self.settings.max_batch, self.peak)

    def close(self) -> None:
        pass

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

    @torch.no_grad()
    def _decode(self, inputs: list, settings: GenerationSettings, streamer, cancel) -> list[list[int]]:
        batch = collate(inputs, self.chat.tokenizer.pad_token_id).to(self.model.device)
        stop = StopWhen(self.pieces, self.chat.stops(settings), cancel)
        with self._turn(len(inputs)):
            if settings.do_sample and settings.seed is not None:
                torch.manual_seed(settings.seed)
            out = self.model.generate(
                **batch,
                generation_config=self.generation_config(settings),
                stopping_criteria=[stop],
                streamer=AfterPrompt(streamer) if streamer is not None else None,
            )
        new = out[:, batch["input_ids"].shape[1] :].tolist()
        return [self.chat.trimmed(ids) for ids in new]

    def generation_config(self, settings: GenerationSettings):
        """The folder's own generation config (its EOS ids) with the request's settings."""
        config = copy.deepcopy(self.model.generation_config)
        s = settings
        config.update(max_new_tokens=s.max_new_tokens, do_sample=s.do_sample, num_beams=s.num_beams)
        config.update(repetition_penalty=s.repetition_penalty)
        sampling = dict(temperature=s.temperature, top_k=TOP_K, top_p=s.top_p)
        config.update(**(sampling if s.do_sample else dict.fromkeys(sampling)))
        return config

    @contextmanager
    def _turn(self, rows: int):
        """One batch at a time; `status` counts the rows waiting for their turn and those decoding."""
        with self.counting:
            self.waiting += rows
        with self.turn:
            with self.counting:
                self.waiting -= rows
                self.running, self.peak = rows, max(self.peak, rows)
            try:
                yield
            finally:
                with self.counting:
                    self.running = 0

    @torch.no_grad()
    def score(self, rows) -> list[float]:
        """Each (prompt ids, [processor inputs], target ids): the target's summed log-probability after the prompt,
        one sequence at a time (choice-mode evaluation)."""
        scores = []
        for ids, (inputs,), target in rows:
            batch = extended(inputs, target).to(self.model.device)
            with self._turn(1):
                logits = self.model(**batch).logits[0, len(ids) - 1 : len(ids) + len(target) - 1].float()
            picked = torch.log_softmax(logits, -1).gather(-1, torch.tensor(target, device=logits.device)[:, None])
            scores.append(float(picked.sum()))
        return scores


def sequence_keys(inputs) -> list[str]:
    """The processor outputs that run along the prompt (ids, mask, token types): padded, not concatenated."""
    length = inputs["input_ids"].shape[1]
    return [k for k, v in inputs.items() if torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, length)]


def collate(inputs: list, pad_id: int):
    """Prompts' processor inputs as one batch: sequences left-padded (pad id, mask and token types 0), the photos'
    tensors (pixels, grids) concatenated in order, as the family's processor makes a batch."""
    from transformers import BatchFeature

    if len(inputs) == 1:
        return inputs[0]
    length = max(one["input_ids"].shape[1] for one in inputs)
    batch = {}
    for key in dict.fromkeys(k for one in inputs for k in one.keys()):
        parts = [one[key] for one in inputs if key in one]
        if key in sequence_keys(inputs[0]):
            fill = pad_id if key == "input_ids" else 0
            parts = [torch.nn.functional.pad(p, (length - p.shape[1], 0), value=fill) for p in parts]
        batch[key] = torch.cat(parts)
    return BatchFeature(batch)


def extended(inputs, target: list[int]):
    """The processor inputs with `target` appended to the prompt (mask 1, token type 0: text)."""
    from transformers import BatchFeature

    out = dict(inputs)
    for key in sequence_keys(inputs):
        tail = (
            torch.tensor([target])
            if key == "input_ids"
            else torch.full((1, len(target)), int(key == "attention_mask"))
        )
        out[key] = torch.cat([inputs[key], tail.to(inputs[key].dtype)], dim=1)
    return BatchFeature(out)


class AfterPrompt:
    """transformers' streamer protocol in front of ours: `generate` first puts the prompt ids, then each step's."""

    def __init__(self, streamer):
        self.streamer, self.prompt_seen = streamer, False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.streamer.put(value)
        self.prompt_seen = True

    def end(self) -> None:
        self.streamer.end()


def open_family(options, family) -> FamilyEngine:
    """The engine for a family folder, on `--device` in `--dtype` (default: float32 on the CPU, bfloat16 on a GPU,
    as the families are published) or spread by `--device-map`."""
    from skingpt4.folder.family import load_family
    from skingpt4.folder.load import DTYPES, resolve_device, resolve_dtype, resolve_model_path

    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device) if options.dtype or device == "cpu" else DTYPES["bfloat16"]
    loaded = load_family(resolve_model_path(options.model), family, device, dtype, options.device_map)
    return FamilyEngine(loaded, options.settings)
