"""What a finished evaluation writes: metrics.json and the report from the latest record of every image and
repeat, and for the clinical protocol the transcripts that `skingpt4 review` serves."""

from __future__ import annotations

import json
import math
import os
import random
import secrets
from pathlib import Path

from skingpt4.private_files import write_private


def finish(out: Path, records: dict, labels: list[str], config: dict, n_boot: int, warnings=()) -> dict:
    """metrics.json and the report from the latest record of every image and repeat."""
    from skingpt4.evaluate.metrics import consistency, evaluate_predictions, latency
    from skingpt4.evaluate.report import write_report

    first = [r for (_, rep), r in sorted(records.items()) if rep == 0]
    good = [r for r in first if not r.get("error") and r.get("label") is not None]
    errors = [r for r in first if r.get("error")]
    rows = [{k: r.get(k) for k in ("label", "prediction", "probs", "fitzpatrick")} for r in good]
    metrics = {"run": config, "errors": {"count": len(errors), "excluded": [r["image"] for r in errors]}}
    metrics["warnings"] = list(warnings)
    metrics["match"] = _match_counts(good)
    if not rows:
        metrics["note"] = "no image was answered: nothing to score"
        _write_json(out / "metrics.json", metrics)
        return metrics
    metrics.update(evaluate_predictions(rows, labels, n_boot=n_boot, seed=config["seed"]))
    agreement = None
    if config["repeats"] > 1:
        runs = _runs(records, config["repeats"])
        agreement = consistency(runs, n_boot=n_boot, seed=config["seed"]) if runs else None
    speed = latency([r["seconds"] for r in records.values() if not r.get("error") and r.get("seconds")])
    metrics.update(consistency=agreement, latency=speed)
    _write_json(out / "metrics.json", metrics)
    calibration = rows if config["mode"] == "choice" else None
    title = f"SkinGPT-4 evaluation: {config['model']} ({config['mode']} mode)"
    write_report(metrics, out, title=title, consistency=agreement, latency=speed, calibration_rows=calibration)
    return metrics


def _match_counts(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for r in records:
        how = r.get("match") or "unmatched"
        counts[how] = counts.get(how, 0) + 1
    return counts


def _runs(records: dict[tuple[str, int], dict], repeats: int) -> list[list[str | None]]:
    """Per image, its K predictions; images with an error in any repeat are left out."""
    by_image: dict[str, list] = {}
    for (image, rep), r in sorted(records.items()):
        by_image.setdefault(image, [None] * repeats)
        if rep < repeats:
            by_image[image][rep] = r
    return [[r["prediction"] for r in rs] for rs in by_image.values() if all(r and not r.get("error") for r in rs)]


def _write_json(path: Path, data: dict) -> None:
    text = json.dumps(data, indent=2, ensure_ascii=False, default=_jsonable)
    path.write_text(text + "\n", encoding="utf-8")


def _jsonable(value):
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_transcripts(out: Path, records: dict[tuple[str, int], dict]) -> dict[str, Path]:
    """transcripts.jsonl (for the review tool) and transcripts.md (to read), one case per answered image."""
    cases = []
    for r in (r for (_, rep), r in sorted(records.items()) if rep == 0 and not r.get("error")):
        turns = []
        for prompt, answer in zip(r["prompts"], r["answers"]):
            turns += [{"role": "user", "text": prompt}, {"role": "assistant", "text": answer}]
        cases.append(
            {
                "case": r["case"],
                "image": _from(out, r["image"]),
                "image_sha256": r["image_sha256"],
                "label": r["label"],
                "model": r["model"],
                "untrained": r["untrained"],
                "turns": turns,
            }
        )
    jsonl, md = out / "transcripts.jsonl", out / "transcripts.md"
    jsonl.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    md.write_text(_markdown(cases), encoding="utf-8")
    return {"transcripts": jsonl, "transcripts_md": md}


def _from(folder: Path, image: str) -> str:
    """The image's path as seen from `folder`, where the transcripts are: the review tool reads it from there,
    whatever the working folder was when `eval` ran."""
    return Path(os.path.relpath(os.path.abspath(image), os.path.abspath(folder))).as_posix()


KEY_FILE = "blinding-key.json"


def blind(folders: dict[str, Path], out: Path, seed: int) -> dict[str, Path]:
    """Several models' clinical transcripts (name -> that model's `eval` folder) as one set for `review` whose
    model is hidden: each (model, case) becomes a case of its own with an opaque id (`c7-3f9a2b1c`), in a shuffled
    order, without the model's name; `blinding-key.json` (0600, kept apart from what raters see) maps each id to
    its model and case. Run again, it keeps the ids it gave, so ratings already made still count."""
    key_path = out / KEY_FILE
    key = json.loads(key_path.read_text(encoding="utf-8")) if key_path.exists() else {}
    given = {(entry["model"], entry["case"]): case_id for case_id, entry in key.items()}
    cases = []
    for name, folder in folders.items():
        for line in (folder / "transcripts.jsonl").read_text(encoding="utf-8").splitlines():
            case = json.loads(line)
            case_id = given.get((name, case["case"])) or f"{case['case']}-{secrets.token_hex(4)}"
            key[case_id] = {"model": name, "case": case["case"]}
            image = _from(out, os.path.join(folder, case["image"]))
            cases.append({**{k: v for k, v in case.items() if k != "model"}, "case": case_id, "image": image})
    random.Random(seed).shuffle(cases)
    write_private(key_path, lambda f: f.write(json.dumps(key, indent=2, sort_keys=True) + "\n"))
    jsonl, md = out / "transcripts.jsonl", out / "transcripts.md"
    jsonl.write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in cases), encoding="utf-8")
    md.write_text(_markdown(cases, "Model"), encoding="utf-8")
    return {"transcripts": jsonl, "transcripts_md": md, "key": key_path}


def _markdown(cases: list[dict], who: str = "SkinGPT-4") -> str:
    lines = [f"# {who} transcripts for clinical review", ""]
    if cases and cases[0]["untrained"]:
        lines += ["**These answers come from an untrained (random) model.**", ""]
    for c in cases:
        lines += [f"## Case {c['case']}", "", f"- image: `{c['image']}`", f"- sha256: `{c['image_sha256']}`"]
        lines += [f"- reference label: {c['label'] or 'not given'}", ""]
        for turn in c["turns"]:
            text = turn["text"].replace("\n", "\n> ") if turn["role"] == "assistant" else turn["text"]
            lines += [f"**Question:** {text}" if turn["role"] == "user" else f"> {text}", ""]
    return "\n".join(lines)
