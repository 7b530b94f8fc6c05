"""The OpenAI chat-completions request as we accept it, and how its messages become a consultation.

The API is stateless, as OpenAI's is: each request brings the conversation so far. Images come as `image_url`
parts holding data URLs; remote URLs and local paths are refused unless the server was started to allow them.
The data URL's declared type is ignored (the image loader sniffs the bytes), and its length is capped before
any decoding.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError
from skingpt4.inputs.conversation import DEFAULT_QUESTION
from skingpt4.serve.clients import without_client_markup
from skingpt4.text import check_text

ROLES = ("system", "developer", "user", "assistant")
TEXT_PARTS, IMAGE_PARTS = ("text", "input_text"), ("image_url", "input_image")


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class Part(BaseModel):
    """One part of a message's content, checked by `parts` (so that an error names the part and what is allowed,
    not pydantic's first union branch): text (`text`, `input_text`) or an image (`image_url`, `input_image`), the
    image given as `{"url": ...}` or as the URL itself."""

    model_config = ConfigDict(extra="allow")
    type: str = Field(json_schema_extra={"enum": [*TEXT_PARTS, *IMAGE_PARTS]})  # checked by `parts`, by name
    text: str | None = None
    image_url: ImageURL | str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str = Field(json_schema_extra={"enum": list(ROLES)})  # checked by `check_role`: "tool" says why
    content: str | list[Part] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """The fields we honour. Any other field set to a value is refused by name (`unsupported`), never ignored:
    a client that asks for `logprobs` or `tools` must learn it got neither."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[Message] = Field(min_length=1, max_length=64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(None, ge=0, le=2, description="0 means greedy decoding")
    top_p: float | None = Field(None, gt=0, le=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1, description="only one choice per request")


def settings_for(request: ChatRequest, max_tokens_cap: int) -> GenerationSettings:
    """OpenAI parameters -> our decoding settings (defaults: the released demo's)."""
    wanted = request.max_completion_tokens or request.max_tokens
    if wanted is not None and wanted > max_tokens_cap:
        raise InputError(f"max_tokens is {wanted}, above this server's limit of {max_tokens_cap}")
    default = GenerationSettings.__dataclass_fields__["max_new_tokens"].default
    options: dict = {"seed": request.seed, "max_new_tokens": wanted or min(default, max_tokens_cap)}
    if request.temperature is not None:
        options["temperature"] = request.temperature  # 0: greedy
    if request.top_p is not None:
        options["top_p"] = request.top_p
    stop = [request.stop] if isinstance(request.stop, str) else request.stop or []
    options["stop"] = tuple(stop)
    return GenerationSettings(**options)


def parts(message: Message, number: int = 0) -> tuple[list[str], list[str]]:
    """A message's text pieces and image URLs, in order; a part of another type is refused by its place."""
    if message.content is None or isinstance(message.content, str):
        return [without_client_markup(message.content or "")], []
    texts, images = [], []
    for index, part in enumerate(message.content):
        where = f"messages[{number}].content[{index}]"
        if part.type in TEXT_PARTS and isinstance(part.text, str):
            texts.append(without_client_markup(part.text))
        elif part.type in IMAGE_PARTS and part.image_url is not None:
            images.append(part.image_url if isinstance(part.image_url, str) else part.image_url.url)
        elif part.type in TEXT_PARTS + IMAGE_PARTS:
            field = "text" if part.type in TEXT_PARTS else "image_url"
            raise InputError(f"{where}: a '{part.type}' part needs its '{field}'")
        else:
            raise InputError(f"{where}: part type '{part.type}' is not supported (text, image_url)")
    return texts, images


HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}  # say nothing about the answer
NEUTRAL = {"logprobs": (False,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0)}  # values that are ours
TEXT_ANYWAY = {"tools", "functions"}  # offered tools: a text answer is a valid reply unless a call is required
NO_CALL = (None, "auto", "none")


def unsupported(request: ChatRequest) -> list[str]:
    """A one-line error naming the first field this server does not honour, if one is set; otherwise the fields
    accepted but not acted on (offered tools: the answer is text), for the reply to say so."""
    extra = {name: value for name, value in (request.model_extra or {}).items() if value is not None}
    for name in ("tool_choice", "function_call"):
        if (choice := extra.pop(name, None)) not in NO_CALL:
            shown = repr(choice) if isinstance(choice, str) else "a named function"
            raise InputError(f"{name}: {shown} is not supported: this server answers with text, never a call")
    if extra.pop("response_format", {"type": "text"}) != {"type": "text"}:
        raise InputError("response_format: only {'type': 'text'} is supported (no JSON mode)")
    for name, value in extra.items():
        if name not in TEXT_ANYWAY and name not in HARMLESS and value not in NEUTRAL.get(name, ()):
            honoured = ", ".join(sorted(set(ChatRequest.model_fields) - {"n"}))
            raise InputError(f"{name}: not supported by this server (it honours {honoured}, and n=1)")
    return sorted(name for name in extra if name in TEXT_ANYWAY)


