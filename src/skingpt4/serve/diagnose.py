"""Diagnose in bulk: files, folders or manifests in; one record per image out (JSON Lines or CSV).

Resumable: a rerun skips images already in the output; each record is flushed and fsynced as it is written, so a
killed run loses at most the record in flight (a half-written last line is cut off on the next run). A bad image
is recorded with its reason and the run goes on. Images are answered in batches (left-padded).

Answers pass the safety rails like every surface: reassurance is replaced, referral advice appended, and every
record carries the disclaimer and the referral level. With a records store, each image also becomes a
consultation record (hashes, turns, settings; never the file name).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from skingpt4.data.manifest import Item, prefetched
from skingpt4.data.results import RETRY, RecordFile, keep_reasoning
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import first_line
from skingpt4.inputs.conversation import DEFAULT_QUESTION
from skingpt4.inputs.images import png_bytes
from skingpt4.serve.safety import DISCLAIMER, LEVELS, review

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine

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


def results_file(path) -> RecordFile:
    """The output of a run: `.jsonl`, or `.csv` with one column per record field."""
    return RecordFile(path, CSV_FIELDS)


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Summary:
    done: int = 0
    failed: int = 0
    skipped: int = 0
    stale: int = 0  # skipped images whose record came from another model or other prompts


def diagnose(
    engine: Engine,
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
    summary = Summary(skipped=len(items) - len(todo), stale=_stale(out, items, engine.info.model_id, prompts))
    batches = [todo[start : start + batch_size] for start in range(0, len(todo), batch_size)]
    blank = functools.partial(_blank_record, engine, prompts=prompts, settings=settings)
    with tqdm(total=len(todo), disable=not progress, unit="image") as bar:
        for loaded in prefetched(batches, blank):
            for record in run_batch(engine, loaded, prompts, settings, store):
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


def run_batch(engine: Engine, loaded, prompts: list[str], settings, store=None) -> list[dict]:
    """Encode and answer one batch, as `load_images` gave it; a bad image or a failed generation is an error
    record. "seconds" is the batch's answering time shared by the images it answered (they are answered together;
    the batch was decoded while the one before was answered); a rejected image was not answered: None."""
    started = time.perf_counter()
    records, good, images = loaded
    if good:
        try:
            _answer_in_halves(engine, good, images, prompts, settings)
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory alone: record it, keep going
            for record in good:
                record["error"] = f"{RETRY}: {first_line(exc)}"
    seconds = round((time.perf_counter() - started) / max(len(good), 1), 4)
    answered = {id(record) for record in good}
    for record in records:
        record["seconds"] = seconds if id(record) in answered else None
    if store is not None:
        _keep(engine, store, [(r, i) for r, i in zip(good, images) if r["error"] is None], settings)
    return records


def _answer_in_halves(engine: Engine, records: list[dict], images: list, prompts: list[str], settings) -> None:
    """`_answer`; a batch that runs out of memory is answered again in halves (the engine admits smaller batches
    after an out-of-memory error), down to one image, which then fails alone (its record says so)."""
    import torch

    try:
        _answer(engine, records, images, prompts, settings)
    except torch.OutOfMemoryError as exc:
        if len(records) == 1:
            records[0]["error"] = f"{RETRY}: {first_line(exc)}"
            return
        half = len(records) // 2
        for part in (slice(None, half), slice(half, None)):
            for record in records[part]:  # what the failed try left in them goes
                record.update(answers=[], referral="none", triggers=[])
            _answer_in_halves(engine, records[part], images[part], prompts, settings)


def _answer(engine: Engine, records: list[dict], images: list, prompts: list[str], settings) -> None:
    """One conversation per image; each answer passes the safety rails before it is recorded."""
    features = engine.encode_images(images)
    sessions = [engine.session() for _ in records]
    for session, record, feature in zip(sessions, records, features):
        session.add_encoded(feature, record["image_sha256"])
    for n, prompt in enumerate(prompts):
        for session in sessions:
            session.ask(prompt)
        for record, session, answer in zip(records, sessions, engine.generate(sessions, settings)):
            verdict = review(answer, "\n".join(prompts[: n + 1]))
            record["answers"].append(verdict.text.removesuffix(DISCLAIMER).rstrip())  # the disclaimer: own field
            keep_reasoning(record, session.reasoning)
            record["referral"] = max(record["referral"], verdict.level, key=LEVELS.index)
            record["triggers"] = sorted({*record["triggers"], *verdict.triggers})
    for record in records:
        record["answer"] = record["answers"][0]


def _keep(engine: Engine, store, done: list[tuple[dict, object]], settings) -> None:
    """Each diagnosed image as a consultation record: hashes, turns and settings, never the file name."""
    from skingpt4.serve.consult import model_sha256

    path = engine.info.path
    for record, image in done:
        turns = []
        for prompt, answer in zip(record["prompts"], record["answers"]):
            turns += [{"role": "user", "text": prompt}, {"role": "assistant", "text": f"{answer}\n\n{DISCLAIMER}"}]
        store.save(
            {
                "surface": "diagnose",
                "model_id": engine.info.model_id,
                "model_sha256": model_sha256(str(path)) if path else "",
                "images": [{"sha256": record["image_sha256"], "png": png_bytes(image) if store.keep_images else None}],
                "turns": turns,
                "settings": asdict(settings),
            }
        )


def _blank_record(engine: Engine, item: Item, prompts: list[str], settings) -> dict:
    return {
        "image": item.key,
        "image_sha256": None,
        "model": engine.info.model_id,
        "untrained": engine.info.meta.untrained,
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
