"""Evaluate a model on a labelled image set: batched, resumable, offline, no remote judge.

`run_eval` answers every image (K times with sampling when `repeats` > 1) and appends one record per image and
repeat to `OUT/predictions.jsonl` (fsynced; a rerun skips what is done, redoes a failed generation and a record a
kill cut short). Then it writes `metrics.json` and the report (`report.html`, `report.md`, PNGs) from all records.

Modes:
- "open": the model answers the question freely; the diagnosis is found in its text and matched to the label set
  (labels.py). An unmatched answer counts as wrong.
- "choice": the model scores every candidate label by the log-likelihood of the trained answer sentence naming
  it, "This could be a skin disease image of <label>." plus the template's stop string, after the same prompt.
  The score is the sum of the sentence's token log-probabilities, not length-normalised: the sum is log
  P(sentence | image, question), so the softmax over candidates is the model's own distribution restricted to the
  label set, and the shared prefix cancels. (A per-token mean has no such reading and favours long names whose
  later tokens are predictable.) The stop string is scored too, so "melanoma" does not get the credit of
  "melanoma in situ". This gives a ranking and probabilities, hence top-k and AUROC.

The clinical protocol asks the paper's four prompts in one conversation per image and writes `transcripts.jsonl`
and `transcripts.md` for the clinicians' review; its diagnosis (for metrics, when labels are known) is matched in
the first answer. Records hold the model's raw text: the safety rails are for people reading answers, and adding
their fixed advice here would change what is being measured.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from skingpt4.data.manifest import Item, prefetched
from skingpt4.data.results import RETRY, RecordFile, keep_reasoning
from skingpt4.engine.settings import GenerationSettings
from skingpt4.errors import InputError, first_line
from skingpt4.evaluate import labels as L
from skingpt4.evaluate import synonyms as S
from skingpt4.evaluate.metrics import SKIN_GROUPS
from skingpt4.evaluate.outputs import finish, write_transcripts
from skingpt4.evaluate.scoring import ANSWER_FORMAT, score_labels
from skingpt4.folder.meta import TRAINING_IMAGES
from skingpt4.inputs.conversation import CLINICAL_PROMPTS, DEFAULT_QUESTION

if TYPE_CHECKING:
    from skingpt4.engine.protocol import Engine

SKIN_GROUP_NAMES = tuple(SKIN_GROUPS)
MODES = ("open", "choice")
PROTOCOLS = ("diagnosis", "clinical")


# ---------------------------------------------------------------------------------------------------------------
# Inputs


def resolve_labels(labels: list[str] | str | None, items: list[Item]) -> list[str]:
    """Labels given, a named set ("paper15", "ham10000", "fitzpatrick17k-3", "ddi"...), or the manifest's."""
    if isinstance(labels, str):
        return S.named_set(labels)
    if labels:
        return list(dict.fromkeys(labels))
    found = sorted({str(item.manifest["label"]) for item in items if item.manifest.get("label") not in (None, "")})
    if not found:
        raise InputError("no label set: the manifest has no 'label' values; give labels or a named set")
    return found


def true_labels(items: list[Item], labels: list[str], required: bool) -> dict[str, str | None]:
    """Each item's manifest label as a member of `labels` (same name, spelling or concept); one line if not."""
    out, missing, unlabelled = {}, {}, 0
    for item in items:
        value = item.manifest.get("label")
        if value in (None, ""):
            unlabelled += 1
            out[item.key] = None
            continue
        out[item.key] = canonical(str(value), labels)
        if out[item.key] is None:
            missing[str(value)] = missing.get(str(value), 0) + 1
    if missing:
        names = ", ".join(sorted(missing))
        raise InputError(f"labels not in the label set: {names} ({sum(missing.values())} images)")
    if required and unlabelled:
        raise InputError(f"{unlabelled} of {len(items)} images have no 'label' in the manifest")
    return out


