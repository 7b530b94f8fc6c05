"""Conversation templates, exactly as the released SkinGPT-4 code renders them.

The default template `skingpt4` is the released code's `CONV_VISION` (Vicuna-v0 style, used for both the Vicuna
and the Llama-2-13b-chat builds):

    <system>###Human: <Img><ImageHere></Img> What's wrong with my skin?###Assistant:

Each image adds a Human message `<Img><ImageHere></Img>`; the first question after an image is merged into that
message with a space. Generation stops at the string `###`. User text never reaches the template raw: reserved
strings are removed first (`neutralise`), so it can neither forge a turn nor add an image slot.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

IMAGE_PLACEHOLDER = "<ImageHere>"
IMAGE_MESSAGE = f"<Img>{IMAGE_PLACEHOLDER}</Img>"
SYSTEM = (
    "Give the following image: <Img>ImageContent</Img>. "
    "You will be able to see the image once I provide it to you. Please answer my questions."
)
CLINICAL_PROMPTS = (  # the paper's clinical evaluation, asked in this order in one chat (NC paper, Methods)
    "Could you describe the skin disease in this image for me?",
    "Please provide a paragraph listing additional features you observed in the image.",
    "Based on the previous information, please provide a detailed explanation of the cause of this skin disease.",
    "What treatment and medication should be recommended for this case?",
)
DEFAULT_QUESTION = "Could you describe the skin disease in this image for me?"


@dataclass(frozen=True)
class Template:
    """How messages become one prompt string: `system + sep`, then `role + message + sep` per message.

    The defaults are SkinGPT-4's own template, the released code's `CONV_VISION`.
    """

    name: str = "skingpt4"
    system: str = SYSTEM
    roles: tuple[str, str] = ("Human: ", "Assistant: ")  # (user, assistant), each with its trailing separator text
    open_role: str = "Assistant:"  # the assistant role as the prompt's last text, awaiting the answer
    sep: str = "###"
    stop: str | None = "###"  # generation stops at this string (besides EOS)
    answer_marker: str = "Assistant:"  # the original post-processing keeps the text after such a marker
    reserved: tuple[str, ...] = ("Human:", "Assistant:")  # strings user text may never contain

    def render(self, messages: list[tuple[int, str | None]]) -> str:
        parts = [self.system + self.sep]
        for role, text in messages:
            parts.append(self.roles[role] + text + self.sep if text is not None else self.open_role)
        return "".join(parts)


TEMPLATES = {
    "skingpt4": Template(),
    # MiniGPT-4's CONV_VISION_LLama2: an option for Llama-2-chat models trained with that format.
    "llama2": Template(
        name="llama2",
        roles=("<s>[INST] ", " [/INST] "),
        open_role=" [/INST] ",
        sep="",
        stop=None,
        answer_marker="[/INST]",
        reserved=("[INST]", "[/INST]", "<<SYS>>", "<</SYS>>"),
    ),
}


def get_template(name: str) -> Template:
    if name not in TEMPLATES:
        raise ValueError(f"unknown template {name!r}; choose one of: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


_MARKUP = (IMAGE_PLACEHOLDER, "<Img>", "</Img>")


def strip_markup(text: str, special_tokens: tuple[str, ...] = ()) -> str:
    """Remove image markup and special-token strings, which would add image slots or control ids to a prompt."""
    banned = sorted({*_MARKUP, *special_tokens} - {""}, key=len, reverse=True)
    pattern = re.compile("|".join(re.escape(s) for s in banned), flags=re.IGNORECASE)
    previous = None
    while previous != text:
        previous, text = text, pattern.sub("", text)
    return text


def neutralise(text: str, template: Template, special_tokens: tuple[str, ...] = ()) -> str:
    """Remove what would let user text change the prompt's structure.

    Image markup and special-token strings are deleted, runs of `#` shrink to one (`###` is the turn separator
    and the stop string), and the template's role markers are deleted. Repeated until stable, so that removing
    one marker cannot assemble another (`<Img<Img>>`).
    """
    roles = re.compile("|".join(re.escape(s) for s in template.reserved), flags=re.IGNORECASE)
    previous = None
    while previous != text:
        previous = text
        text = strip_markup(text, special_tokens)
        text = re.sub(r"#{2,}", "#", roles.sub("", text) if template.reserved else text)
    return text.strip()


CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ufffd]")  # C0/C1 but newline and tab; U+FFFD


class AnswerText:
    """Generated text -> the answer, as it streams: the one rule for what is shown and what is stored.

    The released code's clean-up, made streamable: the answer ends at the first stop string (the template's and the
    request's); a role marker (`Assistant:`) at the very start is skipped, and one later ends the answer (the
    original kept the text after the last marker, which would take back text already shown). Image markup and
    special-token strings are removed (they would add image slots or control ids to the next prompt), and so are
    control characters and U+FFFD (an escape sequence must never reach a terminal); both ends are stripped.

    `feed` returns the text that became final; a tail that may still turn into a stop string, a marker or markup is
    held back until the next piece says what it is. `text` is everything released, so a stream joined and the
    stored answer are the same string.
    """

    def __init__(self, template: Template, stops: tuple[str, ...] | list[str] = (), special_tokens=()):
        self.marker = template.answer_marker
        self.ends = [s for s in (template.stop, *stops, self.marker) if s]
        self.banned = [s.lower() for s in {*_MARKUP, *special_tokens} if s]
        self.pending, self.text, self.done = "", "", False
        self.reasoning = ""  # a reasoning model's thought (`family_prompt.ThinkingAnswer`); never shown

    def whole(self, text: str) -> str:
        """The answer in a text that is complete (not streamed)."""
        self.feed(text)
        self.finish()
        return self.text

    def feed(self, piece: str) -> str:
        if self.done:
            return ""
        self.pending = strip_markup(CONTROL_CHARS.sub("", self.pending + piece), tuple(self.banned))
        if not self.text:
            self.pending = self.pending.lstrip()
            while self.marker and self.pending.startswith(self.marker):
                self.pending = self.pending[len(self.marker) :].lstrip()
            if self.marker.startswith(self.pending):
                return ""  # empty, or maybe the start of a leading marker
        cut = min((i for i in (self.pending.find(end) for end in self.ends) if i >= 0), default=-1)
        if cut >= 0:
            self.done = True
            return self._release(self.pending[:cut].rstrip())
        held = max(_partial(self.pending, s) for s in [*self.ends, *self.banned])
        return self._release(self.pending[: len(self.pending) - held].rstrip())

    def finish(self) -> str:
        """The rest, once generation has ended (a held-back tail that turned out to be plain text)."""
        tail = "" if self.done else self.pending.rstrip()
        self.done = True
        return self._release(tail)

    def _release(self, part: str) -> str:
        self.pending = self.pending[len(part) :] if not self.done else ""
        self.text += part
        return part


def _partial(text: str, target: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `target` (case-insensitive)."""
    text, target = text[-len(target) :].lower(), target.lower()
    for n in range(min(len(target) - 1, len(text)), 0, -1):
        if text.endswith(target[:n]):
            return n
    return 0


