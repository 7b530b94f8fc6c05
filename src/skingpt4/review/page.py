"""`skingpt4 review`: a local web page on which dermatologists rate the model's clinical transcripts.

It reproduces the paper's clinician questionnaire (docs/reference.md §6): one case at a time, the image, the
four-prompt transcript written by `skingpt4 eval --protocol clinical` and optionally the rater's own reference
answer; the rater answers the seven Likert statements of `store.STATEMENTS` and may add a comment.
`stats.summary` turns the ratings into Fig. 4a's agreement shares.

Kept private as docs/reliability.md §1.4-1.6 asks of a local web app: bound to 127.0.0.1 unless told otherwise (with a
warning otherwise); requests whose Host is not this server are refused (DNS rebinding); every form carries a per-run
token and cross-site posts are refused, so another web page open in the same browser cannot post ratings; all text is
escaped and a Content-Security-Policy forbids scripts and any outside asset. Images are decoded through
`images.load_image` and served as a fresh PNG from memory (no EXIF/GPS, never the original file or its path).
"""

from __future__ import annotations

import hmac
import secrets
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from starlette.concurrency import run_in_threadpool

from skingpt4 import net
from skingpt4.connections import install
from skingpt4.errors import InputError, first_line
from skingpt4.review.cases import Case, CaseImages, load_cases
from skingpt4.review.html import STYLE, Entered, case_body, esc, page, rater_header, rater_page, read_rating
from skingpt4.review.store import (
    MAX_RATER,
    Rating,
    ReviewStore,
    clean_rater,
)

COOKIE = "skingpt4_rater"
COOKIE_MAX_AGE_S = 30 * 24 * 3600  # "entered once": the name survives a browser restart (not a server restart)
LINKS_ONLY = "<h1>Who is rating?</h1><p id='message'>Open the rater link you were given to start rating.</p>"
MAX_FORM_BYTES = 64 * 1024  # seven radio buttons and a 4000-character comment fit many times over
CSP = (
    "default-src 'none'; img-src 'self'; style-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make browsers post `Origin: null`, which we refuse
    "Cache-Control": "no-store",  # patient photos and ratings stay out of the browser's disk cache
}


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Review:
    """The state one app serves: the cases, the store, decoded images and the per-run form token."""

    def __init__(self, cases: list[Case], store: ReviewStore, raters: list[str] | None = None):
        self.cases, self.store = cases, store
        self.images = CaseImages(cases)
        self.token = secrets.token_urlsafe(24)
        self.index = {case.id: i for i, case in enumerate(cases)}
        self._key = secrets.token_bytes(32)  # signs the rater cookie: a hand-edited cookie names no one
        # With named raters each gets a link of their own and names cannot be typed in; else names are typed.
        self.links = {secrets.token_urlsafe(16): clean_rater(name) for name in raters} if raters else None

    def cookie(self, rater: str) -> str:
        return f"{quote(rater, safe='')}.{self._signature(rater)}"

    def rater_of(self, request: Request) -> str | None:
        """The rater the signed cookie names; a missing, forged or tampered cookie names no one."""
        value, _, signature = request.cookies.get(COOKIE, "").rpartition(".")
        try:
            rater = clean_rater(unquote(value))
        except InputError:
            return None
        return rater if hmac.compare_digest(signature, self._signature(rater)) else None

    def _signature(self, rater: str) -> str:
        return hmac.new(self._key, rater.encode("utf-8"), "sha256").hexdigest()

    def done(self, rater: str) -> set[int]:
        return {self.index[c] for c in self.store.rated_cases(rater) if c in self.index}

    def next_unrated(self, rater: str, after: int) -> int | None:
        """1-based number of the first case after `after` (wrapping round) this rater has not rated."""
        done, total = self.done(rater), len(self.cases)
        return next(((after + k) % total + 1 for k in range(total) if (after + k) % total not in done), None)

    def case_page(self, rater: str, number: int, entered: Entered | None = None) -> str:
        case = self.case(number)
        if entered is None:
            saved = self.store.get(rater, case.id)
            entered = Entered(saved.answers, saved.comment, saved=saved.updated[:19]) if saved else Entered({})
        _, reason = self.images.get(number - 1)
        header = rater_header(rater, len(self.done(rater)), len(self.cases), self.token)
        body = case_body(number, case, reason, entered, len(self.cases), self.token)
        return page(f"Case {number}", body, header)

    def case(self, number: int) -> Case:
        if not 1 <= number <= len(self.cases):
            raise Refused(404, f"there is no case {number}; cases are 1-{len(self.cases)}")
        return self.cases[number - 1]