def canonical(value: str, labels: list[str]) -> str | None:
    """`value` as one of `labels`: the same string, the same normalised name, or a synonym of the same concept."""
    if value in labels:
        return value
    table, key = S.table(), S.norm(value)
    for label in labels:
        if S.norm(label) == key:
            return label
    concept = table.by_name.get(key)
    same = [label for label in labels if concept is not None and table.by_name.get(S.norm(label)) == concept]
    return same[0] if len(same) == 1 else None


# ---------------------------------------------------------------------------------------------------------------
# Output


class PredictionFile(RecordFile):
    """predictions.jsonl: diagnose's crash-safe record file, with one record per image *and repeat*."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.done = {_key(r) for r in self.records() if not str(r.get("error") or "").startswith(RETRY)}

    def append(self, record: dict) -> None:
        super().append(record)
        self.done.add(_key(record))

    def latest(self) -> dict[tuple[str, int], dict]:
        return {_key(r): r for r in self.records()}


def _key(record: dict) -> tuple[str, int]:
    return record["image"], int(record.get("repeat") or 0)


def check_run(out: Path, config: dict) -> None:
    """A folder holds one run: resuming with other settings would mix two experiments in one set of numbers."""
    path = out / "run.json"
    config = json.loads(json.dumps(config))  # compared as stored (tuples become lists)
    if path.exists():
        old = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        if changed:
            raise InputError(f"{out} holds a run with other {', '.join(changed)}; use another output folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# The run


def run_eval(
    engine: Engine,
    items: list[Item],
    out_dir: str | Path,
    *,
    labels: list[str] | str | None = None,
    mode: str = "open",
    settings: GenerationSettings | None = None,
    seed: int = 0,
    batch_size: int = 8,
    repeats: int = 1,
    protocol: str = "diagnosis",
    question: str = DEFAULT_QUESTION,
    n_boot: int = 1000,
    progress: bool = True,
    split: str | None = None,
) -> dict:
    """Evaluate `items` (diagnose.Item with manifest fields `label`, `fitzpatrick`) into `out_dir`.

    Greedy by default; with `repeats` K > 1 each image is answered K times with sampling, seeds seed..seed+K-1
    (the consistency ratio). `split` picks the manifest rows scored (`choose_split`). Returns {"done", "skipped",
    "failed", "errors" (images whose latest record is an error), "split", "warnings", "metrics", "files"}.
    """
    if mode not in MODES or protocol not in PROTOCOLS:
        raise InputError(f"mode must be one of {MODES} and protocol one of {PROTOCOLS}")
    items, split, warnings = choose_split(items, split)
    if repeats < 1 or (repeats > 1 and (mode == "choice" or protocol == "clinical")):
        raise InputError("repeats > 1 is for open-mode diagnosis (choice scores do not vary)")
    if protocol == "clinical" and mode == "choice":
        raise InputError("the clinical protocol is open answers; choice mode does not apply")
    have_labels = labels is not None or any(item.manifest.get("label") not in (None, "") for item in items)
    label_set = resolve_labels(labels, items) if have_labels or protocol == "diagnosis" else []
    truth = true_labels(items, label_set, required=protocol == "diagnosis") if label_set else {}
    settings = _settings(settings, seed, repeats)
    prompts = list(CLINICAL_PROMPTS) if protocol == "clinical" else [question]
    out = Path(out_dir)
    config = {
        "model": engine.info.model_id,
        "untrained": engine.info.meta.untrained,
        "mode": mode,
        "protocol": protocol,
        "labels": label_set,
        "prompts": prompts,
        "settings": asdict(settings),
        "seed": seed,
        "repeats": repeats,
        "split": split,
        **({"answer_format": ANSWER_FORMAT} if mode == "choice" else {}),
    }
    check_run(out, config)
    file = PredictionFile(out / "predictions.jsonl")
    context = Context(engine, label_set, truth, prompts, mode, settings, case_ids(items))
    summary = _answer_all(context, items, repeats, batch_size, file, progress)
    records = current(file.latest(), items, truth)
    warnings += seen_in_training(engine, records)
    metrics = finish(out, records, label_set, config, n_boot, warnings) if label_set else None
    files = write_transcripts(out, records) if protocol == "clinical" else {}
    errors = sum(1 for record in records.values() if record.get("error"))
    files = {k: str(v) for k, v in files.items()}
    return {**summary, "errors": errors, "split": split, "warnings": warnings, "metrics": metrics, "files": files}


def seen_in_training(engine: Engine, records: dict) -> list[str]:
    """A warning when images scored are among the model's training images (its folder lists them by content)."""
    listed = engine.info.path / TRAINING_IMAGES if engine.info.path else None
    if listed is None or not listed.is_file():
        return []
    trained = set(listed.read_text().split())
    scored = {r.get("image_sha256") for r in records.values() if r.get("image_sha256")}
    seen = len(scored & trained)
    return [f"{seen} of the {len(scored)} images scored were in this model's training data"] if seen else []


