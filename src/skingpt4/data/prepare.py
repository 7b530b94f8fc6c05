"""Prepare training data: a dataset's own files in (``adapters.py``), a checked, split manifest out.

``prepare`` runs the whole path: adapter -> options (regroup, concepts) -> image check -> split -> write -> report.

Choices, and why:

* Missing and unreadable images (read through ``images.load_image``, the loader every surface uses) are left out
  of the output and listed in the report: training stops on a bad image, so it is better caught here.
* Splits are seeded and made over groups: images of one patient (or lesion, where a set has no patient id) and
  byte-identical images (SHA-256) are one group, so neither a patient nor a duplicated photo spans two splits.
  Groups are shuffled with the seed, then each goes to the split furthest below its target share.
  Duplicates are kept (``drop_duplicates`` keeps only the first) and reported; the report also counts patients
  and duplicates found in more than one split, recomputed from the final records as a check.
* Output is written to a temporary name and moved into place, so a killed run leaves no half-written output; an
  existing output is only replaced with ``overwrite``.
* Layout ``manifest``: one JSON Lines file (docs/reference.md, section 7.1), ``image`` relative to it, ``split`` set.
  Layout ``minigpt4``: ``OUT/<split>/filter_cap.json`` + ``OUT/<split>/image/<image_id>.jpg`` (what MiniGPT-4's
  ``CCSBUAlignDataset`` reads), images re-encoded as metadata-free JPEG, plus ``OUT/manifest.jsonl`` with every
  field (the folder format itself only keeps the caption).
"""

from __future__ import annotations

import math
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path

from skingpt4.data import adapters, captions, options
from skingpt4.data.manifest import read_manifest, read_minigpt4, write_manifest, write_minigpt4
from skingpt4.errors import InputError
from skingpt4.inputs.images import DEFAULT_LIMITS, ImageRejected, load_image, read_source
from skingpt4.text import readable

SPLITS = ("train", "val", "test")
SKIN_TYPES = ("I-II", "III-IV", "V-VI", "unknown")
FORMATS = (*adapters.ADAPTERS, "minigpt4")
LAYOUTS = ("manifest", "minigpt4")


