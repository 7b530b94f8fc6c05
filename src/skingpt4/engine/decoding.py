"""What each decode step runs besides the model: the never-generate mask, the stop-string check, the text stream.

Both cost O(1) per token and nothing per `generate` call beyond building a small object: the mask is computed
once per engine, and each token id's text is computed once per tokenizer (on first sight), so checking for a stop
string looks at the last few tokens' bytes only. transformers' own `suppress_tokens` rebuilds its mask every step
and `stop_strings` preprocesses the whole vocabulary on every call; these do neither and decide exactly the same.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator

import torch

from skingpt4.inputs.conversation import AnswerText

BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback: one byte per token


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet (each byte shown as one printable character), character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shown, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            shown[chr(byte)] = byte
        else:
            shown[chr(256 + extra)] = byte
            extra += 1
    return shown


class TokenBytes:
    """Each token id's text as it reads inside a decoded answer, as UTF-8 bytes; computed once per id.

    A piece is what the id adds after a plain anchor token (so SentencePiece's leading space is kept). Pieces that
    are part of one character are their raw bytes: SentencePiece byte fallback (`<0xE2>`) and byte-level BPE
    (GPT-2's alphabet). Special tokens add nothing, as answers are decoded without them.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.special = set(tokenizer.all_special_ids)
        self.anchor = tokenizer("a", add_special_tokens=False).input_ids[-1:]
        self.anchor_text = tokenizer.decode(self.anchor, skip_special_tokens=True)
        self.known: dict[tuple[int, bool], bytes] = {}
        self.lock = threading.Lock()

    def __call__(self, token_id: int, first: bool = False) -> bytes:
        """The id's bytes inside an answer, or (`first`) as the answer's first token, where the decoder may strip
        SentencePiece's leading space."""
        piece = self.known.get((token_id, first))
        if piece is None:
            with self.lock:
                piece = self.known[token_id, first] = self._piece(token_id, first)
        return piece

    def _piece(self, token_id: int, first: bool) -> bytes:
        if token_id in self.special:
            return b""
        token = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if byte := BYTE_PIECE.fullmatch(token):
            return bytes([int(byte.group(1), 16)])
        if first:
            text = self.tokenizer.decode([token_id], skip_special_tokens=True)
        else:
            text = self.tokenizer.decode(self.anchor + [token_id], skip_special_tokens=True)[len(self.anchor_text) :]
        if "\ufffd" in text and all(c in BYTE_LEVEL for c in token):  # byte-level BPE: part of a character
            return bytes(BYTE_LEVEL[c] for c in token)
        return text.encode("utf-8")


BYTE_LEVEL = _byte_level_alphabet()


class StopWhen:
    """Stopping criterion: a row stops once its generated text contains a stop string, or all rows once `cancel`
    is set (checked after each token step).

    Only an occurrence that ends in the newest token can be new, so each step looks at that token's bytes and
    the `longest - 1` bytes before them. Generation must start from embeddings: `input_ids` then hold only the
    generated ids. Stateless across steps, so beam search's reordering of rows cannot confuse it.

    Bytes, not decoded text, are matched: the same thing for any valid UTF-8. In a run of *invalid* byte pieces,
    which the decoder turns wholly into U+FFFD, a stop could match bytes the decoded answer does not show; only
    random models write such runs.
    """

    def __init__(self, pieces: TokenBytes, stops: list[str], cancel: threading.Event | None = None):
        self.pieces, self.cancel = pieces, cancel
        self.stops = [s.encode("utf-8") for s in stops if s]
        self.before = max((len(s) for s in self.stops), default=1) - 1  # bytes needed before the newest token

    def __call__(self, input_ids: torch.Tensor, scores=None, **kwargs) -> torch.Tensor:
        rows = input_ids.shape[0]
        if self.cancel is not None and self.cancel.is_set():
            return torch.ones(rows, dtype=torch.bool, device=input_ids.device)
        if not self.stops or input_ids.shape[1] == 0:
            return torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
        done = [self._ends_in_stop(lambda w, i=i: input_ids[i, -w:].tolist(), input_ids.shape[1]) for i in range(rows)]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    def hit(self, answer: list[int]) -> bool:
        """Whether an answer (its generated ids) ends in a stop string; the scheduler's per-row check."""
        return bool(answer) and self._ends_in_stop(lambda w: answer[-w:], len(answer))

    def _ends_in_stop(self, last, length: int) -> bool:
        """`last(w)`: the row's last `w` ids. A token adds at least one byte unless it is special (rare): for those
        the window doubles until it holds enough bytes, or the whole row."""
        if not self.stops:
            return False
        window = self.before + 1
        while (text := self._tail_text(last(window), window >= length)) is None:
            window *= 2
        return any(s in text for s in self.stops)

    def _tail_text(self, row: list[int], whole: bool) -> bytes | None:
        """The newest token's bytes after the `before` bytes ahead of them; None if `row` (a window of a longer
        row) holds too few."""
        # In a whole row, the first token that is not special reads as an answer's first token.
        first = next((i for i, t in enumerate(row) if t not in self.pieces.special), None) if whole else None
        before = b""
        for i in range(len(row) - 2, -1, -1):
            if len(before) >= self.before:
                break
            before = self.pieces(row[i], i == first) + before
        if len(before) < self.before and not whole:
            return None
        return (before[-self.before :] if self.before else b"") + self.pieces(row[-1], len(row) - 1 == first)


class Forbid:
    """Logits processor: never generate the ids in `mask` (a boolean row over the vocabulary, made once)."""

    def __init__(self, mask: torch.Tensor):
        self.mask = mask

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.mask.device != scores.device:  # a model split across devices: move once, keep
            self.mask = self.mask.to(scores.device)
        return scores.masked_fill_(self.mask, float("-inf"))


class TextPieces:
    """A streamer that yields the answer's text as it grows, through the answer's clean-up.

    `put` and `end` come from the decode loop and only hand ids over (the loop holds the model meanwhile); the text
    work is done by whoever reads: the consumer iterating over the pieces, or `text()` once the answer is done. That
    work decodes all ids so far (cheap at these lengths) and feeds what was added to `answer` (an `AnswerText`), which
    releases what is final. A trailing run of SentencePiece byte tokens (`<0xNN>`) is held back until it ends: the
    decoder turns the whole run into replacement characters if any byte is invalid, so only complete runs are final.
    The decoded text is therefore fed exactly once, and the pieces join to `answer.text`.
    """

    def __init__(self, tokenizer, answer: AnswerText):
        self.tokenizer, self.answer, self.ids, self.fed = tokenizer, answer, [], 0
        self.changed = threading.Condition()
        self.seen = 0  # ids already turned into text
        self.ended = self.finished = False
        self.pieces: list[str] = []  # released, not yet taken by the consumer

    def put(self, value: torch.Tensor) -> None:
        """The answer's next ids (any shape)."""
        with self.changed:
            self.ids.extend(value.flatten().tolist())
            self.changed.notify_all()

    def end(self) -> None:
        with self.changed:
            self.ended = True
            self.changed.notify_all()

    def text(self) -> str:
        """The whole answer once generation has ended (`end`), as the pieces join to."""
        with self.changed:
            self._advance()
            return self.answer.text

    def __iter__(self) -> Iterator[str]:
        while True:
            with self.changed:
                self.changed.wait_for(lambda: len(self.ids) > self.seen or self.ended or self.pieces)
                self._advance()
                pieces, self.pieces = self.pieces, []
                over = self.finished
            yield from pieces
            if over:
                return

    def _advance(self) -> None:
        """Turn the ids not yet seen into released pieces; once ended, the rest too. Holds `changed`."""
        if len(self.ids) > self.seen:
            self.seen = done = len(self.ids)  # the trailing run of byte pieces, looked at from the end only
            while done and BYTE_PIECE.fullmatch(self.tokenizer.convert_ids_to_tokens(self.ids[done - 1]) or ""):
                done -= 1
            self._feed(self._decoded(done))
        if self.ended and not self.finished:
            self._feed(self._decoded())
            self._send(self.answer.finish())
            self.finished = True

    def _decoded(self, upto: int | None = None) -> str:
        return self.tokenizer.decode(self.ids[:upto], skip_special_tokens=True)

    def _feed(self, text: str) -> None:
        if len(text) > self.fed:
            self._send(self.answer.feed(text[self.fed :]))
            self.fed = len(text)

    def _send(self, piece: str) -> None:
        if piece:
            self.pieces.append(piece)
