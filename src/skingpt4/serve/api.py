"""`skingpt4 serve`: an OpenAI-compatible HTTP API (FastAPI) over one shared chat engine.

`POST /v1/chat/completions` (plain or server-sent events), `GET /v1/models`, `GET /health`. Every request is
bounded: body size (also chunked), image size before decoding, text length, `max_tokens`, and admission (as many
requests generate as the engine decodes together, `--max-batch`; `--queue-size` wait; the rest get 503 +
Retry-After). A request whose client goes away is cancelled within a token step. Logs carry ids, counts and
timings, never patient text, file names or pixels.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from skingpt4.connections import MAX_CONNECTIONS, REQUEST_TIMEOUT_S, install
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError, SkinGPT4Error, first_line
from skingpt4.serve.api_replies import Canned, Reply, error_response, failure
from skingpt4.serve.api_schema import ChatRequest, ImageFetcher, check_sizes, last_text, load_turns, settings_for
from skingpt4.serve.clients import task_reply
from skingpt4.serve.consult import Consultation, check_question
from skingpt4.serve.limits import Admission, BodyLimit
from skingpt4.serve.safety import INTENDED_USE

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine

log = logging.getLogger("skingpt4.serve.api")
MB = 2**20
DISCONNECT_CHECK_S = 0.25


@dataclass
class ServeConfig:
    """Server options; every limit has a safe default and a flag."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    max_body_mb: float = 20.0  # one 10 MB photo as base64 is 13.4 MB
    max_image_mb: float = 10.0
    max_images: int = 4
    max_text_chars: int = 16_000
    max_tokens: int = 1024
    retry_after_s: int = 5
    allow_remote_images: bool = False
    image_root: str | None = None
    shutdown_timeout_s: float = 30.0
    warmup: bool = True
    request_timeout_s: float = REQUEST_TIMEOUT_S  # headers and body must arrive within this (slow clients)
    max_connections: int = MAX_CONNECTIONS  # open connections; past it 503 at once
    served_model_name: str | None = None  # the id clients see (/v1/models, replies); records keep the model's own

    def __post_init__(self):
        """Limits that cannot work are refused at start-up, not on the first request that reaches them."""
        context = GenerationSettings.__dataclass_fields__["max_context"].default
        checks = [
            (
                1 <= self.max_tokens < context,
                f"--max-tokens must be 1..{context - 1} (the context holds {context} tokens, prompt included)",
            ),
            (self.max_body_mb > 0 and self.max_image_mb > 0, "--max-body-mb and --max-image-mb must be positive"),
            (self.request_timeout_s > 0 and self.max_connections > 0, "--request-timeout and --max-connections > 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(message)


class Health:
    """Ready only after a real inference succeeded (the warm-up), as a load balancer needs."""

    def __init__(self):
        self.status, self.detail = "starting", "warming up"

    def warm_up(self, engine: Engine, decode) -> None:
        from PIL import Image

        from skingpt4.inputs.images import png_bytes

        try:
            consultation = Consultation(engine, "api", decode=decode)
            consultation.add_image(png_bytes(Image.linear_gradient("L").convert("RGB")))
            consultation.answer("hi", GenerationSettings.greedy(max_new_tokens=2))
            self.status, self.detail = "ok", "ready"
        except Exception as exc:  # reported by /health; the server stays up to say why
            self.status, self.detail = "failed", f"warm-up failed: {first_line(exc)}"
            log.error("warm-up failed: %s", type(exc).__name__)


def create_app(engine: Engine, config: ServeConfig | None = None, store=None, decode=None) -> FastAPI:
    """The API in its steps: readiness after a warm-up answer, the body cap, errors in OpenAI's shape, the API
    key, and the three routes."""
    config = config or ServeConfig()
    health = Health()
    app = FastAPI(
        title="skingpt4", description=INTENDED_USE, version="1", lifespan=warming(health, engine, config, decode)
    )
    app.add_middleware(BodyLimit, max_bytes=int(config.max_body_mb * MB))
    openai_errors(app)
    authorised = Depends(key_check(config.api_key))
    model_id = config.served_model_name or engine.info.model_id

    @app.get("/health")
    async def get_health():
        body = {"status": health.status, "detail": health.detail, "model": model_id}
        return JSONResponse(body, status_code=200 if health.status == "ok" else 503)

    @app.get("/v1/models", dependencies=[authorised])
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": 0, "owned_by": "skingpt4"}]}

    app.post("/v1/chat/completions", dependencies=[authorised])(completions(engine, config, store, decode, model_id))
    return app


def warming(health: Health, engine: Engine, config: ServeConfig, decode):
    """The app's lifespan: the warm-up answer in the background (`/health` says ready once it succeeded)."""

    async def lifespan(app):
        task = asyncio.create_task(asyncio.to_thread(health.warm_up, engine, decode)) if config.warmup else None
        if task is None:
            health.status, health.detail = "ok", "ready (no warm-up)"
        yield
        if task is not None and not task.done():
            task.cancel()

    return lifespan


def openai_errors(app: FastAPI) -> None:
    """Every error the app gives, in OpenAI's shape: invalid bodies, a wrong key, unknown routes and methods."""

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return failure(400, f"{where or 'request body'}: {first['msg']}", "invalid_request_error")

    @app.exception_handler(_Refused)
    async def refused(request, exc: _Refused):
        return exc.response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):  # 404, 405...: OpenAI's error body, not FastAPI's
        return failure(exc.status_code, unrouted(request, exc), "invalid_request_error", exc.headers)


def key_check(api_key: str | None):
    """The dependency that refuses a request without `Authorization: Bearer <api_key>` (none when no key)."""

    def authorised(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            wrong = "missing or wrong API key (Authorization: Bearer ...)"
            raise _Refused(failure(401, wrong, "invalid_api_key", {"WWW-Authenticate": "Bearer"}))

    return authorised


def completions(engine: Engine, config: ServeConfig, store, decode, model_id: str):
    """`POST /v1/chat/completions`: a client's housekeeping answered at once; else checked, admitted (or 503),
    answered in a worker thread, plain or streamed."""
    admission = Admission(engine.settings.queue_size, engine.settings.max_batch)
    fetch = ImageFetcher(int(config.max_image_mb * MB), config.image_root, config.allow_remote_images)

    async def answer(body: ChatRequest, request: Request):
        if (task := task_reply(last_text(body))) is not None:  # a client's title or tags: no model, no queue
            return Canned(model_id, task).response(body.stream)
        try:
            accepted = check_sizes(body, config.max_text_chars, config.max_images)
            settings = settings_for(body, config.max_tokens)
        except SkinGPT4Error as exc:
            return failure(400, str(exc), "invalid_request_error")
        if not admission.enter():
            busy = {"Retry-After": str(config.retry_after_s)}
            return failure(503, "the server is busy; retry later", "server_busy", busy)
        consultation = Consultation(engine, "api", store=store, decode=decode)
        job = Job(lambda cancel: turn(consultation, body, settings, fetch, cancel), admission.leave, request)
        if (first := await job.next_event())[0] == "error":
            return error_response(first[1])
        reply = Reply(model_id, consultation, settings, accepted)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(reply.events(job, include_usage), media_type="text/event-stream")
        text, last = await job.collect()
        return error_response(last[1]) if last[0] == "error" else reply.completion(text)

    return answer


def unrouted(request: Request, exc) -> str:
    """The one line for a request no route takes."""
    where = f"{request.method} {request.url.path}"
    if exc.status_code == 404 and request.url.path.rstrip("/").endswith("/responses"):
        return f"{where}: the Responses API is not offered here; use POST /v1/chat/completions"
    if exc.status_code == 404:
        return f"{where}: no such endpoint (this server offers POST /v1/chat/completions, GET /v1/models, GET /health)"
    if exc.status_code == 405:
        return f"{where}: method not allowed here"
    return f"{where}: {exc.detail}"


def turn(consultation: Consultation, body: ChatRequest, settings, fetch, cancel):
    """Runs in the worker thread: replay the conversation, then stream the answer."""
    question = load_turns(consultation, body, fetch)
    check_question(question)
    yield None  # the request is valid: a streaming response may start
    yield from consultation.reply(question, settings, cancel)


class Job:
    """One request's generation in a worker thread; events reach the event loop through an asyncio queue.

    A watcher task checks every quarter second whether the client is still there and cancels the generation when
    it is not, whether the response is streaming, waiting, or not started yet.
    """

    def __init__(self, work, finished, request: Request):
        self.loop, self.queue, self.cancel = asyncio.get_running_loop(), asyncio.Queue(), threading.Event()
        self.work, self.finished, self.done = work, finished, False
        self.ended = asyncio.Event()
        threading.Thread(target=self._run, daemon=True).start()
        self.watcher = asyncio.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while not self.ended.is_set():
            try:
                await asyncio.wait_for(self.ended.wait(), DISCONNECT_CHECK_S)
            except TimeoutError:
                if await request.is_disconnected():
                    self.cancel.set()
                    return

    def _run(self) -> None:
        try:
            for piece in self.work(self.cancel):
                if piece != "":  # text held back by the rails: nothing to send, no need to wake the event loop
                    self._put(("ready", None) if piece is None else ("piece", piece))
            self._put(("done", None))
        except BaseException as exc:  # handed to the request; the worker thread never dies noisily
            self._put(("error", exc))
        finally:
            self.finished()
            self.loop.call_soon_threadsafe(self.ended.set)

    def _put(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, event)

    async def next_event(self):
        event = await self.queue.get()
        self.done = event[0] in ("done", "error")
        return event

    async def collect(self) -> tuple[str, tuple]:
        pieces = []
        while (event := await self.next_event())[0] == "piece":
            pieces.append(event[1])
        return "".join(pieces), event


class _Refused(Exception):
    def __init__(self, response: JSONResponse):
        self.response = response


def serve(engine: Engine, config: ServeConfig, store=None) -> None:
    """Run the server until SIGTERM/Ctrl-C; in-flight requests get `shutdown_timeout_s` to finish."""
    import signal

    import uvicorn

    # uvicorn re-raises SIGTERM once its graceful shutdown is over; by then every request has been answered, so a
    # handler that does nothing lets the command end normally (exit 0), as a process supervisor expects.
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    app = create_app(engine, config, store)
    protocol = install(config.request_timeout_s, config.max_connections)
    uvicorn.run(
        app,
        host=config.host,
        port=config.port,
        access_log=False,
        log_level="warning",
        http=protocol,
        timeout_graceful_shutdown=config.shutdown_timeout_s,
    )
