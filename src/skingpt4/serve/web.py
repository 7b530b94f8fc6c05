"""`skingpt4 demo`: the local web app (Gradio), hardened as docs/reliability.md §1.4 recommends.

The flow is the released demo's (upload a photo, start the chat, restart, beam and temperature sliders, the
disclaimer), plus answers that stream, the paper's four clinical questions as buttons, several photos per case
and a downloadable consultation summary. Defaults, and why:

* bound to 127.0.0.1, no share link, analytics, flagging, monitoring, MCP and run history off: photos are health
  data and stay on this machine and out of the browser's storage;
* each upload is read once and deleted from Gradio's cache at once; only re-encoded pixels go further. Left
  alone, Gradio keeps the original (EXIF and GPS included) and serves it by URL to anyone logged in;
* Gradio's cache is a private 0700 directory of ours, removed at close; Gradio's age-based sweep is a backstop;
* state lives in `gr.State`, one `Consultation` per browser session; the engine is the only thing shared;
* the model sits behind a bounded queue; as many visitors are answered at once as the engine decodes together
  (`--max-batch`), and Stop ends only its own visitor's answer; question length is checked here, because Gradio's
  `Textbox(max_length)` is enforced in the browser only;
* text is HTML-escaped before display: the Chatbot renders sanitised HTML even with Markdown off, and the
  sanitiser keeps `<img>`, which an answer could use to make the browser call another host.

Gradio reads `GRADIO_TEMP_DIR` from the environment, so one process serves one app at a time. Serving it (launch
options, credentials, clean-up) is `web_launch.py`'s job.
"""

from __future__ import annotations

import base64
import datetime
import html
import logging
import os
import shutil
import threading
from contextlib import closing
from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import TYPE_CHECKING

from skingpt4.connections import MAX_CONNECTIONS, REQUEST_TIMEOUT_S
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import Cancelled, InputError, SkinGPT4Error, first_line
from skingpt4.inputs.conversation import CLINICAL_PROMPTS
from skingpt4.inputs.images import ImageRejected, png_data_uri
from skingpt4.serve.consult import Consultation
from skingpt4.serve.safety import DISCLAIMER, INTENDED_USE
from skingpt4.serve.uploads import Sweeper, Uploads, private_cache

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before Gradio is imported: it reads this at several points
import gradio as gr  # noqa: E402

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine

log = logging.getLogger(__name__)

SURFACE = "web"
CLINICAL_LABELS = ("1. Describe it", "2. Other features", "3. Cause", "4. Treatment")  # CLINICAL_PROMPTS, in order
STOPPED = "Stopped; the question was withdrawn."
REASONING_TITLE = "The model's reasoning (not part of the answer)"
ADD_PHOTO = "Add a photo and press Start chat"
ASK = "Ask about the photo(s), or use a clinical question below"
SUMMARY_NAME = "consultation-summary-{:%Y-%m-%d-%H%M}.html"  # the time it was made: several do not collide
DOWNLOAD = "Download summary"
NOTICE = "(Research tool, not a diagnosis: see the notice below the chat.)"  # under each answer; the full text once
_EXPECTED = (SkinGPT4Error, ImageRejected)  # one-line reasons meant for the user


@dataclass
class WebConfig:
    """How the web app is served; every default is the private one."""

    host: str = "127.0.0.1"  # anything else must be asked for (`--host`), and warns without auth
    port: int = 7860
    auth: list[tuple[str, str]] | None = None  # user/password pairs (`--auth`, `--auth-file`)
    max_image_mb: float = 10.0  # per upload (`--max-image-mb`); Gradio answers 413 above it, before any decoding
    max_question_chars: int = 2000
    max_images: int = 4  # photos per consultation (e.g. clinical and dermoscopic views)
    max_sessions: int = 64  # browser sessions whose state is kept; the least recently used is dropped beyond
    session_ttl: int = 3600  # seconds a session's state (and the model cache it holds) outlives its last change
    upload_ttl: int = 120  # an upload no handler took (queue full, restart, tab closed) is deleted after this
    sweep_every: float = 15.0  # seconds between our sweeps of the cache
    login_delay: float = 1.0  # seconds added to each failed login (Gradio's login has no rate limit)
    blocked_paths: list[str] = field(default_factory=list)  # never served, whatever a bug returns (data, records)
    temp_parent: str | None = None  # where the private cache directory goes (default: the system's temp dir)
    request_timeout_s: float = REQUEST_TIMEOUT_S  # a request (an upload too) must arrive within this
    max_connections: int = MAX_CONNECTIONS  # open connections; past it 503 at once
    settings: GenerationSettings = field(default_factory=GenerationSettings)  # sliders set beams/temperature


# -- per-session state -------------------------------------------------------------------------------------------