def create_app(
    cases: list[Case], store: ReviewStore, *, allowed_hosts: set[str] | None = None, raters: list[str] | None = None
) -> FastAPI:
    """The review app over loaded cases and an open store. `allowed_hosts`: accepted Host headers (None: any);
    `raters`: the names allowed to rate, each signed in by a link of their own (`app.state.review.links`).

    Its steps: what every response gets (the Host check, security headers, refusals as a page, the stylesheet),
    signing in (a typed name, or a rater's own link) and out, and the cases (the next unrated, show, rate, photo)."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    review = app.state.review = Review(cases, store, raters)
    every_response(app, allowed_hosts)
    sign_in_routes(app, review)
    case_routes(app, review)
    return app


def every_response(app: FastAPI, allowed_hosts: set[str] | None) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        if allowed_hosts is not None and request.headers.get("host", "") not in allowed_hosts:
            response = Response("unexpected Host header", status_code=421, media_type="text/plain")
        else:
            response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(Refused)
    async def refused(request: Request, exc: Refused):
        return HTMLResponse(page("Refused", f"<p class='error' id='message'>{esc(exc)}</p>"), exc.status)

    @app.get("/style.css")
    def style():
        return Response(STYLE, media_type="text/css")


def sign_in_routes(app: FastAPI, review: Review) -> None:
    @app.get("/")
    def home(request: Request):
        rater = review.rater_of(request)
        if rater is None and review.links is not None:
            return HTMLResponse(page("Who is rating?", LINKS_ONLY), 403)
        if rater is None:
            return HTMLResponse(rater_page(review.token))
        return next_redirect(review, rater, 0)

    @app.post("/rater")
    async def set_rater(request: Request):
        form = await read_form(request, review.token)
        if review.links is not None:
            raise Refused(403, "this review gives each rater a link of their own: open yours")
        name = (form.get("name") or [""])[0]
        try:
            rater = clean_rater(name)
        except InputError as exc:
            return HTMLResponse(rater_page(review.token, name[:MAX_RATER], str(exc)), 400)
        return signed_in(review, rater)

    @app.get("/as/{link}")
    def rater_link(link: str):
        rater = (review.links or {}).get(link)
        if rater is None:
            raise Refused(404, "this rater link is not valid for this run of the review page")
        return signed_in(review, rater)

    @app.post("/signout")
    async def sign_out(request: Request):
        await read_form(request, review.token)
        response = RedirectResponse("/", 303)
        response.delete_cookie(COOKIE, httponly=True, samesite="strict")
        return response


def case_routes(app: FastAPI, review: Review) -> None:
    @app.get("/next/{after}")
    def next_case(after: int, request: Request):
        rater = review.rater_of(request)
        return RedirectResponse("/", 303) if rater is None else next_redirect(review, rater, after)

    @app.get("/case/{number}")
    def show_case(number: int, request: Request):
        rater = review.rater_of(request)
        return RedirectResponse("/", 303) if rater is None else HTMLResponse(review.case_page(rater, number))

    @app.post("/case/{number}")
    async def rate_case(number: int, request: Request):
        form = await read_form(request, review.token)
        rater, case = review.rater_of(request), review.case(number)
        if rater is None:
            return RedirectResponse("/", 303)
        entered = read_rating(form)
        if entered.message:
            return HTMLResponse(await run_in_threadpool(review.case_page, rater, number, entered), 400)
        rating = Rating(rater, case.id, entered.answers, entered.comment, case.image_sha256 or "")
        await run_in_threadpool(review.store.save, rating)
        return RedirectResponse(f"/next/{number}", 303)

    @app.get("/image/{number}")
    def image(number: int):
        review.case(number)  # 404 for a number out of range
        png, reason = review.images.get(number - 1)
        if png is None:
            return Response(f"image unavailable: {reason}", status_code=404, media_type="text/plain")
        return Response(png, media_type="image/png")


def signed_in(review: Review, rater: str) -> Response:
    response = RedirectResponse("/", 303)
    cookie = review.cookie(rater)
    response.set_cookie(COOKIE, cookie, max_age=COOKIE_MAX_AGE_S, httponly=True, samesite="strict")
    return response


def next_redirect(review: Review, rater: str, after: int) -> Response:
    number = review.next_unrated(rater, after % len(review.cases))
    if number is not None:
        return RedirectResponse(f"/case/{number}", 303)
    total = len(review.cases)
    body = f"<h1>All {total} cases rated</h1><p>Thank you. <a href='/case/1'>Review case 1 again</a>.</p>"
    return HTMLResponse(page("All rated", body, rater_header(rater, total, total, review.token)))


async def read_form(request: Request, token: str) -> dict[str, list[str]]:
    """A small urlencoded form from this page: same origin, the run's token, at most MAX_FORM_BYTES."""
    origin = request.headers.get("origin")
    if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
        raise Refused(403, "cross-site form posts are refused")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise Refused(415, "expected a form post")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise Refused(413, "form too large")
    try:
        form = parse_qs(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=64)
    except (UnicodeDecodeError, ValueError):
        raise Refused(400, "malformed form") from None
    if not hmac.compare_digest((form.get("token") or [""])[0].encode(), token.encode()):
        raise Refused(403, "this form is from another run of the review page; reload the page")
    return form


