"""A consultation as another model family reads it (`folder/family.py`), and a reasoning model's answer.

The consultation is the same `Conversation` every surface fills (photos, neutralised questions, shown answers);
`FamilyConversation.chat_messages` hands it to the family's own chat template as standard chat messages: each user
turn its photos first, then its text (consecutive user messages, a photo and then a question, are one turn), each
answer as it was shown. The template has no role strings of ours, so only the tokenizer's special tokens (its turn
markers and image tokens among them) are removed from user text.

`ThinkingAnswer`: a reasoning model (SkinGPT-R1) writes `<think>...</think>` before its answer. That block is kept
apart (`reasoning`: records keep it, the web app shows it folded) and never reaches the shown answer, nor
therefore the next prompt. An answer that does not begin with `<think>` is shown as it comes.
"""

from __future__ import annotations

from dataclasses import dataclass

from skingpt4.errors import InputError
from skingpt4.inputs.conversation import (
    CONTROL_CHARS,
    IMAGE_PLACEHOLDER,
    AnswerText,
    Conversation,
    Template,
    strip_markup,
)

THINK, END_THINK = "<think>", "</think>"


def family_template(name: str) -> Template:
    """The family's answers have no stop string or role marker of ours (its chat template and EOS ids end them)."""
    return Template(
        name=name, system="", roles=("", ""), open_role="", sep="", stop=None, answer_marker="", reserved=()
    )


@dataclass
class FamilyConversation(Conversation):
    max_images: int | None = None  # photos per consultation the model reads (None: no limit of its own)

    def add_image(self) -> None:
        if self.max_images is not None and self.num_images >= self.max_images:
            raise InputError(
                f"this model ({self.template.name}) reads {self.max_images} photo per consultation; "
                "start a new consultation for another photo"
            )
        super().add_image()

    def chat_messages(self, system: str = "", in_question: bool = False) -> list[dict]:
        """The messages for the family's chat template, the open question last; `system` as a system turn, or
        (`in_question`) before the first question's text."""
        turn = system and not in_question
        messages = [{"role": "system", "content": [{"type": "text", "text": system}]}] if turn else []
        for role, text in self.messages:
            content = [{"type": "image"}] * text.count(IMAGE_PLACEHOLDER) if role == 0 else []
            words = strip_markup(text, self.special_tokens).strip()
            content += [{"type": "text", "text": words}] if words or role else []
            name = ("user", "assistant")[role]
            if messages and messages[-1]["role"] == name:
                messages[-1]["content"] += content
            else:
                messages.append({"role": name, "content": content})
        if in_question and system and messages:
            content = messages[0]["content"]
            text = next((part for part in content if part["type"] == "text"), None)
            if text is None:
                content.append(text := {"type": "text", "text": ""})
            text["text"] = f"{system}\n\n{text['text']}".strip()
        return messages


class ThinkingAnswer(AnswerText):
    """`AnswerText` that keeps a leading `<think>...</think>` block apart, in `reasoning`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw, self.thinking = "", None  # None: not known yet whether the answer begins with a thought

    def feed(self, piece: str) -> str:
        if self.thinking is False:
            return super().feed(piece)
        self.raw += piece
        head = self.raw.lstrip()
        if self.thinking is None:
            if THINK.startswith(head):
                return ""  # empty so far, or maybe the start of <think>
            self.thinking = head.startswith(THINK)
            if not self.thinking:
                return super().feed(self.raw)
        if END_THINK not in head:
            return ""
        thought, _, rest = head[len(THINK) :].partition(END_THINK)
        self._keep(thought)
        self.thinking = False
        return super().feed(rest)

    def finish(self) -> str:
        if self.thinking:  # the budget ended inside the thought: nothing to show
            self._keep(self.raw.lstrip()[len(THINK) :])
            return super().finish()
        released = ""
        if self.thinking is None and self.raw:  # a start that was no thought after all (" <thi")
            self.thinking = False
            released = super().feed(self.raw)
        return released + super().finish()

    def _keep(self, thought: str) -> None:
        self.reasoning = strip_markup(CONTROL_CHARS.sub("", thought), tuple(self.banned)).strip()
