"""Results files: records appended one per line to JSON Lines or CSV, crash-safe and resumable.

Each record is flushed and fsynced as it is written, so a killed run loses at most the record in flight; a
half-written last line is cut off when the file is opened again. A record's `image` key says which image is done;
one whose `error` starts with `RETRY` (a failed generation, e.g. out of memory) is tried again on a rerun, while a
rejected image stays done (retrying cannot help).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path

from skingpt4.errors import InputError
from skingpt4.text import readable_values

RETRY = "generation failed"  # errors worth another try on a rerun


class RecordFile:
    """Append-only JSONL or CSV of records; knows which images are done; survives being killed mid-write."""

    def __init__(self, path: str | Path, csv_fields: list[str] | None = None):
        self.path = Path(path)
        self.csv_fields = csv_fields or []
        self.kind = self.path.suffix.lower().lstrip(".")
        if self.kind not in ("jsonl", "csv"):
            raise InputError(f"--out must end in .jsonl or .csv, got {self.path.name}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._drop_partial_line()
        # Rejected images stay done (retrying cannot help); a failed generation (e.g. out of memory) is retried.
        self.done = {r["image"] for r in self.records() if not str(r.get("error") or "").startswith(RETRY)}

    def _drop_partial_line(self) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        data = self.path.read_bytes()
        if not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)  # the record a kill interrupted; it will be redone

    def records(self) -> list[dict]:
        if not self.path.exists():
            return []
        text = self.path.read_text(encoding="utf-8")
        if self.kind == "csv":
            return [{k: _from_cell(v) for k, v in row.items()} for row in csv.DictReader(io.StringIO(text))]
        records = []
        for number, line in enumerate(lines(text), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{self.path.name} line {number} is not a JSON record (a results file?)") from None
        return records

    def failures(self, keys: set[str]) -> dict[str, str]:
        """These images whose latest record is an error, with the error, in the file's order."""
        latest = {r["image"]: r.get("error") for r in self.records()}
        return {key: error for key, error in latest.items() if error and key in keys}

    def append(self, record: dict) -> None:
        record = readable_values(record)  # a file name that is not UTF-8 is written out, never a crash mid-run
        if self.kind == "jsonl":
            line = json.dumps(record, ensure_ascii=False) + "\n"
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, self.csv_fields, extrasaction="ignore", lineterminator="\n")
            if not self.path.exists() or self.path.stat().st_size == 0:
                writer.writeheader()
            writer.writerow({k: _csv_cell(v) for k, v in record.items()})
            line = buffer.getvalue()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done.add(record["image"])


def lines(text: str) -> list[str]:
    """JSON Lines split at newlines only (`str.splitlines` also splits at U+2028, U+0085 and others, which JSON
    strings may hold as they are)."""
    return [line.removesuffix("\r") for line in text.split("\n")]


def _csv_cell(value):
    """Lists and dicts as JSON; line breaks as the two characters \\n (and a backslash as two), so that each record
    is one line, a record cut short by a kill is recognisable (and redone) on the next run, and every cell reads
    back as it was written."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value
    if not isinstance(text, str):
        return text
    return text.replace("\\", "\\\\").replace("\r", "\\r").replace("\n", "\\n")


_ESCAPED = re.compile(r"\\([\\rn])")


def _from_cell(cell: str | None) -> str | None:
    return None if cell is None else _ESCAPED.sub(lambda m: {"\\": "\\", "r": "\r", "n": "\n"}[m[1]], cell)


def keep_reasoning(record: dict, thought: str) -> None:
    """After an answer is added to a bulk record's "answers": a reasoning model's thought for it in "reasoning"
    (one per answer), which records of models that write none do not have."""
    if thought or "reasoning" in record:
        record.setdefault("reasoning", [""] * (len(record["answers"]) - 1)).append(thought)