@dataclass
class Visit:
    """One browser session: its consultation, and the event that stops its answer in progress."""

    consultation: Consultation
    cancel: threading.Event = field(default_factory=threading.Event)  # set by Stop, Restart or a closed tab


def _drop_visit(visit) -> None:  # gr.State's delete_callback: the tab closed, or the state expired
    if isinstance(visit, Visit):
        visit.cancel.set()


# -- the page ----------------------------------------------------------------------------------------------------


class WebApp:
    """Event handlers over one engine; `blocks` is the Gradio app. Nothing per user lives on this object."""

    def __init__(self, engine: Engine, config: WebConfig, store=None):
        self.engine, self.config, self.store = engine, config, store
        self.cache = private_cache(config.temp_parent)
        self.uploads = Uploads(self.cache, config.upload_ttl)
        try:
            self.blocks = self._build()
        except BaseException:
            shutil.rmtree(self.cache, ignore_errors=True)
            raise
        self.sweeper = Sweeper(self.uploads, config.sweep_every)

    def new_visit(self) -> Visit:
        return Visit(
            Consultation(self.engine, SURFACE, store=self.store, max_images=self.config.max_images, settle=True)
        )

    # -- handlers ---------------------------------------------------------------------------------------------

    def add_photos(self, files, visit: Visit | None):
        """Upload event. Preprocessing is off: `files` are Gradio's file dicts (paths it checked are in its cache),
        and Gradio's own preprocessing would leave an empty temporary file behind for every upload."""
        items = files if isinstance(files, list) else [files] if files else []
        payloads, problems = [], []
        for item in items:  # take (and so delete) every upload before anything can fail
            try:
                payloads.append(self.uploads.take(str((item or {}).get("path", ""))))
            except InputError as exc:
                problems.append(f"{exc}.")
        visit = visit or self.new_visit()
        for data in payloads:
            number = len(visit.consultation.images) + 1  # its place in the consultation, as the strip shows it
            try:
                visit.consultation.add_image(data)
            except Exception as exc:  # one line for the user, never a stack trace
                problems.append(f"Photo {number} was not added: {_reason(exc, 'photo')}.")
        count = len(visit.consultation.images)
        note = f"{count} photo(s) in this consultation." if count else "No photo yet."
        if problems:
            _warn(" ".join(problems))
        status = "\n\n".join([*problems, note])  # one sentence a line
        return visit, self.thumbnails(visit), _text(status), self.download_link(visit)

    def start(self, visit: Visit | None):
        """The released demo's "start chatting": questions open once there is a photo."""
        ready = visit is not None and bool(visit.consultation.images)
        message = "Ask a question, or use a clinical question below." if ready else "Add a photo first."
        if not ready:
            _warn(message)
        question = gr.update(interactive=ready, placeholder=ASK if ready else ADD_PHOTO)
        return [question] + [gr.update(interactive=ready)] * (1 + len(CLINICAL_PROMPTS)) + [_text(message)]

    def ask(self, question: str, beams, temperature, greedy, visit: Visit | None):
        """Stream the answer into the chat; the shown history is rebuilt from the session's own turns."""
        question = question or ""
        problem = self._question_problem(question, visit)
        if problem:
            _warn(problem)
            yield self._history(visit), question, gr.skip(), _text(problem), visit
            return
        try:
            settings = replace(
                self.config.settings, num_beams=int(beams), temperature=float(temperature), do_sample=not greedy
            )
            # Stop and Restart set this event: Gradio's own cancel cannot close a generator while it waits for the
            # model in another thread, so the model is told directly, and stops within a token step.
            visit.cancel = threading.Event()
            pieces = visit.consultation.reply(question, settings, visit.cancel)
            shown = self._history(visit) + [_message("user", question), _message("assistant", "")]
            yield shown, "", gr.skip(), _text("Answering..."), visit
            with closing(pieces):  # and when Gradio does close this generator, closing the stream cancels too
                text = ""
                for piece in pieces:
                    text += piece
                    if visit.cancel.is_set():  # Stop was pressed: "Answering..." must not come back after its view
                        continue
                    shown[-1] = _message("assistant", text)
                    yield shown, "", gr.skip(), _text("Answering..."), visit
        except Cancelled:
            yield self._history(visit), question, gr.skip(), _text(STOPPED), visit
            return
        except Exception as exc:  # the user gets one line, never a stack trace
            message = _reason(exc, "answer")
            _warn(message)
            yield self._history(visit), question, gr.skip(), _text(message), visit
            return
        yield self._history(visit), "", self.download_link(visit), _text("Answered."), visit

    def clinical(self, index: int):
        question = CLINICAL_PROMPTS[index]

        def ask_clinical(beams, temperature, greedy, visit):
            yield from self.ask(question, beams, temperature, greedy, visit)

        return ask_clinical

    def stopped(self, visit: Visit | None):
        """Stop: the answer in progress is cancelled and its question withdrawn, so show the turns that stand."""
        if visit is not None:
            visit.cancel.set()
        return self._history(visit), _text(STOPPED)

    def restart(self, visit: Visit | None):
        """A new consultation; the old one's answer in progress stops and its summary file goes at once."""
        if visit is not None:
            visit.cancel.set()
        locked = gr.update(interactive=False)
        fresh = self.new_visit()
        return [
            fresh,
            [],
            self.thumbnails(fresh),
            gr.update(interactive=False, value="", placeholder=ADD_PHOTO),
            locked,
            *[locked] * len(CLINICAL_PROMPTS),  # question, send, ...
            self.download_link(None),
            _text("New consultation: add a photo."),
        ]

    # -- rendering --------------------------------------------------------------------------------------------

    def _question_problem(self, question: str, visit: Visit | None) -> str | None:
        if len(question) > self.config.max_question_chars:  # the Textbox's own limit is only the browser's
            return f"The question is longer than {self.config.max_question_chars} characters."
        if not question.strip():
            return "Type a question first."
        if visit is None or not visit.consultation.images:
            return "Add a photo and start the chat first."
        return None

    @staticmethod
    def _history(visit: Visit | None) -> list[dict]:
        turns = visit.consultation.turns if visit is not None else []
        return [shown for turn in turns for shown in _messages(turn)]

    @staticmethod
    def thumbnails(visit: Visit | None) -> str:
        """The session's photos as inline data URIs: re-encoded thumbnails, never a file or a URL."""
        images = visit.consultation.images if visit is not None else []
        tags = [
            f"<img src='{png_data_uri(image['thumbnail'])}' "
            f"alt='photo {number}' style='height:96px;border:1px solid #ccc'>"
            for number, image in enumerate(images, 1)
        ]
        return "<div id='photos' style='display:flex;flex-wrap:wrap;gap:4px'>" + "".join(tags) + "</div>"

    @staticmethod
    def download_link(visit: Visit | None) -> str:
        """The summary, built in memory and handed to the browser inside the link: no file on the server.

        Offered once there is an answer to sum up.
        """
        if visit is None or not visit.consultation.turns:
            return (
                "<span id='download' aria-disabled='true' style='opacity:.5'>Download summary (after an answer)</span>"
            )
        page = base64.b64encode(visit.consultation.summary_html().encode("utf-8")).decode("ascii")
        name = SUMMARY_NAME.format(datetime.datetime.now())
        return (
            f"<a id='download' download='{name}' href='data:text/html;charset=utf-8;base64,{page}' "
            f"style='font-weight:600'>{DOWNLOAD}</a>"
        )

    # -- layout -----------------------------------------------------------------------------------------------

    def _build(self) -> gr.Blocks:
        backstop = (600, self.config.session_ttl)  # Gradio's own sweep, in case ours stops: hourly files go
        with gr.Blocks(title="SkinGPT-4 (research demo)", analytics_enabled=False, delete_cache=backstop) as blocks:
            self._header()
            ui = self._layout()
            self._wire(ui)
        return blocks

    def _header(self) -> None:
        gr.Markdown("# SkinGPT-4: research demo")
        if warning := self.engine.info.warning:
            style = "background:#fee;border:2px solid #c00;padding:8px;font-weight:bold"
            gr.HTML(f"<div id='untrained-banner' style='{style}'>{html.escape(warning)}</div>")
        gr.HTML(f"<div id='intended-use' style='font-weight:bold'>{html.escape(INTENDED_USE)}</div>")

    def _layout(self) -> SimpleNamespace:
        config, settings = self.config, self.config.settings
        ui = SimpleNamespace(state=gr.State(None, time_to_live=config.session_ttl, delete_callback=_drop_visit))
        with gr.Row():
            with gr.Column(scale=1):
                ui.upload = gr.UploadButton(
                    "Add photo(s)", file_types=["image"], file_count="multiple", variant="primary", elem_id="upload"
                )
                ui.photos = gr.HTML(self.thumbnails(None), elem_id="photo-strip")
                ui.start = gr.Button("Start chat", elem_id="start")
                ui.restart = gr.Button("Restart", elem_id="restart")
                ui.beams = gr.Slider(1, 10, value=settings.num_beams, step=1, label="Beam search numbers")
                ui.temperature = gr.Slider(0.1, 2.0, value=settings.temperature, step=0.1, label="Temperature")
                ui.greedy = gr.Checkbox(value=not settings.do_sample, label="Greedy (repeatable answers)")
                ui.download = gr.HTML(self.download_link(None), elem_id="download-box")
            with gr.Column(scale=2):
                ui.chat = gr.Chatbot(
                    [],
                    label="SkinGPT-4",
                    elem_id="chat",
                    render_markdown=False,
                    sanitize_html=True,
                    allow_tags=False,
                    feedback_options=None,
                    buttons=[],  # no share icon (the page promises no share link), no copy-all
                )
                ui.question = gr.Textbox(
                    placeholder=ADD_PHOTO,
                    show_label=False,
                    interactive=False,
                    max_length=config.max_question_chars,
                    elem_id="question",
                )
                with gr.Row():
                    ui.send = gr.Button("Send", variant="primary", interactive=False, elem_id="send")
                    ui.stop = gr.Button("Stop", elem_id="stop")
                with gr.Row():
                    ui.clinical = [
                        gr.Button(label, interactive=False, elem_id=f"clinical-{i + 1}", size="sm")
                        for i, label in enumerate(CLINICAL_LABELS)
                    ]
                ui.status = gr.Markdown("", elem_id="status")
        gr.Markdown(html.escape(DISCLAIMER), elem_id="disclaimer")
        return ui

    def _wire(self, ui: SimpleNamespace) -> None:
        # The events that run the model: as many at once as the engine decodes together (`--max-batch`); Stop
        # cancels only its own visit's answer. Events stay callable (the tests drive them), but none is listed on
        # an API page: the documented API is `skingpt4 serve`.
        model = dict(
            concurrency_id="model", concurrency_limit=self.engine.settings.max_batch, api_visibility="undocumented"
        )
        cheap = dict(concurrency_limit=None, api_visibility="undocumented")
        knobs = [ui.beams, ui.temperature, ui.greedy, ui.state]
        shown = [ui.chat, ui.question, ui.download, ui.status, ui.state]
        adding = ui.upload.upload(
            self.add_photos,
            [ui.upload, ui.state],
            [ui.state, ui.photos, ui.status, ui.download],
            preprocess=False,
            api_name="add_photos",
            **model,
        )
        ui.start.click(
            self.start, [ui.state], [ui.question, ui.send, *ui.clinical, ui.status], api_name="start", **cheap
        )
        asks = [
            ui.question.submit(self.ask, [ui.question, *knobs], shown, api_name="ask", **model),
            ui.send.click(self.ask, [ui.question, *knobs], shown, **{**model, "api_visibility": "private"}),
        ]
        for index, button in enumerate(ui.clinical):
            asks.append(button.click(self.clinical(index), knobs, shown, api_name=f"clinical_{index + 1}", **model))
        stop = ui.stop.click(self.stopped, [ui.state], [ui.chat, ui.status], cancels=asks, api_name="stop", **cheap)
        # the cancelled answer's last update can reach the page after Stop's own: show the stopped view once more
        stop.then(self.stopped, [ui.state], [ui.chat, ui.status], **cheap)
        cleared = [ui.state, ui.chat, ui.photos, ui.question, ui.send, *ui.clinical, ui.download, ui.status]
        # a photo still being added would otherwise bring the old consultation back as this session's state
        ui.restart.click(self.restart, [ui.state], cleared, cancels=[*asks, adding], api_name="restart", **cheap)
        # the chat panel's own trash icon: emptying the display alone would let the cleared turns come back in the
        # next answer and in the summary, so it starts a new consultation, as Restart does
        ui.chat.clear(
            self.restart, [ui.state], cleared, cancels=[*asks, adding], **{**cheap, "api_visibility": "private"}
        )


def _message(role: str, text: str) -> dict:
    """A chat message shown as text, never HTML (see the module docstring). An answer's full disclaimer is
    shortened to one line: the page shows it in full once, and the downloaded summary keeps every copy."""
    if role == "assistant":
        text = text.replace(DISCLAIMER, NOTICE)
    return {"role": role, "content": html.escape(text)}


def _messages(turn: dict) -> list[dict]:
    """A turn as shown: a reasoning model's thought first, folded (Gradio's collapsible "thought" message)."""
    shown = [_message(turn["role"], turn["text"])]
    if thought := turn.get("reasoning"):
        fold = {"title": REASONING_TITLE, "status": "done"}
        shown.insert(0, {"role": "assistant", "content": html.escape(thought), "metadata": fold})
    return shown


def _text(message: str) -> str:
    return html.escape(message)


def _reason(exc: Exception, what: str) -> str:
    """The user's one line: our own errors say what to do; anything else is logged by type only (no PHI)."""
    if isinstance(exc, _EXPECTED):
        return first_line(exc)
    log.warning("%s failed: %s", what, type(exc).__name__)
    return f"the {what} failed ({type(exc).__name__})"


def _warn(message: str) -> None:
    gr.Warning(message)