@dataclass
class Conversation:
    """Messages of one consultation, as the original `Chat` builds them (role 0 = user, 1 = assistant)."""

    template: Template
    messages: list[tuple[int, str | None]] = field(default_factory=list)
    special_tokens: tuple[str, ...] = ()
    _before_turn: list | None = field(default=None, repr=False)  # the messages before the last question

    @property
    def num_images(self) -> int:
        return sum(text.count(IMAGE_PLACEHOLDER) for role, text in self.messages if role == 0 and text)

    def add_image(self) -> None:
        self.messages.append((0, IMAGE_MESSAGE))
        self._before_turn = None  # a photo after an answer begins the next turn: the last one stands

    def add_question(self, text: str) -> str:
        """Append user text (neutralised); merge it into a preceding image message, as the original does."""
        clean = neutralise(text, self.template, self.special_tokens)
        self._before_turn = list(self.messages)
        if self.messages and self.messages[-1][0] == 0 and self.messages[-1][1].endswith("</Img>"):
            self.messages[-1] = (0, f"{self.messages[-1][1]} {clean}")
        else:
            self.messages.append((0, clean))
        return clean

    def prompt(self) -> str:
        """The prompt for the next answer: all messages, then the open assistant role.

        Answers are read without image markup or special-token strings (`AnswerText` removes them as they stream,
        and an API client replays answers it may have edited), so no answer can add an image slot or control id.
        """
        return self.template.render([*self._readable(), (1, None)])

    def history(self) -> str:
        """All messages as the model reads them, without the open role: how every later prompt begins."""
        return self.template.render(self._readable())

    def _readable(self) -> list[tuple[int, str]]:
        return [(role, strip_markup(text, self.special_tokens) if role else text) for role, text in self.messages]

    def add_answer(self, text: str) -> str:
        """Store an answer as it was shown."""
        self.messages.append((1, text))
        return text

    def withdraw(self) -> None:
        """Undo the last `add_question`, and its answer if it has one: a failed answer, or one never shown. Once a
        photo or another question has followed, that turn stands and this does nothing."""
        if self._before_turn is not None:
            self.messages = self._before_turn
            self._before_turn = None

    @property
    def awaiting_answer(self) -> bool:
        return bool(self.messages) and self.messages[-1][0] == 0
