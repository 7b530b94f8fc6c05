"""A consultation as every engine holds it, and the one rule for turning it into the model's input and back.

`ChatFormat` is how a conversation becomes prompt ids (the original's per-segment tokenization, 32 slots per photo,
left-truncated to the context without cutting a photo in half) and how generated ids become the shown answer (the
template's and the request's stop strings, this tokenizer's special tokens). `ChatSession` is one consultation:
its photos (as its engine encoded them), its turns, and what its engine keeps for it between turns. Every engine
(`chat.py`, `vllm.py`, `family.py`) uses these two, so the rules are one; `family.py`'s format is a `ChatFormat`
whose prompt is another family's chat template. `KeptImages` is what the engines whose model reads the photos
itself share.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from skingpt4.engine.decoding import TextPieces
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import Cancelled, InputError
from skingpt4.inputs.conversation import AnswerText, Conversation, Template
from skingpt4.inputs.images import DEFAULT_LIMITS, load_image, read_source, sha256_bytes
from skingpt4.inputs.prompt import prompt_ids, truncate_left

log = logging.getLogger(__name__)
JOIN_S = 30.0  # a cancelled answer's thread ends within a token step (or a queue poll); past this, it is left


class ChatFormat:
    """A tokenizer and a template: prompts in, answers out."""

    def __init__(self, tokenizer, template: Template, image_token_id: int):
        self.tokenizer, self.template, self.image_token_id = tokenizer, template, image_token_id
        self.special_tokens = tuple(tokenizer.all_special_tokens)
        self.end_id = tokenizer.eos_token_id  # ends a choice-mode target sentence where the template has no stop

    def conversation(self) -> Conversation:
        return Conversation(self.template, special_tokens=self.special_tokens)

    def prompt(self, session: ChatSession, settings: GenerationSettings) -> tuple[list[int], list, int]:
        """The session's prompt ids, left-truncated to leave room for the answer, the photos kept (as the session
        holds them) and how many were dropped from the left."""
        ids = prompt_ids(self.tokenizer, session.conversation.prompt(), self.image_token_id)
        ids, dropped = truncate_left(ids, settings.max_context - settings.max_new_tokens, self.image_token_id)
        return ids, session.photos[dropped:], dropped

    def stops(self, settings: GenerationSettings) -> list[str]:
        return [s for s in (self.template.stop, *settings.stop) if s]

    def answer_text(self, settings: GenerationSettings) -> AnswerText:
        """The clean-up of one answer: the template's and the request's stops, this tokenizer's special tokens."""
        return AnswerText(self.template, settings.stop, self.special_tokens)

    def text_pieces(self, settings: GenerationSettings) -> TextPieces:
        """A streamer that turns an answer's ids into its shown text as they come."""
        return TextPieces(self.tokenizer, self.answer_text(settings))

    def finished(self, ids: list[int], settings: GenerationSettings) -> AnswerText:
        """A whole answer's clean-up from its ids (`.text`: what is shown; `.reasoning`: a thought kept apart)."""
        clean = self.answer_text(settings)
        clean.whole(self.tokenizer.decode(ids, skip_special_tokens=True))
        return clean

    def answer(self, ids: list[int], settings: GenerationSettings) -> str:
        """A whole answer's shown text from its ids."""
        return self.finished(ids, settings).text


def answered(sessions: list[ChatSession], settings, chat: ChatFormat, streamer, cancel, produce) -> list[str]:
    """An engine's `generate` around its own `produce()` (each session's new ids): the questions must be pending;
    a failure or a cancel withdraws them (a retry must not pile up unanswered turns); the answers are stored."""
    for s in sessions:
        if not s.conversation.awaiting_answer:
            raise InputError("ask a question first")
    try:
        new_ids = produce()
        if cancel is not None and cancel.is_set():
            raise Cancelled("generation cancelled")
    except BaseException:
        for s in sessions:
            s.conversation.withdraw()
        raise
    answers = []
    for session, ids in zip(sessions, new_ids):
        # what was streamed is the answer, to the character
        if streamer is not None:
            text, session.reasoning = streamer.text(), streamer.answer.reasoning
        else:
            clean = chat.finished(list(ids), settings)
            text, session.reasoning = clean.text, clean.reasoning
        session.completion_tokens = len(ids)
        answers.append(session.conversation.add_answer(text))
    return answers


class ChatSession:
    """One consultation: its photos (encoded once, when added), its turns, and its engine's state between turns
    (`cache`, `cache_keys`: our engine's key/value cache and the ids it holds; vLLM keeps nothing here)."""

    def __init__(self, engine):
        self.engine = engine
        self.reset()

    def reset(self) -> None:
        self.conversation = self.engine.chat.conversation()
        self.photos: list = []
        self.image_hashes: list[str] = []
        self.cache, self.cache_keys, self.reused_tokens = None, [], 0
        self.prompt_tokens = self.completion_tokens = 0  # of the last turn (usage reports)
        self.reasoning = ""  # the last answer's thought, kept apart from it (reasoning models)

    def add_image(self, source: str | Path | bytes) -> str:
        """Decode (through the one image loader), encode once, and add an image; returns its SHA-256."""
        data = read_source(source, DEFAULT_LIMITS.max_bytes)  # read once: the hash is of the pixels we decode
        image = load_image(data)  # rejects unsafe or broken images with a one-line reason
        self.add_encoded(self.engine.encode_images([image])[0], sha256_bytes(data))
        return self.image_hashes[-1]

    def add_encoded(self, photo, sha256: str = "") -> None:
        """Add an image already encoded by the engine's `encode_images` (used for batches)."""
        self.conversation.add_image()
        self.photos.append(photo)
        self.image_hashes.append(sha256)

    def ask(self, text: str) -> str:
        """Add a question; returns it as the model will read it (reserved strings neutralised)."""
        return self.conversation.add_question(text)

    def withdraw(self) -> None:
        self.conversation.withdraw()

    def answer(self, settings: GenerationSettings | None = None, cancel: threading.Event | None = None) -> str:
        return self.engine.generate([self], settings or GenerationSettings(), cancel=cancel)[0]

    def settle(self) -> int:
        """Prepare for the next turn (`ChatEngine.settle`); idle-time work."""
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
        streamer = self.engine.chat.text_pieces(settings)
        failure: list[BaseException] = []

        def work():
            try:
                self.engine.generate([self], settings, streamer, cancel)
            except BaseException as exc:  # surfaced in the consumer's thread below
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, name="answer", daemon=True)
        thread.start()
        try:
            yield from streamer
        except BaseException:  # the consumer stopped reading, or Ctrl+C: stop after the current token step
            cancel.set()
            _join(thread)  # never leave the model running in a thread the interpreter may kill on its way out
            raise
        _join(thread)
        if failure:
            raise failure[0]


def _join(thread: threading.Thread) -> None:
    thread.join(JOIN_S)
    if thread.is_alive():  # never expected: the engine checks the cancel flag at every step and queue poll
        log.error("an answer's thread did not end within %.0f s of its end or cancel; left running", JOIN_S)


class KeptImages:
    """For an engine whose model reads the photos itself when a prompt is made (vLLM; the other families' processor):
    its sessions keep the images, and nothing between turns."""

    def session(self) -> ChatSession:
        return ChatSession(self)

    def encode_images(self, images: list) -> list:
        return list(images)

    def settle(self, session: ChatSession) -> int:
        return 0
