"""Diagnose in bulk: files, folders or manifests in; one record per image out (JSON Lines or CSV).

Resumable: a rerun skips images already in the output; each record is flushed and fsynced as it is written, so a
killed run loses at most the record in flight (a half-written last line is cut off on the next run). A bad image
is recorded with its reason and the run goes on. Images are answered in batches (left-padded).

Answers pass the safety rails like every surface: reassurance is replaced, referral advice appended, and every
record carries the disclaimer and the referral level. With a records store, each image also becomes a
consultation record (hashes, turns, settings; never the file name).
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from skingpt4.chat import ChatEngine, GenerationSettings, sha256_bytes
from skingpt4.conversation import DEFAULT_QUESTION
from skingpt4.errors import InputError, first_line
from skingpt4.images import DEFAULT_LIMITS, ImageRejected, load_image, read_source
from skingpt4.serve.safety import DISCLAIMER, LEVELS, review

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
RETRY = "generation failed"  # errors worth another try on a rerun
CSV_FIELDS = [
    "image",
    "image_sha256",
    "model",
    "untrained",
    "prompts",
    "answers",
    "answer",
    "referral",
    "triggers",
    "seconds",
    "error",
    "settings",
    "disclaimer",
    "manifest",
]


@dataclass
class Item:
    """One image to diagnose: its key in the output, where to read it, and manifest fields kept as they were."""

    key: str
    path: Path
    manifest: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def collect(inputs: list[str]) -> list[Item]:
    """Expand files, folders (recursively, sorted, no symlinks out of the folder) and manifests into items."""
    items: dict[str, Item] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = [Item(str(p), p) for p in walk_folder(path)]
        elif path.suffix.lower() in (".jsonl", ".csv") and path.is_file():
            found = list(read_manifest(path))
        elif path.is_file():
            found = [Item(str(path), path)]  # any file is tried; the image loader says why it is not an image
        else:
            raise InputError(f"no such file or folder: {raw}")
        for item in found:
            items.setdefault(item.key, item)
    return list(items.values())


def walk_folder(root: Path) -> Iterator[Path]:
    """Image files under `root`, sorted; symlinks are followed only when they stay inside `root`."""
    top = root.resolve()
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES or not path.is_file():
            continue
        if not path.resolve().is_relative_to(top):
            continue  # through a link to another patient's folder or a system file
        yield path


def read_manifest(path: Path) -> Iterator[Item]:
    """A JSON Lines (or CSV) manifest: `image` is a path relative to the manifest; other fields are kept."""
    rows = _csv_rows(path) if path.suffix.lower() == ".csv" else _jsonl_rows(path)
    for number, row in rows:
        image = row.get("image")
        if not isinstance(image, str) or not image:
            raise InputError(f"{path.name} line {number}: record has no 'image' path")
        target = path.parent / image
        yield Item(str(target), target, {k: v for k, v in row.items() if k != "image"})


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path.name} line {number}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path.name} line {number}: expected a JSON object")
        yield number, row


def _csv_rows(path: Path) -> Iterator[tuple[int, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        yield from enumerate(csv.DictReader(f), 2)


# ---------------------------------------------------------------------------------------------------------------
# Output


class RecordFile:
    """Append-only JSONL or CSV of records; knows which images are done; survives being killed mid-write."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
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
            return list(csv.DictReader(io.StringIO(text)))
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise InputError(f"{self.path.name} line {number} is not a JSON record (a results file?)") from None
        return records

    def failures(self, keys: set[str]) -> int:
        """How many of these images have an error as their latest record."""
        latest = {r["image"]: r.get("error") for r in self.records()}
        return sum(1 for key in keys if latest.get(key))

    def append(self, record: dict) -> None:
        if self.kind == "jsonl":
            line = json.dumps(record, ensure_ascii=False) + "\n"
        else:
            buffer = io.StringIO()
            writer = csv.DictWriter(buffer, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
            if not self.path.exists() or self.path.stat().st_size == 0:
                writer.writeheader()
            writer.writerow({k: _csv_cell(v) for k, v in record.items()})
            line = buffer.getvalue()
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        self.done.add(record["image"])


def _csv_cell(value):
    """Lists and dicts as JSON; line breaks as the two characters \\n, so that each record is one line and a record
    cut short by a kill is recognisable (and redone) on the next run."""
    text = json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else value
    return text.replace("\r", "\\r").replace("\n", "\\n") if isinstance(text, str) else text


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    stale: int = 0  # skipped images whose record came from another model or other prompts


def diagnose(
    engine: ChatEngine,
    items: list[Item],
    out: RecordFile,
    prompts: list[str] | None = None,
    settings: GenerationSettings | None = None,
    batch_size: int = 8,
    progress: bool = True,
    store=None,
) -> Summary:
    """Ask each image `prompts` in order (one conversation per image), `batch_size` images at a time."""
    from tqdm import tqdm

    prompts = prompts or [DEFAULT_QUESTION]
    settings = settings or GenerationSettings()
    todo = [item for item in items if item.key not in out.done]
    summary = Summary(skipped=len(items) - len(todo), stale=_stale(out, items, engine.loaded.model_id, prompts))
    with tqdm(total=len(todo), disable=not progress, unit="image") as bar:
        for start in range(0, len(todo), batch_size):
            for record in run_batch(engine, todo[start : start + batch_size], prompts, settings, store):
                out.append(record)
                summary.failed += record["error"] is not None
                summary.done += record["error"] is None
                bar.update(1)
    return summary


def _stale(out: RecordFile, items: list[Item], model_id: str, prompts: list[str]) -> int:
    """Done images whose record was made by another model or with other prompts (a rerun would skip them)."""
    keys = {item.key for item in items} & out.done
    stale = 0
    for record in out.records():
        asked = record.get("prompts")
        asked = json.loads(asked) if isinstance(asked, str) else asked  # CSV cells hold JSON
        if record["image"] in keys and (record.get("model") != model_id or asked != prompts):
            stale += 1
            keys.discard(record["image"])
    return stale


def run_batch(engine: ChatEngine, batch: list[Item], prompts: list[str], settings, store=None) -> list[dict]:
    """Decode, encode and answer one batch; a bad image or a failed generation becomes an error record."""
    started = time.perf_counter()
    records, good, images = load_batch(batch, lambda item: _blank_record(engine, item, prompts, settings))
    if good:
        try:
            _answer(engine, good, images, prompts, settings)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: record it, keep going
            for record in good:
                record["error"] = f"{RETRY}: {first_line(exc)}"
    seconds = round((time.perf_counter() - started) / len(batch), 4)
    for record in records:
        record["seconds"] = seconds
    if store is not None:
        _keep(engine, store, [(r, i) for r, i in zip(good, images) if r["error"] is None], settings)
    return records


def load_batch(batch: list[Item], blank) -> tuple[list[dict], list[dict], list]:
    """Each item's record (`blank(item)`), those whose image decoded, and the images; a rejected image's record
    carries the reason in "error" and its SHA-256 when the file could be read."""
    records, good, images = [], [], []
    for item in batch:
        record = blank(item)
        try:
            data = read_source(item.path, DEFAULT_LIMITS.max_bytes)  # the byte cap applies before reading
            record["image_sha256"] = sha256_bytes(data)
            images.append(load_image(data))
            good.append(record)
        except ImageRejected as exc:
            record["error"] = str(exc)
        records.append(record)
    return records, good, images


def _answer(engine: ChatEngine, records: list[dict], images: list, prompts: list[str], settings) -> None:
    """One conversation per image; each answer passes the safety rails before it is recorded."""
    features = engine.encode_images(images)
    sessions = [engine.session() for _ in records]
    for session, record, feature in zip(sessions, records, features):
        session.add_encoded(feature, record["image_sha256"])
    for n, prompt in enumerate(prompts):
        for session in sessions:
            session.ask(prompt)
        for record, answer in zip(records, engine.generate(sessions, settings)):
            verdict = review(answer, "\n".join(prompts[: n + 1]))
            record["answers"].append(verdict.text.removesuffix(DISCLAIMER).rstrip())  # the disclaimer: own field
            record["referral"] = max(record["referral"], verdict.level, key=LEVELS.index)
            record["triggers"] = sorted({*record["triggers"], *verdict.triggers})
    for record in records:
        record["answer"] = record["answers"][0]


def _keep(engine: ChatEngine, store, done: list[tuple[dict, object]], settings) -> None:
    """Each diagnosed image as a consultation record: hashes, turns and settings, never the file name."""
    from skingpt4.serve.consult import model_sha256, png_bytes

    path = engine.loaded.path
    for record, image in done:
        turns = []
        for prompt, answer in zip(record["prompts"], record["answers"]):
            turns += [{"role": "user", "text": prompt}, {"role": "assistant", "text": f"{answer}\n\n{DISCLAIMER}"}]
        store.save(
            {
                "surface": "diagnose",
                "model_id": engine.loaded.model_id,
                "model_sha256": model_sha256(str(path)) if path else "",
                "images": [{"sha256": record["image_sha256"], "png": png_bytes(image) if store.keep_images else None}],
                "turns": turns,
                "settings": asdict(settings),
            }
        )


def _blank_record(engine: ChatEngine, item: Item, prompts: list[str], settings) -> dict:
    return {
        "image": item.key,
        "image_sha256": None,
        "model": engine.loaded.model_id,
        "untrained": engine.loaded.meta.untrained,
        "prompts": list(prompts),
        "answers": [],
        "answer": None,
        "referral": "none",
        "triggers": [],
        "seconds": None,
        "error": None,
        "settings": asdict(settings),
        "disclaimer": DISCLAIMER,
        "manifest": item.manifest,
    }
