"""prepare-data's options: known concepts attached to step-2 images (`--concepts`), classes regrouped (`--mapping`)."""

from __future__ import annotations

from pathlib import Path

import yaml

from skingpt4.data.adapters import read_csv, skincon_rows
from skingpt4.errors import InputError


def read_concepts(path: Path) -> dict[str, list[str]]:
    """Image file name (and name without suffix) -> concepts, from a SKINCON-shaped CSV (ImageID + 0/1 concept
    columns) or a two-column ``image,concepts`` CSV with concepts separated by ';'."""
    header, rows = read_csv(path, "concepts CSV")
    if "image" in header and "concepts" in header:
        pairs = [(r["image"], [c.strip() for c in r["concepts"].split(";") if c.strip()]) for r in rows]
    else:
        pairs = [(image, present) for image, present, exclude in skincon_rows(path) if not exclude]
    table: dict[str, list[str]] = {}
    for image, concepts in pairs:
        table[Path(image).name] = concepts
        table.setdefault(f"stem:{Path(image).stem}", concepts)
    return table


def add_concepts(records: list[dict], path: Path) -> int:
    """Attach known concepts to labelled records (matched by file name); returns how many matched."""
    table, matched = read_concepts(path), 0
    for record in records:
        name = Path(record["image"]).name
        concepts = table.get(name) or table.get(f"stem:{Path(name).stem}")
        if concepts:
            record["concepts"] = concepts
            matched += 1
    return matched


def read_mapping(path: Path) -> dict[str, str]:
    """Class -> group, from YAML (``{class: group}`` or ``{group: [class, ...]}``) or CSV (``class,group``).
    Keys are compared case- and space-insensitively; a ``*`` entry catches every unmapped class."""
    if not path.is_file():
        raise InputError(f"mapping file: no such file: {path}")
    if path.suffix.lower() == ".csv":
        pairs = [(r["class"], r["group"]) for r in read_csv(path, "mapping CSV", ["class", "group"])[1]]
    else:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise InputError(f"mapping file {path.name}: not valid YAML ({type(exc).__name__})") from None
        if not isinstance(data, dict):
            raise InputError(f"mapping file {path.name}: expected {{class: group}} or {{group: [classes]}}")
        pairs = [(c, g) for g, cs in data.items() if isinstance(cs, list) for c in cs]
        pairs += [(c, g) for c, g in data.items() if isinstance(g, str)]
    return {_key(c): str(g) for c, g in pairs}


def regroup(records: list[dict], path: Path) -> None:
    """Replace each label by its group (the original stays in ``original_label``); unmapped classes are an error."""
    mapping = read_mapping(path)
    unmapped = sorted({r["label"] for r in records if r.get("label") and _key(r["label"]) not in mapping})
    if unmapped and "*" not in mapping:
        more = f" and {len(unmapped) - 3} more" if len(unmapped) > 3 else ""
        raise InputError(f"mapping {path.name} has no group for {', '.join(unmapped[:3])}{more} (add them or '*')")
    for record in records:
        if record.get("label"):
            record["original_label"] = record["label"]
            record["label"] = mapping.get(_key(record["label"]), mapping.get("*"))


def _key(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())