@dataclass
class Report:
    """What was read, left out, found twice, and written; ``text()`` is the printable form."""

    format: str
    out: Path
    read: int = 0
    written: int = 0
    excluded: dict[str, int] = field(default_factory=dict)  # reason -> rows the dataset itself flags as unusable
    missing: list[str] = field(default_factory=list)
    unreadable: dict[str, str] = field(default_factory=dict)  # image -> the loader's one-line reason
    duplicates: list[list[str]] = field(default_factory=list)  # groups of byte-identical images
    duplicates_across_splits: int = 0
    patients_across_splits: int = 0
    splits: dict[str, int] = field(default_factory=dict)
    classes: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> label -> images
    skin_types: dict[str, dict[str, int]] = field(default_factory=dict)  # split -> I-II/III-IV/V-VI/unknown
    concepts_matched: int | None = None  # labelled images that got a concept sentence (with `concepts`)
    stratified: bool = False
    test_share: float = 0.0  # asked for; a small set can still leave the test split empty
    notes: list[str] = field(default_factory=list)

    def absent_classes(self) -> dict[str, list[str]]:
        """Per split, the classes found in the manifest but not in that split."""
        labels = sorted({label for counts in self.classes.values() for label in counts})
        absent = {s: [label for label in labels if not counts.get(label)] for s, counts in self.classes.items()}
        return {s: missing for s, missing in absent.items() if missing}

    def unreadable_reasons(self) -> dict[str, int]:
        return dict(Counter(self.unreadable.values()).most_common())

    def text(self) -> str:
        lines = [f"{self.format}: {self.written} of {self.read} images written to {self.out}", *self.notes]
        for reason, n in self.excluded.items():
            lines.append(f"excluded: {n} ({reason})")
        if self.missing:
            lines.append(f"missing: {len(self.missing)} (first: {', '.join(self.missing[:3])})")
        for reason, n in self.unreadable_reasons().items():
            lines.append(f"unreadable: {n} ({reason})")
        extra = sum(len(g) - 1 for g in self.duplicates)
        lines.append(
            f"duplicates: {len(self.duplicates)} groups, {extra} extra images; "
            f"across splits: {self.duplicates_across_splits}"
        )
        lines.append(f"patients across splits: {self.patients_across_splits}")
        if self.concepts_matched is not None:
            lines.append(f"concept sentence added: {self.concepts_matched} images")
        lines.append(f"{'split':<8}{'images':>8}" + "".join(f"{t:>9}" for t in SKIN_TYPES))
        for split, n in self.splits.items():
            types = self.skin_types.get(split, {})
            lines.append(f"{split:<8}{n:>8}" + "".join(f"{types.get(t, 0):>9}" for t in SKIN_TYPES))
        labels = sorted({label for counts in self.classes.values() for label in counts})
        if labels:
            lines.append("class counts (" + " / ".join(self.splits) + "):")
            lines += [
                f"  {label}: " + " / ".join(str(self.classes[s].get(label, 0)) for s in self.splits)
                for label in labels
            ]
        for split, absent in self.absent_classes().items():
            hint = "" if self.stratified else " (--stratify balances classes across splits)"
            lines.append(f"warning: {len(absent)} classes have no image in {split}: {', '.join(absent[:5])}{hint}")
        if self.written and self.test_share > 0 and not self.splits.get("test"):
            lines.append(
                "warning: the test split is empty, so `skingpt4 eval` finds nothing to score by default "
                "(give it a larger share with --split, or more images)"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# The one entry point


def prepare(
    format: str,
    source: Path,
    out: Path,
    *,
    images: Path | None = None,
    concepts: Path | None = None,
    mapping: Path | None = None,
    fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    layout: str = "manifest",
    check_images: bool = True,
    drop_duplicates: bool = False,
    overwrite: bool = False,
    stratify: bool = False,
    exclude: list[str] = (),
    adapter_options: dict | None = None,
) -> Report:
    """Read `source` (a CSV, or a folder for folder/dermnet/minigpt4) in `format`, write `out`, report.

    `exclude`: other manifests, each `PATH` or `PATH:SPLIT`, whose images (by content) are left out of this one;
    `adapter_options`: the format's own options (fitzpatrick17k: `label_column`, `skin_type_columns`).
    """
    source, out = Path(source), Path(out)
    _check_options(format, layout, fractions, out, overwrite, concepts, mapping)
    excluded = {spec: excluded_hashes(spec) for spec in exclude}  # before any work: a bad path is bad input
    if adapter_options and format != "fitzpatrick17k":
        raise InputError(f"--label-column and --skin-type-columns are fitzpatrick17k's options, not {format}'s")
    records = read_source_records(format, source, images, adapter_options or {})
    report = Report(format, out, read=len(records), test_share=fractions[2])
    if source.is_file() and (separator := adapters.delimiter(source)) != ",":
        report.notes.append(f"{source.name} read as {adapters.SEPARATORS[separator]} (the separator its header uses)")
    report.excluded = dict(Counter(r["exclude"] for r in records if "exclude" in r))
    records = [r for r in records if "exclude" not in r]
    if mapping is not None:
        options.regroup(records, Path(mapping))
    if concepts is not None:
        report.concepts_matched = options.add_concepts(records, Path(concepts))
    captions.finish_captions(records)
    records = scan(records, report, decode=check_images or layout == "minigpt4", drop_duplicates=drop_duplicates)
    for spec, hashes in excluded.items():
        kept = [r for r in records if r["source_sha256"] not in hashes]
        if len(kept) < len(records):
            report.excluded[f"in {spec}"] = len(records) - len(kept)
        records = kept
    if not records:
        raise InputError(f"no usable images from {source} ({_why_empty(report)})")
    assign_splits(records, fractions, seed, stratify)
    report.stratified = stratify
    summarise(records, report)
    if layout == "manifest":
        write_manifest(records, out, overwrite=overwrite)
    else:
        write_minigpt4(records, out, overwrite=overwrite)
    report.written = len(records)
    return report


def excluded_hashes(spec: str) -> set[str]:
    """Content hashes of the images of a manifest (`PATH`), or of one of its splits (`PATH:SPLIT`)."""
    path, _, split = spec.rpartition(":") if spec.rpartition(":")[2] in SPLITS else (spec, "", "")
    if not Path(path).is_file():
        raise InputError(f"--exclude: no such manifest: {path}")
    hashes = set()
    for item in read_manifest(Path(path)):
        if split and item.manifest.get("split") != split:
            continue
        digest = item.manifest.get("source_sha256")
        if not digest and item.path.is_file():
            digest = sha256(item.path.read_bytes()).hexdigest()
        if digest:
            hashes.add(digest)
    return hashes


def read_source_records(
    format: str, source: Path, images: Path | None = None, options: dict | None = None
) -> list[dict]:
    """The adapter's records, with ``image`` an absolute path."""
    if format == "minigpt4":
        records = read_minigpt4(source)
        return [{**r, "image": os.path.abspath(source / r["image"])} for r in records]
    default = source if format in ("folder", "dermnet") else source.parent
    records = adapters.ADAPTERS[format](source, Path(images) if images else default, **(options or {}))
    return [{**r, "image": os.path.abspath(r["image"])} for r in records]


def _check_options(format, layout, fractions, out, overwrite, concepts, mapping) -> None:
    if format not in FORMATS:
        raise InputError(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    if layout not in LAYOUTS:
        raise InputError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if format == "skincon" and (concepts or mapping):
        raise InputError("skincon captions are concepts only: --concepts and --mapping do not apply")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-6 or fractions[0] == 0:
        raise InputError(f"fractions (train, val, test) must be >= 0, sum to 1, train > 0; got {tuple(fractions)}")
    if layout == "manifest" and (out.suffix.lower() != ".jsonl" or out.is_dir()):
        raise InputError(f"a manifest must be a .jsonl file, got {out}")
    exists = out.exists() and (out.is_file() or any(out.iterdir()))
    if exists and not overwrite:
        raise InputError(f"{out} already exists (--overwrite replaces it)")


def _why_empty(report: Report) -> str:
    parts = [
        f"{report.read} listed",
        f"{sum(report.excluded.values())} excluded",
        f"{len(report.missing)} missing",
        f"{len(report.unreadable)} unreadable",
    ]
    return ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Integrity: missing, unreadable, duplicates


def scan(records: list[dict], report: Report, *, decode: bool = True, drop_duplicates: bool = False) -> list[dict]:
    """Hash every image (and decode it through the core loader when `decode`); returns the usable records, each
    with ``source_sha256``, and fills the report's missing, unreadable and duplicate lists."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = list(pool.map(lambda r: _inspect(Path(r["image"]), decode), records))
    usable, groups = [], {}
    for record, (digest, problem) in zip(records, results):
        if problem == "missing":
            report.missing.append(readable(record["image"]))  # the report is text: names as they can be shown
        elif problem:
            report.unreadable[readable(record["image"])] = problem
        else:
            seen = digest in groups
            groups.setdefault(digest, []).append(readable(record["image"]))
            if not (drop_duplicates and seen):
                usable.append({**record, "source_sha256": digest})
    report.duplicates = [images for images in groups.values() if len(images) > 1]
    return usable


def _inspect(path: Path, decode: bool) -> tuple[str | None, str | None]:
    """(SHA-256 of the bytes, None) or (None, "missing" or the loader's reason)."""
    if not path.is_file():
        return None, "missing"
    try:
        data = read_source(path, DEFAULT_LIMITS.max_bytes)
        if decode:
            load_image(data)
    except ImageRejected as exc:
        return None, str(exc)
    return sha256(data).hexdigest(), None


# ---------------------------------------------------------------------------------------------------------------
# Splits


def assign_splits(records: list[dict], fractions=(0.8, 0.1, 0.1), seed: int = 0, stratify: bool = False) -> None:
    """Set ``split`` on every record, by group (same patient or same bytes).

    By default a group's split is a pure function of its key (its images' smallest SHA-256) and the seed: an image
    lands in the same split in every manifest and every data set made with that seed, so SKINCON (step 1) and
    Fitzpatrick17k (step 2, and its test split) never disagree about a photo they share. The shares come out
    near `fractions`, not exactly, and a small class may miss a split (the report says so). `stratify` balances
    each class across the splits instead, as far as groups allow; an image shared with another manifest may then
    land elsewhere there (`--exclude` keeps such sets apart).
    """
    groups = _groups(records)
    if not stratify:
        for key, members in groups.items():
            for index in members:
                records[index]["split"] = split_of(key, fractions, seed)
        return
    by_class: dict[str, list[str]] = {}
    for key, members in groups.items():
        by_class.setdefault(str(records[members[0]].get("label") or ""), []).append(key)
    for keys in by_class.values():
        targets = [f * sum(len(groups[k]) for k in keys) for f in fractions]
        counts = [0.0] * len(SPLITS)
        for key in sorted(keys, key=lambda k: _draw(k, seed)):
            # The split furthest below its target takes the group; ties go to the earlier split.
            best = max(range(len(SPLITS)), key=lambda i: targets[i] - counts[i] if fractions[i] > 0 else -math.inf)
            counts[best] += len(groups[key])
            for index in groups[key]:
                records[index]["split"] = SPLITS[best]


def split_of(key: str, fractions, seed: int) -> str:
    """The split of a group with this key: where its seeded draw falls among the cumulative fractions."""
    u, edge = _draw(key, seed), 0.0
    for split, share in zip(SPLITS, fractions):
        edge += share
        if u < edge and share > 0:
            return split
    return next(s for s, f in zip(reversed(SPLITS), reversed(fractions)) if f > 0)


def _draw(key: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by (seed, key) alone."""
    return int.from_bytes(sha256(f"{seed}:{key}".encode()).digest()[:8], "big") / 2**64


def _groups(records: list[dict]) -> dict[str, list[int]]:
    """Union-find over records that share a patient id or content hash; each group keyed by its smallest content
    hash, which does not depend on the data set, the row order or the file names."""
    parent = list(range(len(records)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[str, int] = {}
    for i, record in enumerate(records):
        keys = [f"sha:{_content(record)}"]
        if record.get("patient_id") not in (None, ""):
            keys.append(f"patient:{record['patient_id']}")
        for key in keys:
            j = first.setdefault(key, i)
            parent[root(i)] = root(j)
    groups: dict[int, list[int]] = {}
    for i in range(len(records)):
        groups.setdefault(root(i), []).append(i)
    return {min(_content(records[i]) for i in members): members for members in groups.values()}


def _content(record: dict) -> str:
    return record.get("source_sha256") or record["image"]


def skin_type(record: dict) -> str:
    group = record.get("fitzpatrick_group")
    if not group and isinstance(record.get("fitzpatrick"), int) and 1 <= record["fitzpatrick"] <= 6:
        group = SKIN_TYPES[(record["fitzpatrick"] - 1) // 2]
    return group if group in SKIN_TYPES else "unknown"


def summarise(records: list[dict], report: Report) -> None:
    """Per-split image, class and skin-type counts, and the leakage check: ids and hashes in two splits."""
    present = [s for s in SPLITS if any(r.get("split") == s for r in records)]
    report.splits = {s: sum(r.get("split") == s for r in records) for s in present}
    report.classes = {
        s: dict(Counter(r["label"] for r in records if r.get("split") == s and r.get("label"))) for s in present
    }
    report.skin_types = {s: dict(Counter(skin_type(r) for r in records if r.get("split") == s)) for s in present}
    report.patients_across_splits = _spanning(records, "patient_id")
    report.duplicates_across_splits = _spanning(records, "source_sha256")


def _spanning(records: list[dict], key: str) -> int:
    seen: dict[str, set] = {}
    for record in records:
        if record.get(key) not in (None, ""):
            seen.setdefault(str(record[key]), set()).add(record.get("split"))
    return sum(len(splits) > 1 for splits in seen.values())
