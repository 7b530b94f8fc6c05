"""Serving the web app: Gradio's launch options as docs/reliability.md §1.4 recommends, credentials, and clean-up.

`launch` binds to 127.0.0.1 unless told otherwise, warns when the app is reachable beyond this machine without a
password, never serves the model folder or the records, and removes every file the app kept when it stops
(Ctrl+C or SIGTERM).
"""

from __future__ import annotations

import asyncio
import hmac
import http.client
import os
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from skingpt4 import net
from skingpt4.connections import install
from skingpt4.errors import InputError, first_line
from skingpt4.serve.web import WebApp, WebConfig

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine

PAGE_WAIT_S = 60.0  # how long a started server may take to serve its first page (Gradio gives it 3 s)

__all__ = ["WebConfig", "build_app", "launch", "parse_auth", "read_auth_file"]


# -- credentials -------------------------------------------------------------------------------------------------


def parse_auth(value: str) -> tuple[str, str]:
    """`user:password` -> (user, password); the password may itself contain ':'."""
    user, sep, password = value.strip().partition(":")
    if not sep or not user.strip() or not password:
        raise InputError("credentials must look like user:password (both non-empty)")
    return user.strip(), password


def read_auth_file(path: str | Path) -> list[tuple[str, str]]:
    """One `user:password` per line; blank lines and `#` comments are skipped. Errors name the line, never it."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the auth file {path}: {first_line(exc)}") from None
    pairs = []
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                pairs.append(parse_auth(line))
            except InputError:
                raise InputError(f"auth file {path}, line {number}: expected user:password") from None
    if not pairs:
        raise InputError(f"auth file {path} holds no user:password line")
    return pairs


def login_check(pairs: list[tuple[str, str]], delay: float):
    """Gradio's `auth` callable: constant-time comparison, and a pause after each failure to slow guessing."""
    accounts = dict(pairs)

    async def check(user: str, password: str) -> bool:
        expected = accounts.get(user)
        ok = expected is not None and hmac.compare_digest(expected.encode(), password.encode())
        if not ok:
            await asyncio.sleep(delay)  # async: a failed login must not hold a server thread
        return ok

    return check


# -- serving -----------------------------------------------------------------------------------------------------


def build_app(engine: Engine, config: WebConfig | None = None, store=None) -> WebApp:
    """The app, not yet serving. `store` (a `records.RecordStore`) keeps each consultation when given."""
    return WebApp(engine, config or WebConfig(), store)


def launch_options(config: WebConfig) -> dict:
    """Keyword arguments for `Blocks.launch`: docs/reliability.md §1.4's recommended configuration."""
    return dict(
        server_name=config.host,
        server_port=config.port,
        share=False,
        auth=login_check(config.auth, config.login_delay) if config.auth else None,
        max_file_size=f"{config.max_image_mb:g}mb",
        show_error=False,
        ssr_mode=False,
        mcp_server=False,
        allowed_paths=[],
        blocked_paths=list(config.blocked_paths),
        strict_cors=True,
        enable_monitoring=False,
        run_history=False,  # else inputs and outputs are kept in the browser
        pwa=False,
        state_session_capacity=config.max_sessions,
        footer_links=["settings"],  # no "Use via API" page: the documented API is `skingpt4 serve`
        quiet=True,
    )


def exposure_warning(config: WebConfig) -> str | None:
    """The warning printed when the app is reachable beyond this machine without a password."""
    missing = "" if config.auth else "--auth or --auth-file"
    return net.exposure_warning(config.host, missing, "use the model and see what this app shows")


def private_paths(engine: Engine, store=None) -> list[str]:
    """The model folder and the record store: never to be served, whatever a bug hands Gradio."""
    paths = [str(Path(engine.info.path).resolve())] if engine.info.path else []
    if getattr(store, "path", None):
        database = str(Path(store.path).resolve())
        paths += [database, f"{database}-wal", f"{database}-shm"]  # SQLite's journal files hold records too
    return paths


