"""Slow and idle clients, for every HTTP server here (the API, the web app, the review page).

uvicorn waits for a request's headers and body without a deadline, and holds any number of connections: 30
clients that send headers and a `Content-Length` and then nothing keep 30 connections open for ever. `Guarded`
is uvicorn's own HTTP/1.1 protocol with two bounds:

* a deadline (`request_timeout`) for receiving a whole request, headers and body, counted from the connection's
  start and again from each response on a kept-alive connection; past it the client gets 408 and is closed;
* a bound on open connections (`max_connections`); past it a new connection gets 503 with Retry-After, at once.

Once a request has arrived in full the deadline no longer applies: an answer may take minutes to generate.
The servers install it with `install(...)`, which also makes it the protocol of uvicorn servers that libraries
start (Gradio lets us pass none).
"""

from __future__ import annotations

import asyncio

from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.protocols.http.h11_impl import H11Protocol

REQUEST_TIMEOUT_S = 60.0  # a 20 MB body (the API's cap) needs ~2.7 Mbit/s; photos are mostly a few MB
MAX_CONNECTIONS = 400


def _response(status: str, text: str, extra: str = "") -> bytes:
    body = text.encode()
    head = f"HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {len(body)}\r\n{extra}"
    return f"{head}connection: close\r\n\r\n".encode() + body


TOO_SLOW = _response("408 Request Timeout", "the request did not arrive in time")
BUSY = _response("503 Service Unavailable", "too many open connections; retry later", "retry-after: 5\r\n")


class Guarded(H11Protocol):
    """uvicorn's h11 protocol with a request deadline and a connection cap (class attributes, see `install`)."""

    request_timeout: float = REQUEST_TIMEOUT_S
    max_connections: int = MAX_CONNECTIONS

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        if len(self.connections) > self.max_connections:
            transport.write(BUSY)
            transport.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.cycle is not None and not self.cycle.more_body:  # the whole request is here
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.request_timeout, self._too_slow)

    def _disarm(self) -> None:
        if getattr(self, "_deadline", None) is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.cycle is not None and not self.cycle.more_body:
            return  # arrived meanwhile: it is being answered
        if self.cycle is None or not self.cycle.response_started:
            self.transport.write(TOO_SLOW)
        if self.cycle is not None:
            self.cycle.disconnected = True  # the application's receive() learns the client is gone
        self.transport.close()


def install(request_timeout: float = REQUEST_TIMEOUT_S, max_connections: int = MAX_CONNECTIONS) -> type[Guarded]:
    """A `Guarded` with these bounds, made the HTTP protocol of uvicorn servers started from now on in this
    process, also those started by libraries (Gradio) that do not let us pass a protocol. Servers already running
    keep theirs."""
    global current
    current = type("Guarded", (Guarded,), {"request_timeout": request_timeout, "max_connections": max_connections})
    HTTP_PROTOCOLS["auto"] = HTTP_PROTOCOLS["h11"] = f"{__name__}:current"
    return current


current: type[Guarded] = Guarded
