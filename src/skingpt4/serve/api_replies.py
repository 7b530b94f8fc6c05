"""The OpenAI chat-completions response bodies: a consultation's answer (`Reply`: plain or as server-sent events,
with usage and the `skingpt4` block of rails and disclaimer), a client's housekeeping request answered without the
model (`Canned`, `clients.task_reply`), and errors (`describe`: an exception -> status, one line, type)."""

from __future__ import annotations

import json
import logging
import time
import traceback
import uuid

from fastapi.responses import JSONResponse, StreamingResponse

from skingpt4.errors import Cancelled, SkinGPT4Error, first_line
from skingpt4.inputs.images import ImageRejected
from skingpt4.serve.limits import error_body
from skingpt4.serve.safety import DISCLAIMER

log = logging.getLogger("skingpt4.serve.api")


class Completion:
    """What every reply carries (an id, the model, when it was made) and its two forms: one body, or chunks."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"chatcmpl-{uuid.uuid4().hex}", model, int(time.time())

    def body(self, text: str, finish: str, usage: dict, reasoning: str = "", **extra) -> dict:
        message = {"role": "assistant", "content": text} | ({"reasoning_content": reasoning} if reasoning else {})
        choice = {"index": 0, "message": message, "finish_reason": finish, "logprobs": None}
        head = {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model}
        return {**head, "choices": [choice], "usage": usage, **extra}

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None, choices=True) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else [],
        }
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


class Reply(Completion):
    """A consultation's answer."""

    def __init__(self, model: str, consultation, settings, accepted: list[str] = ()):
        super().__init__(model)
        self.consultation, self.settings = consultation, settings
        self.accepted = list(accepted)  # fields taken but not acted on (offered tools: the answer is text)

    def usage(self) -> dict:
        session = self.consultation.session
        prompt, completion = session.prompt_tokens, session.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def finish_reason(self) -> str:
        return "length" if self.consultation.session.completion_tokens >= self.settings.max_new_tokens else "stop"

    def safety(self) -> dict:
        last = self.consultation.turns[-1] if self.consultation.turns else {}
        block = {"disclaimer": DISCLAIMER, "referral": last.get("level", "none"), "triggers": last.get("triggers", [])}
        return {**block, "not_acted_on": self.accepted} if self.accepted else block

    def completion(self, text: str) -> dict:
        return self.body(text, self.finish_reason(), self.usage(), self.reasoning(), skingpt4=self.safety())

    def reasoning(self) -> str:
        """A reasoning model's thought, kept out of the answer: `reasoning_content`, as vLLM and others send it."""
        last = self.consultation.turns[-1] if self.consultation.turns else {}
        return last.get("reasoning", "")

    async def events(self, job, include_usage: bool):
        try:
            yield self.chunk({"role": "assistant", "content": ""})
            while (event := await job.next_event())[0] == "piece":
                if event[1]:
                    yield self.chunk({"content": event[1]})
            if event[0] == "error":  # headers are sent: report in-band, as OpenAI does
                yield f"data: {json.dumps(error_body(*describe(event[1])[1:]))}\n\n"
                return
            if reasoning := self.reasoning():  # known once the answer is done (the thought is never streamed raw)
                yield self.chunk({"reasoning_content": reasoning})
            yield self.chunk({}, finish=self.finish_reason())
            if include_usage:
                yield self.chunk({}, usage=self.usage(), choices=False)
            yield DONE
        finally:
            if not job.done:  # the client went away mid-stream
                job.cancel.set()


class Canned(Completion):
    """A reply written without the model (a client's chat title or tags), plain or streamed."""

    def __init__(self, model: str, text: str):
        super().__init__(model)
        self.text = text

    def response(self, stream: bool):
        if not stream:
            return JSONResponse(
                self.body(self.text, "stop", {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0})
            )
        return StreamingResponse(self._events(), media_type="text/event-stream")

    async def _events(self):
        yield self.chunk({"role": "assistant", "content": self.text})
        yield self.chunk({}, finish="stop")
        yield DONE


DONE = "data: [DONE]\n\n"


def failure(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind), status_code=status, headers=headers)


def describe(exc: BaseException) -> tuple[int, str, str]:
    """HTTP status, one-line message and error type for an exception raised while answering."""
    import torch

    if isinstance(exc, (ImageRejected, SkinGPT4Error)) and not isinstance(exc, Cancelled):
        return 400, first_line(exc), "invalid_request_error"
    if isinstance(exc, Cancelled):
        return 499, "request cancelled", "cancelled"
    if isinstance(exc, torch.OutOfMemoryError):
        exc.__traceback__ = None  # its frames hold the tensors that filled the memory
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return 503, "out of memory on this request; retry with fewer tokens or images", "server_busy"
    incident = uuid.uuid4().hex[:12]
    log.error("generation failed (error %s): %s\n%s", incident, type(exc).__name__, stack(exc))
    return 500, f"internal error while generating (error {incident} in the server's log)", "server_error"


def stack(exc: BaseException) -> str:
    """Where an exception was raised: its traceback's frames (file, line, function, source line), and those of
    the exceptions it came from, without any message (messages may quote patient text)."""
    frames, seen = [], set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        frames.append("".join(traceback.format_list(traceback.extract_tb(exc.__traceback__))).rstrip())
        exc = exc.__cause__ or exc.__context__
        if exc is not None:
            frames.append(f"  from {type(exc).__name__}:")
    return "\n".join(frames)


def error_response(exc: BaseException) -> JSONResponse:
    status, message, kind = describe(exc)
    return failure(status, message, kind, {"Retry-After": "5"} if status == 503 else None)