# -- serving -----------------------------------------------------------------------------------------------------


def exposure_warning(host: str) -> str | None:
    """What to print when the page is reachable beyond this machine (it has no passwords); None on loopback."""
    risk = "read the cases and rate under any name; prefer 127.0.0.1 and an SSH tunnel"
    return net.exposure_warning(host, None, risk)


@dataclass
class RunningReview:
    """A review server started with `block=False`; `close()` stops it and closes the store."""

    url: str
    app: FastAPI
    server: object
    thread: threading.Thread
    store: ReviewStore
    sock: socket.socket

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()
        self.store.close()


def serve_review(
    transcripts: Path,
    store: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 7870,
    references: Path | None = None,
    block: bool = True,
    raters: list[str] | None = None,
) -> RunningReview | None:
    """Serve the review page until interrupted (`block=True`), or start it in a thread and return a handle."""
    import uvicorn

    cases = load_cases(transcripts, references)
    opened = ReviewStore(store)
    try:
        sock = listen(host, port)
    except BaseException:
        opened.close()
        raise
    port = sock.getsockname()[1]  # port 0 picks a free one
    url_host = f"[{host}]" if ":" in host else host
    url = f"http://{url_host}:{port}/"
    allowed = {f"{name}:{port}" for name in (url_host, "localhost", "127.0.0.1", "[::1]")}
    if warning := exposure_warning(host):
        allowed = None  # reached by this machine's address(es), whatever names they go by
        print(warning, file=sys.stderr)
    app = create_app(cases, opened, allowed_hosts=allowed, raters=raters)
    for link, name in (app.state.review.links or {}).items():
        print(f"rater {name}: {url}as/{link}", file=sys.stderr)
    protocol = install()  # slow and idle clients bounded (skingpt4.connections)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, http=protocol))
    if block:
        print(f"review page: {url} ({len(cases)} cases); Ctrl+C stops it", file=sys.stderr)
        try:
            server.run(sockets=[sock])
        finally:
            sock.close()
            opened.close()
        return None
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="skingpt4-review", daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        sock.close()
        opened.close()
        raise InputError(f"the review page did not start on {url}")
    return RunningReview(url, app, server, thread, opened, sock)


def listen(host: str, port: int) -> socket.socket:
    """Bind first, so a taken port is a one-line InputError rather than a log line from a server thread."""
    if not 0 <= port <= 65535:
        raise InputError(f"port must be 0-65535, not {port}")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family, backlog=64)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {first_line(exc)}") from exc
