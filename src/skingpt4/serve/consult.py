"""One consultation as every interactive surface runs it: images, turns, safety rails, and the optional record.

The chat engine's `Session` holds what the model sees; a `Consultation` adds what the person sees. Each answer
passes through the safety rails (`safety.Guard`) while it streams, so a reassurance phrase is never shown and the
referral advice and disclaimer always end the answer. With a record store, the consultation is saved after every
image and every turn (image hashes, shown turns, settings; pixels only when the store keeps images).
"""

from __future__ import annotations

import functools
import html
import logging
import threading
import time
import uuid
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from skingpt4.engine.settings import GenerationSettings, setting_rows
from skingpt4.errors import InputError
from skingpt4.inputs.conversation import neutralise
from skingpt4.inputs.images import DEFAULT_LIMITS, png_bytes, png_data_uri, read_source, sha256_bytes, thumbnail
from skingpt4.serve.safety import INTENDED_USE, LEVELS, Guard, without_rails

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine

log = logging.getLogger(__name__)
MAX_QUESTION_CHARS = 4000  # far above any real question; bounds prompt-building work for hostile input


class Consultation:
    """A chat session plus the turns as shown, the images' hashes and thumbnails, and record keeping."""

    def __init__(
        self, engine: Engine, surface: str, store=None, decode=None, max_images: int = 8, settle: bool = False
    ):
        """`settle`: after each answer, prepare the cache for the next turn in the background (`Engine.settle`),
        for surfaces where a person reads and types between turns; not the stateless API."""
        self.engine, self.surface, self.store, self.max_images, self.settle = (
            engine,
            surface,
            store,
            max_images,
            settle,
        )
        self.decode = decode or _isolated_decoder()
        self.reset()

    def reset(self) -> None:
        """A new consultation: new id, no images, no turns (a saved record stays as it was)."""
        self.id = uuid.uuid4().hex
        self.session = self.engine.session()
        self.turns: list[dict] = []
        self.images: list[dict] = []
        self.settings: GenerationSettings | None = None

    def add_image(self, data: bytes | Path) -> str:
        """Decode (sandboxed by default), encode once and add a photo (bytes or a path); returns its SHA-256."""
        if len(self.images) >= self.max_images:
            raise InputError(f"at most {self.max_images} photos per consultation; restart to begin a new one")
        data = read_source(data, DEFAULT_LIMITS.max_bytes)
        image = self.decode(data)
        digest = sha256_bytes(data)
        self.session.add_encoded(self.engine.encode_images([image])[0], digest)
        pixels = png_bytes(image) if self.store is not None and self.store.keep_images else None
        self.images.append({"sha256": digest, "thumbnail": thumbnail(image), "png": pixels})
        self._save()
        return digest

    def reply(self, question: str, settings: GenerationSettings | None = None, cancel: threading.Event | None = None):
        """Stream the safety-checked answer to `question`; closing the stream early cancels generation.

        Pieces may be empty (text held back until its sentence ends); joined, they are the shown answer.
        """
        settings = settings or GenerationSettings()
        check_question(question)
        asked = self.session.ask(question)
        guard = Guard("\n".join([*self.questions(), asked]))
        start = time.perf_counter()
        try:
            with closing(self.session.stream(settings, cancel)) as pieces:
                for piece in pieces:
                    yield guard.feed(piece)  # often "" while a sentence is held back: a chance to cancel, per token
        except GeneratorExit:
            if not self.session.conversation.awaiting_answer:  # it finished, but was never shown: withdraw it
                self.session.withdraw()
            raise
        tail, verdict = guard.finish()
        self.turns.append({"role": "user", "text": asked})
        self.turns.append(
            {
                "role": "assistant",
                "text": verdict.text,
                "level": verdict.level,
                "triggers": list(verdict.triggers),
                "seconds": round(time.perf_counter() - start, 3),
            }
            | ({"reasoning": self.session.reasoning} if self.session.reasoning else {})
        )
        self.settings = settings
        self._save()
        if self.settle:
            threading.Thread(target=_settle, args=(self.session,), name="settle").start()  # short: exit waits
        if tail:
            yield tail

    def add_turn(self, role: str, text: str) -> None:
        """Replay an earlier turn without generating (the HTTP API is stateless: requests bring the history).

        An earlier answer comes back with our advice and disclaimer appended; the model reads it without them,
        as it read its own answer, and neutralised, since the client could have written anything there.
        """
        conversation = self.session.conversation
        if role == "user":
            text = self.session.ask(text)
        else:
            model_text = neutralise(without_rails(text), conversation.template, conversation.special_tokens)
            conversation.add_answer(model_text)
        self.turns.append({"role": role, "text": text})

    def answer(self, question: str, settings: GenerationSettings | None = None, cancel=None) -> str:
        return "".join(self.reply(question, settings, cancel))

    def questions(self) -> list[str]:
        return [turn["text"] for turn in self.turns if turn["role"] == "user"]

    @property
    def level(self) -> str:
        """The highest referral level of any answer so far."""
        levels = [turn["level"] for turn in self.turns if turn["role"] == "assistant"]
        return max(levels, key=LEVELS.index, default="none")

    def transcript(self) -> dict:
        """The consultation as shown, without pixels (for `/save` and records)."""
        return {
            "id": self.id,
            "surface": self.surface,
            "model_id": self.engine.info.model_id,
            "images": [{"sha256": image["sha256"]} for image in self.images],
            "turns": self.turns,
            "settings": asdict(self.settings) if self.settings else {},
        }

    def _save(self) -> None:
        if self.store is None:
            return
        path = self.engine.info.path
        images = [{"sha256": image["sha256"], "png": image["png"]} for image in self.images]
        weights = model_sha256(str(path)) if path else ""
        self.store.save({**self.transcript(), "images": images, "model_sha256": weights})

    def summary_html(self) -> str:
        """A self-contained HTML page: thumbnails, questions and answers, referral notice, model and settings."""
        info, esc = self.engine.info, html.escape
        parts = [
            "<!doctype html><meta charset='utf-8'><title>Consultation summary</title>",
            "<style>body{font:15px/1.5 sans-serif;max-width:48em;margin:2em auto}img{margin:4px;border:1px solid #ccc}"
            ".referral{background:#fee;border:1px solid #c00;padding:.5em}.turn{white-space:pre-wrap}</style>",
            "<h1>Consultation summary</h1>",
            f"<p><b>{esc(INTENDED_USE)}</b></p>",
        ]
        if info.warning:
            parts.append(f"<p class='referral'>{esc(info.warning)}</p>")
        if self.level != "none":
            parts.append(f"<p class='referral'>Referral: {esc(REFERRAL_NOTICE[self.level])}</p>")
        parts.append("<h2>Photos</h2><p>")
        for image in self.images:
            uri = png_data_uri(image["thumbnail"])
            parts.append(f"<img src='{uri}' alt='photo sha256 {image['sha256'][:12]}'>")
        parts.append("</p><h2>Questions and answers</h2>")
        for turn in self.turns:
            who = "Question" if turn["role"] == "user" else "Answer"
            parts.append(f"<h3>{who}</h3><div class='turn'>{esc(turn['text'])}</div>")
        settings = setting_rows(asdict(self.settings)) if self.settings else []
        rows = "".join(f"<tr><th>{esc(name)}</th><td>{esc(value)}</td></tr>" for name, value in settings)
        parts.append(
            f"<h2>Model and settings</h2><p>Model: {esc(info.model_id)}<br>"
            f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}</p><table>{rows}</table>"
        )
        return "\n".join(parts) + "\n"


REFERRAL_NOTICE = {
    "prompt": "an answer in this consultation advised seeing a dermatologist promptly.",
    "urgent": "an answer in this consultation advised seeking urgent medical care.",
    "crisis": "this consultation mentioned self-harm; crisis support was signposted.",
}


def check_question(question: str) -> None:
    """A question the engine will take: not empty, not absurdly long."""
    if len(question) > MAX_QUESTION_CHARS:
        raise InputError(f"question is longer than {MAX_QUESTION_CHARS} characters")
    if not question.strip():
        raise InputError("the question is empty")


@functools.cache
def model_sha256(path: str) -> str:
    """Computed once per process (reads every weight byte): surfaces that keep records call it at start-up."""
    from skingpt4.folder.checkpoints import weights_sha256

    return weights_sha256(Path(path))


def _isolated_decoder():
    from skingpt4.serve.sandbox import load_image_isolated

    return load_image_isolated


def _settle(session) -> None:
    """Idle-time cache preparation: a failure (out of memory, say) only means the next turn recomputes more."""
    try:
        session.settle()
    except Exception as exc:  # never surfaces: the next turn works without it
        log.debug("settle failed: %s", type(exc).__name__)
