"""Bounds for the HTTP server: a request-body cap that also counts chunked bodies, and bounded admission.

FastAPI and uvicorn have no body limit at all (a 40 MiB JSON body costs ~3x its size in RAM), and a
`Content-Length` check alone is bypassed by `Transfer-Encoding: chunked` (docs/reliability.md §1.3). `BodyLimit`
rejects a declared length over the cap at once and counts bytes as they arrive otherwise. `Admission` lets as many
requests generate as the engine batches (`--max-batch`) and a bounded number wait; the rest are told to come back
later (503 + Retry-After) instead of waiting without bound (docs/reliability.md §1.7, T-7).
"""

from __future__ import annotations

import json
import threading


class BodyLimit:
    """Pure ASGI middleware: 413 for bodies over `max_bytes` (declared or counted), 400 for a bad Content-Length."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await error(send, 400, "Content-Length is not a non-negative integer", "invalid_request_error")
            if int(declared) > self.max_bytes:
                return await error(send, 413, self.message, "request_too_large")
        # Read the whole body here, counting, so an oversized one is refused before the app parses anything
        # (FastAPI would turn an exception raised while it reads into a generic 400).
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                return await error(send, 413, self.message, "request_too_large")
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later messages: disconnect notices

        await self.app(scope, replay, send)

    @property
    def message(self) -> str:
        return f"request body is larger than the server's limit of {self.max_bytes} bytes (--max-body-mb)"


async def error(send, status: int, message: str, kind: str, headers: dict | None = None) -> None:
    """An OpenAI-style error envelope, written straight to the ASGI channel."""
    body = json.dumps(error_body(message, kind)).encode()
    extra = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra]
    await send({"type": "http.response.start", "status": status, "headers": head})
    await send({"type": "http.response.body", "body": body})


def error_body(message: str, kind: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": kind}}


class Admission:
    """At most `generating + queue_size` requests in the building; thread-safe."""

    def __init__(self, queue_size: int, generating: int = 1):
        self.capacity, self.inside = generating + queue_size, 0
        self.lock = threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            if self.inside >= self.capacity:
                return False
            self.inside += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.inside -= 1