@dataclass
class Running:
    """A launched app: its address, and `close()` to stop it and remove every file it kept."""

    app: WebApp
    url: str
    previous_temp_dir: str | None = None

    def close(self) -> None:
        self.app.sweeper.stop()
        self.app.blocks.close()
        shutil.rmtree(self.app.cache, ignore_errors=True)
        if self.previous_temp_dir is None:
            os.environ.pop("GRADIO_TEMP_DIR", None)
        else:
            os.environ["GRADIO_TEMP_DIR"] = self.previous_temp_dir


def launch(engine: Engine, config: WebConfig | None = None, store=None, block: bool = True) -> Running:
    """Serve the app. With `block`, until Ctrl+C or SIGTERM, then everything is cleaned up; else returns at once.

    SIGTERM is taken as a stop from the start: one that arrives while the server is still starting (a service manager
    stopping it at once) cleans up and returns like one that arrives later.
    """
    config = config or WebConfig()
    previous = os.environ.get("GRADIO_TEMP_DIR")  # before build_app replaces it
    if not block:
        return _start(engine, config, store, previous)
    with _interrupt_on_sigterm():
        running = None
        try:
            running = _start(engine, config, store, previous)
            running.app.blocks.block_thread()  # returns on Ctrl+C
        except KeyboardInterrupt:
            pass
        finally:
            if running is not None:
                running.close()
    return running


def _start(engine: Engine, config: WebConfig, store, previous: str | None) -> Running:
    running = Running(build_app(engine, config, store), "", previous)
    try:
        running.url = _serve(running.app, private_paths(engine, store))
    except BaseException:  # Ctrl+C during start-up, a port in use: no private directory is left behind
        running.close()
        raise
    return running


def _serve(app: WebApp, blocked: list[str]) -> str:
    config = app.config
    settings = app.engine.settings  # requests past its queue are refused ("queue is full")
    app.blocks.queue(max_size=settings.queue_size, default_concurrency_limit=settings.max_batch)
    if warning := exposure_warning(config):
        print(warning, file=sys.stderr)
    os.environ["GRADIO_TEMP_DIR"] = str(app.cache)  # the server reads it when launched (build_app set it too)
    options = launch_options(config)
    options["blocked_paths"] += blocked
    install(config.request_timeout_s, config.max_connections)  # Gradio's uvicorn gets our protocol this way
    try:
        url = _launch(app.blocks, options)
    except OSError as exc:  # Gradio's own text points at GRADIO_SERVER_PORT, which our users do not set
        if "port" not in str(exc).lower():
            raise
        raise InputError(f"port {config.port} on {config.host} is in use; choose another with --port") from None
    print(f"SkinGPT-4 web app at {url}", file=sys.stderr)
    return url


def _launch(blocks, options: dict) -> str:
    """Gradio's launch, without its 3-second verdict on the first page.

    Once its server runs, Gradio asks it for the page and, at one answer slower than 3 s (a loaded machine), raises
    that localhost is unreachable and a public share link is needed: advice meant for notebooks, and one we never
    take. The server is up by then; we wait for its page ourselves, longer, and say so in one line if it never comes.
    """
    try:
        return blocks.launch(**options, prevent_thread_lock=True)[1]
    except ValueError as exc:
        if "localhost is not accessible" not in str(exc):
            raise
    if not answers(blocks.local_url, PAGE_WAIT_S):
        raise InputError(f"the web app's server started but served no page at {blocks.local_url} in {PAGE_WAIT_S:g} s")
    return blocks.local_url


def answers(url: str, within: float) -> bool:
    """Whether a server answers `url` (any HTTP status) within `within` seconds, asking again while it does not."""
    parts = urlsplit(url)
    deadline = time.monotonic() + within
    while True:
        connection = http.client.HTTPConnection(
            parts.hostname, parts.port, timeout=max(0.1, deadline - time.monotonic())
        )
        try:
            connection.request("HEAD", parts.path or "/")
            connection.getresponse()
            return True
        except (OSError, http.client.HTTPException):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)
        finally:
            connection.close()


@contextmanager
def _interrupt_on_sigterm():
    """Treat SIGTERM (a service manager's stop) as Ctrl+C, so the cache with its summaries is removed either way."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
