"""Terminal chat: type questions, watch answers stream; `/image PATH`, `/reset`, `/save FILE`, `/quit`.

Answers pass the same safety rails as every surface (referral advice and disclaimer end each answer); photos
are the user's own files, so they are decoded in this process (the web app and API use the sandboxed decoder).
"""

from __future__ import annotations

import json
import sys
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import SkinGPT4Error, first_line
from skingpt4.inputs.images import ImageRejected, load_image
from skingpt4.serve.safety import DISCLAIMER, INTENDED_USE

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine
    from skingpt4.serve.consult import Consultation

NO_PHOTO = "(no photo in this consultation: the model answers from the text alone; add one with /image PATH)"
NOTICE = "(Research tool, not a diagnosis: see the disclaimer after the first answer.)"
HELP = "commands: /image PATH  add a photo | /reset  new consultation | /save FILE  save transcript | /quit"


def run_chat(
    engine: Engine | Future,
    settings: GenerationSettings,
    images: list[str] = (),
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    store=None,
) -> int:
    """Read lines until EOF or /quit; every bad command or image gets one line and the chat goes on.

    `engine` may be a `Future` of one, the model still loading: the prompt then shows at once, and the first
    question or photo waits for the model (a failed load is raised there).
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    say = lambda text="", end="\n": (stdout.write(text + end), stdout.flush())  # noqa: E731
    say(INTENDED_USE)
    session = _Session(engine, store, say)
    if not isinstance(engine, Future):
        session()  # loaded: its warning comes before anything else
    for path in images:
        if not _add_image(session(), path, say):
            return 2  # the photos given at start are the consultation: without one, stop rather than chat
    say(HELP)
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line:
            say()
            return 0
        line = line.strip()
        if not line:
            continue
        if line.startswith("/"):
            if _command(session, line, say) == "quit":
                return 0
            continue
        consultation = session()  # a model still loading is waited for (and its warning shown) first
        if not consultation.images and not session.hinted:
            say(NO_PHOTO)
            session.hinted = True
        stdout.write("skingpt4> ")
        try:
            for piece in consultation.reply(line, settings):
                say(session.shortened(piece), end="")
        except (SkinGPT4Error, RuntimeError, ValueError) as exc:  # e.g. out of memory: say so, keep the chat
            say(f"\nerror: {first_line(exc)}")
            continue
        say()


class _Session:
    """The consultation, made when the model is ready; its first call waits for a model still loading."""

    def __init__(self, engine, store, say):
        self.engine, self.store, self.say, self.consultation = engine, store, say, None
        self.disclaimed = self.hinted = False  # the full disclaimer shown; the no-photo hint given

    def shortened(self, piece: str) -> str:
        """The full disclaimer the first time an answer ends with it, one line after that (the saved transcript
        and the records keep it in full)."""
        if DISCLAIMER not in piece:
            return piece
        short, self.disclaimed = (NOTICE if self.disclaimed else DISCLAIMER), True
        return piece.replace(DISCLAIMER, short)

    def __call__(self) -> Consultation:
        if self.consultation is None:
            from skingpt4.serve.consult import Consultation

            engine = self.engine.result() if isinstance(self.engine, Future) else self.engine
            self.say(f"model: {engine.info.model_id} in {engine.info.path}")
            if engine.info.warning:
                self.say(f"WARNING: {engine.info.warning}")
            self.consultation = Consultation(engine, "chat", store=self.store, decode=load_image, settle=True)
        return self.consultation


def _command(session: _Session, line: str, say) -> str | None:
    name, _, arg = line.partition(" ")
    arg = arg.strip()
    if name == "/quit" or name == "/exit":
        return "quit"
    if name == "/image" and arg:
        _add_image(session(), arg, say)
    elif name == "/reset":
        session().reset()
        session.hinted = False
        say("(new consultation: images and history cleared)")
    elif name == "/save" and arg:
        try:
            Path(arg).write_text(json.dumps(session().transcript(), indent=2, ensure_ascii=False) + "\n")
            say(f"(saved to {arg})")
        except OSError as exc:
            say(f"error: cannot write {arg}: {exc.strerror}")
    else:
        say(HELP)
    return None


def _add_image(session, path: str, say) -> bool:
    try:
        digest = session.add_image(Path(path))
    except (ImageRejected, SkinGPT4Error) as exc:
        say(f"error: {exc}")
        return False
    say(f"(image added: sha256 {digest[:12]}; now ask about it)")
    return True