def choose_split(items: list[Item], split: str | None) -> tuple[list[Item], str, list[str]]:
    """The rows to score: `split` by name, "all", or by default `test` when the manifest has splits (else all).

    Scoring training rows measures memory, not diagnosis: it is allowed (by name or "all") and warned about.
    """
    if not items:
        raise InputError("no images to evaluate")
    has_splits = any(item.manifest.get("split") for item in items)
    split = split or ("test" if has_splits else "all")
    chosen = items if split == "all" else [item for item in items if item.manifest.get("split") == split]
    if not chosen:
        found = sorted({str(item.manifest.get("split")) for item in items if item.manifest.get("split")})
        where = f"the manifest's splits are {', '.join(found)}" if found else "the manifest has no 'split' field"
        raise InputError(f"no images in split {split!r} to evaluate ({where}; --split all scores every row)")
    training = sum(1 for item in chosen if item.manifest.get("split") == "train")
    warnings = [f"{training} of the {len(chosen)} images scored are training images"] if training else []
    return chosen, split, warnings


def _settings(settings: GenerationSettings | None, seed: int, repeats: int) -> GenerationSettings:
    if settings is None:
        settings = GenerationSettings.greedy() if repeats == 1 else GenerationSettings()
    if repeats > 1 and not settings.do_sample:
        raise InputError("repeats > 1 needs sampling: greedy answers would repeat exactly")
    return dataclasses.replace(settings, seed=seed)


@dataclasses.dataclass
class Context:
    engine: Engine
    labels: list[str]
    truth: dict[str, str | None]
    prompts: list[str]
    mode: str
    settings: GenerationSettings
    cases: dict[str, str]  # image key -> case id


def _answer_all(ctx: Context, items: list[Item], repeats: int, batch_size: int, file, progress: bool) -> dict:
    from tqdm import tqdm

    todo = [(item, r) for r in range(repeats) for item in items if (item.key, r) not in file.done]
    summary = {"done": 0, "failed": 0, "skipped": len(items) * repeats - len(todo)}
    with tqdm(total=len(todo), disable=not progress, unit="image") as bar:
        for r in range(repeats):
            batch_items = [item for item, rep in todo if rep == r]
            batches = [batch_items[start : start + batch_size] for start in range(0, len(batch_items), batch_size)]
            for loaded in prefetched(batches, functools.partial(_blank, ctx, repeat=r)):
                for record in answer_batch(ctx, loaded, r):
                    file.append(record)
                    summary["failed" if record["error"] else "done"] += 1
                    bar.update(1)
    return summary


def answer_batch(ctx: Context, loaded, repeat: int) -> list[dict]:
    """Encode and answer (or score) one batch, as `load_images` gave it; a bad image or a failed generation is an
    error record. "seconds" is the answering time (the batch was decoded while the one before was answered)."""
    started = time.perf_counter()
    records, good, images = loaded
    if good:
        try:
            features = ctx.engine.encode_images(images)
            if ctx.mode == "choice":
                _choose(ctx, good, features)
            else:
                _converse(ctx, good, features, dataclasses.replace(ctx.settings, seed=ctx.settings.seed + repeat))
        except (RuntimeError, ValueError) as exc:  # e.g. out of memory: record it, a rerun retries
            for record in good:
                record["error"] = f"{RETRY}: {first_line(exc)}"
    seconds = round((time.perf_counter() - started) / max(len(good), 1), 4)  # batch-amortised, answered images
    for record in records:
        record["seconds"] = seconds
    return records


