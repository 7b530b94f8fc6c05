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
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError
from skingpt4.inputs.conversation import DEFAULT_QUESTION
from skingpt4.text import check_text


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None


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


def parts(message: Message) -> tuple[list[str], list[str]]:
    """A message's text pieces and image URLs, in order."""
    if message.content is None or isinstance(message.content, str):
        return [message.content or ""], []
    texts = [p.text for p in message.content if isinstance(p, TextPart)]
    images = [p.image_url.url for p in message.content if isinstance(p, ImagePart)]
    return texts, images


HARMLESS = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}  # say nothing about the answer
NEUTRAL = {"logprobs": (False,), "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0)}  # values that are ours


def unsupported(request: ChatRequest) -> None:
    """A one-line error naming the first field this server does not honour, if one is set."""
    for name, value in (request.model_extra or {}).items():
        if value is None or name in HARMLESS or value in NEUTRAL.get(name, ()):
            continue
        honoured = ", ".join(sorted(set(ChatRequest.model_fields) - {"n"}))
        raise InputError(f"{name}: not supported by this server (it honours {honoured}, and n=1)")


def check_sizes(request: ChatRequest, max_text_chars: int, max_images: int) -> None:
    unsupported(request)
    texts, images = [], []
    for number, message in enumerate(request.messages):
        t, i = parts(message)
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
