"""The review tool's input: cases from the transcripts of `skingpt4 eval --protocol clinical`, the clinician's
optional reference answers, and each case's image decoded for display (a fresh PNG from memory, never the file).
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from skingpt4.errors import InputError, first_line
from skingpt4.inputs.images import (
    DEFAULT_LIMITS,
    ImageRejected,
    load_image,
    png_bytes,
    read_source,
    sha256_bytes,
    thumbnail,
)
from skingpt4.text import readable, user_path

DISPLAY_MAX_SIDE = 2048  # a 12 Mpx photo as PNG would be ~20 MB per page view; 2048 px keeps lesion detail
IMAGE_CACHE = 8  # decoded display PNGs kept: the case on screen and its neighbours
ROLES = {"user": "Question", "assistant": "Model answer"}


@dataclass(frozen=True)
class Case:
    id: str
    image: Path
    image_sha256: str | None  # of the file the model saw; a different file now is not shown as if it were
    label: str | None
    turns: tuple[tuple[str, str], ...]  # (role, text)
    reference: str | None = None
    untrained: bool = False  # the transcripts came from a random model


# -- input files -------------------------------------------------------------------------------------------------


def load_cases(transcripts: Path, references: Path | None = None) -> list[Case]:
    """Cases from `transcripts.jsonl` (one JSON object a line), with reference answers when given."""
    path = Path(transcripts).expanduser()
    cases = [_case(line, path, n) for n, line in enumerate(_lines(path), 1) if line.strip()]
    if not cases:
        raise InputError(f"{path} holds no cases; write it with `skingpt4 eval --protocol clinical`")
    seen: set[str] = set()
    for case in cases:
        if case.id in seen:
            raise InputError(f"{path}: case {case.id!r} appears more than once")
        seen.add(case.id)
    if references is None:
        return cases
    answers = read_references(Path(references).expanduser())
    if not seen & set(answers):
        raise InputError(f"{references}: no reference answer names a case of {path.name}")
    return [dataclasses.replace(c, reference=answers.get(c.id)) for c in cases]


def _lines(path: Path) -> list[str]:
    if not path.exists():
        raise InputError(f"no transcripts file at {path}")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read {path}: {first_line(exc)}") from exc


def _case(line: str, path: Path, number: int) -> Case:
    where = f"{path} line {number}"
    try:
        item = json.loads(line)
    except ValueError:
        raise InputError(f"{where}: not valid JSON") from None
    if not isinstance(item, dict):
        raise InputError(f"{where}: expected a JSON object")
    case, image = item.get("case"), item.get("image")
    if not isinstance(case, str) or not case.strip():
        raise InputError(f"{where}: 'case' must be a non-empty string")
    if not isinstance(image, str) or not image:
        raise InputError(f"{where}: 'image' must be a path")
    for key in ("image_sha256", "label"):
        if not isinstance(item.get(key), (str, type(None))):
            raise InputError(f"{where}: '{key}' must be a string or null")
    turns = item.get("turns")
    if not isinstance(turns, list) or not turns or not all(_is_turn(t) for t in turns):
        raise InputError(f"{where}: 'turns' must be a list of {{'role': 'user'|'assistant', 'text': ...}}")
    image_path = path.parent / image  # relative to the transcripts (an absolute path stays as it is)
    if not image_path.exists() and image.startswith("~"):  # written by hand: `~/photos/a.jpg`
        image_path = user_path(image)
    turn_pairs = tuple((t["role"], readable(t["text"])) for t in turns)  # shown and stored: lone surrogates spelt
    untrained, label = item.get("untrained") is True, item.get("label")
    label = None if label is None else readable(label)
    return Case(readable(case), image_path, item.get("image_sha256"), label, turn_pairs, untrained=untrained)


def _is_turn(turn) -> bool:
    return isinstance(turn, dict) and turn.get("role") in ROLES and isinstance(turn.get("text"), str)


def read_references(path: Path) -> dict[str, str]:
    """The clinician's own answers, case -> answer, from a .csv (header `case,answer`) or JSON Lines file."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # spreadsheets write a BOM
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read reference answers {path}: {first_line(exc)}") from exc
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(text)))
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError:
            raise InputError(f"{path}: reference answers must be JSON Lines (or a .csv)") from None
    answers: dict[str, str] = {}
    for n, row in enumerate(rows, 1):
        if not isinstance(row, dict) or not isinstance(row.get("case"), str) or not isinstance(row.get("answer"), str):
            raise InputError(f"{path} row {n}: needs 'case' and 'answer' text")
        if row["case"] in answers:
            raise InputError(f"{path}: case {row['case']!r} has two reference answers")
        answers[row["case"]] = row["answer"]
    return answers


# -- images ------------------------------------------------------------------------------------------------------


class CaseImages:
    """Display PNGs, decoded on first view through `load_image` and kept for a few cases; or why there is none."""

    def __init__(self, cases: list[Case], size: int = IMAGE_CACHE):
        self.cases, self.size = cases, size
        self._cache: OrderedDict[int, tuple[bytes | None, str]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, index: int) -> tuple[bytes | None, str]:
        """(png, "") or (None, reason)."""
        with self._lock:
            if index in self._cache:
                self._cache.move_to_end(index)
                return self._cache[index]
        result = display_png(self.cases[index])  # outside the lock: decoding may take a moment
        with self._lock:
            self._cache[index] = result
            while len(self._cache) > self.size:
                self._cache.popitem(last=False)
        return result


def display_png(case: Case) -> tuple[bytes | None, str]:
    try:
        data = read_source(case.image, DEFAULT_LIMITS.max_bytes)
        if case.image_sha256 and sha256_bytes(data) != case.image_sha256.lower():
            return None, "the file differs from the one the model saw (image_sha256 does not match)"
        image = load_image(data)
    except (ImageRejected, OSError) as exc:
        if not case.image.exists():  # name the full path tried: the reviewer can see where it was looked for
            return None, f"no such file: {case.image.absolute()}"
        return None, first_line(exc)
    return png_bytes(thumbnail(image, DISPLAY_MAX_SIDE)), ""