def case_ids(items: list[Item]) -> dict[str, str]:
    """The manifest's `case` or `id`, else the file name without suffix, else (when two images share a name, as in
    eczema/001.jpg and psoriasis/001.jpg) the path below the images' common folder: unique, and no full paths."""
    stems = [Path(item.key).stem for item in items]
    root = Path(os.path.commonpath([str(Path(item.key).parent) for item in items])) if items else Path()
    ids = {}
    for item, stem in zip(items, stems):
        given = item.manifest.get("case") or item.manifest.get("id")
        if given:
            ids[item.key] = str(given)
        elif stems.count(stem) == 1:
            ids[item.key] = stem
        else:
            ids[item.key] = str(Path(item.key).relative_to(root).with_suffix(""))
    return ids


def current(records: dict[tuple[str, int], dict], items: list[Item], truth: dict[str, str | None]) -> dict:
    """The records of this run's images only, with the manifest's labels and skin types as they are now (an image
    dropped from the manifest, or a corrected label, must not keep counting from an earlier run's records)."""
    by_key = {item.key: item for item in items}
    kept = {}
    for key, record in records.items():
        if key[0] in by_key:
            fields = {"label": truth.get(key[0]), "fitzpatrick": skin_type(by_key[key[0]].manifest)}
            kept[key] = {**record, **fields}
    return kept


def _blank(ctx: Context, item: Item, repeat: int) -> dict:
    manifest, info = item.manifest, ctx.engine.info
    case = ctx.cases[item.key]
    return {
        "image": item.key,
        "repeat": repeat,
        "case": str(case),
        "image_sha256": None,
        "label": ctx.truth.get(item.key),
        "fitzpatrick": skin_type(manifest),
        "prompts": ctx.prompts,
        "answers": [],
        "prediction": None,
        "match": None,
        "phrase": None,
        "probs": None,
        "seconds": None,
        "error": None,
        "model": info.model_id,
        "untrained": info.meta.untrained,
    }


def skin_type(manifest: dict) -> int | str | None:
    """Fitzpatrick type 1-6, or only its group ("I-II", "III-IV", "V-VI") where a set records no more (DDI)."""
    try:
        number = int(float(manifest.get("fitzpatrick")))
    except (TypeError, ValueError):
        number = None
    if number is not None and 1 <= number <= 6:
        return number
    group = manifest.get("fitzpatrick_group")
    return group if group in SKIN_GROUP_NAMES else None


def _converse(ctx: Context, records: list[dict], features: torch.Tensor, settings: GenerationSettings) -> None:
    """One conversation per image, the prompts in order; the diagnosis is matched in the first answer."""
    sessions = []
    for record, feature in zip(records, features):
        session = ctx.engine.session()
        session.add_encoded(feature, record["image_sha256"])
        sessions.append(session)
    for prompt in ctx.prompts:
        for session in sessions:
            session.ask(prompt)
        for record, session, answer in zip(records, sessions, ctx.engine.generate(sessions, settings)):
            record["answers"].append(answer)
            keep_reasoning(record, session.reasoning)
    for record in records:
        if ctx.labels:
            found = L.explain(record["answers"][0], ctx.labels)
            record.update(prediction=found.label, match=found.how, phrase=found.phrase or None)


def _choose(ctx: Context, records: list[dict], features: torch.Tensor) -> None:
    """Rank the candidate labels by the log-likelihood of the answer sentence naming each."""
    scores = score_labels(ctx.engine, features, ctx.labels, ctx.prompts[0])
    for record, row in zip(records, scores.tolist()):
        probs = torch.softmax(torch.tensor(row, dtype=torch.float64), 0).tolist()
        best = [j for j, value in enumerate(row) if value == max(row)]
        prediction = ctx.labels[best[0]] if len(best) == 1 else None  # a tie decides nothing (as the ISIC scorer)
        scores = {"loglik": dict(zip(ctx.labels, row)), "probs": dict(zip(ctx.labels, probs))}
        record.update(prediction=prediction, match="choice", **scores)