def last_text(request: ChatRequest) -> str:
    """The last message's text as sent (parts that are not text left out), for recognising a client's task."""
    content = request.messages[-1].content
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.text for part in content if part.type in TEXT_PARTS and isinstance(part.text, str))


def check_sizes(request: ChatRequest, max_text_chars: int, max_images: int) -> list[str]:
    """Every request check that needs no model, in one line each; returns the fields accepted but not acted on."""
    accepted = unsupported(request)
    texts, images = [], []
    for number, message in enumerate(request.messages):
        check_role(message.role, number)
        t, i = parts(message, number)
        for text in t:
            check_text(text, f"messages[{number}].content")
        texts += t
        images += i
    stops = [request.stop] if isinstance(request.stop, str) else request.stop or []
    for stop in stops:
        check_text(stop, "stop")
    if sum(len(t) for t in texts) > max_text_chars:
        raise InputError(f"the messages hold more than {max_text_chars} characters of text")
    if len(images) > max_images:
        raise InputError(f"{len(images)} images given; this server takes at most {max_images} per request")
    if request.messages[-1].role != "user":
        raise InputError("the last message must be the user's")
    return accepted


def check_role(role: str, number: int) -> None:
    if role == "tool":
        raise InputError(f"messages[{number}]: role 'tool' (a tool's result) is not supported: no tool is ever called")
    if role not in ROLES:
        raise InputError(f"messages[{number}].role: '{role[:40]}' is not one of {', '.join(ROLES)}")


def load_turns(consultation, request: ChatRequest, fetch) -> str:
    """Replay the conversation into `consultation`; returns the final question (still to be answered)."""
    chat = [m for m in request.messages if m.role in ("user", "assistant")]  # the model's own system prompt rules
    for message in chat[:-1]:
        texts, images = parts(message)
        for url in images:
            consultation.add_image(fetch(url))
        if message.role == "assistant" or any(t.strip() for t in texts):
            consultation.add_turn(message.role, "\n".join(texts))
    texts, images = parts(chat[-1])
    for url in images:
        consultation.add_image(fetch(url))
    question = "\n".join(t for t in texts if t.strip())
    return question or DEFAULT_QUESTION  # a photo alone asks the demo's first question


class ImageFetcher:
    """`image_url` -> bytes: data URLs always; local files under `root` and http(s) only when switched on."""

    def __init__(self, max_bytes: int, root: str | Path | None = None, remote: bool = False, timeout: float = 10.0):
        self.max_bytes, self.remote, self.timeout = max_bytes, remote, timeout
        self.root = Path(root).resolve() if root else None
        self.max_chars = (max_bytes + 2) // 3 * 4  # base64 inflates 3 bytes to 4 characters

    def __call__(self, url: str) -> bytes:
        if url.startswith("data:"):
            return self.data_url(url)
        if url.startswith(("http://", "https://")):
            if not self.remote:
                raise InputError("remote image URLs are refused; send a data URL (or use --allow-remote-images)")
            return self.download(url)
        if url.startswith("file://") or url.startswith("/"):
            return self.local(url.removeprefix("file://"))
        raise InputError("image_url must be a data URL like data:image/jpeg;base64,...")

    def data_url(self, url: str) -> bytes:
        header, comma, payload = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise InputError("image data URL must be base64: data:image/<type>;base64,<data>")
        if not header.lower().startswith("data:image/"):  # the bytes decide which image type; this must say image
            raise InputError(f"data URL type {header[5:-7][:40]!r} is not an image type")
        if len(payload) > self.max_chars:
            raise InputError(f"image is larger than this server's limit of {self.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise InputError("image data URL is not valid base64") from None

    def local(self, name: str) -> bytes:
        if self.root is None:
            raise InputError("local image paths are refused; send a data URL (or start with --image-root DIR)")
        path = Path(name).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            raise InputError("image path is not a file under the server's --image-root")
        if path.stat().st_size > self.max_bytes:
            raise InputError(f"image is larger than this server's limit of {self.max_bytes} bytes")
        return path.read_bytes()

    def download(self, url: str) -> bytes:
        import httpx

        try:
            with httpx.stream("GET", url, timeout=self.timeout, follow_redirects=False) as response:
                if response.status_code != 200:
                    raise InputError(f"image URL answered HTTP {response.status_code}")
                data = bytearray()
                for chunk in response.iter_bytes():
                    data += chunk
                    if len(data) > self.max_bytes:
                        raise InputError(f"image is larger than this server's limit of {self.max_bytes} bytes")
                return bytes(data)
        except httpx.HTTPError as exc:
            raise InputError(f"image URL could not be fetched ({type(exc).__name__})") from None
