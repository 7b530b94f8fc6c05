"""Manifests, read and written here only: what `diagnose`, `eval`, `train` and `prepare-data` take and give.

A manifest is JSON Lines (or CSV with an `image` column), one record per image: `image` is a path relative to the
manifest's folder; every other field (`caption`, `label`, `fitzpatrick`, `patient_id`, `split`, `source`, ...) is
kept as it is (docs/reference.md, section 7). MiniGPT-4's caption folder (`filter_cap.json` +
`image/<image_id>.jpg`) is read and written here too. `collect` turns command-line inputs (files, folders, manifests)
into `Item`s; `load_images` decodes a batch of them through the one image loader, `prefetched` the next batch ahead.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from skingpt4.data.results import lines
from skingpt4.errors import InputError
from skingpt4.inputs.images import DEFAULT_LIMITS, ImageRejected, load_image, read_source, sha256_bytes
from skingpt4.private_files import write_private
from skingpt4.text import has_surrogate, readable, readable_values

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff"}
JPEG_QUALITY = 95  # MiniGPT-4 folders hold re-encoded JPEGs


@dataclass
class Item:
    """One image to diagnose: its key in the output, where to read it, and manifest fields kept as they were."""

    key: str
    path: Path
    manifest: dict = field(default_factory=dict)


def collect(inputs: list[str], passed_over: list[Path] | None = None) -> list[Item]:
    """Expand files, folders (recursively, sorted, no symlinks out of the folder) and manifests into items. The
    files in the folders that are not images by their suffix (hidden ones aside) go into `passed_over`, if given."""
    items: dict[str, Item] = {}
    for raw in inputs:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = [Item(readable(str(p)), p) for p in walk_folder(path, passed_over)]
        elif path.suffix.lower() in (".jsonl", ".csv") and path.is_file():
            found = list(read_manifest(path))
        elif path.is_file():
            found = [Item(readable(str(path)), path)]  # any file is tried; the loader says why it is not an image
        else:
            raise InputError(f"no such file or folder: {raw}")
        for item in found:
            items.setdefault(item.key, item)
    return list(items.values())


IMAGE_TYPES = "JPEG, PNG, WebP, BMP and TIFF are read"


def walk_folder(root: Path, passed_over: list[Path] | None = None) -> Iterator[Path]:
    """Image files under `root`, sorted; symlinks are followed only when they stay inside `root`. Other files (not
    hidden) go into `passed_over`, if given."""
    top = root.resolve()
    for path in sorted(root.rglob("*")):
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            if passed_over is not None and not path.name.startswith(".") and path.is_file():
                passed_over.append(path)
            continue
        if not path.is_file() or not path.resolve().is_relative_to(top):
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
        fields = readable_values({k: v for k, v in row.items() if k != "image"})
        yield Item(readable(str(target)), target, fields)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, dict]]:
    for number, line in enumerate(lines(_text(path)), 1):
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
    yield from enumerate(csv.DictReader(io.StringIO(_text(path), newline="")), 2)


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")  # a byte-order mark from a spreadsheet is not part of a field
    except UnicodeDecodeError as exc:
        raise InputError(f"{readable(path.name)} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from None


def load_images(batch: list[Item], blank) -> tuple[list[dict], list[dict], list]:
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


def prefetched(batches: list[list[Item]], blank) -> Iterator[tuple[list[dict], list[dict], list]]:
    """`load_images` of each batch in turn, the next batch decoding in a background thread while the caller answers
    this one (image decoding releases the GIL; a 12-megapixel photo takes about 0.1 s). Two batches of decoded
    images are held at most."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1, thread_name_prefix="decode") as pool:
        pending = pool.submit(load_images, batches[0], blank) if batches else None
        for n in range(len(batches)):
            loaded = pending.result()
            pending = pool.submit(load_images, batches[n + 1], blank) if n + 1 < len(batches) else None
            yield loaded


def write_manifest(records: list[dict], path: Path, *, overwrite: bool = False) -> None:
    """JSON Lines, one record per image, ``image`` relative to the manifest's folder; written atomically."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (--overwrite replaces it)")
    base = path.parent.resolve()
    lines = [_json_line({**r, "image": _relative(r["image"], base)}) for r in records]
    text = "".join(line + "\n" for line in lines)
    write_private(path, lambda f: f.write(text))


def _json_line(record: dict) -> str:
    """One record as UTF-8 JSON; a record holding a file name that is not UTF-8 is written with ASCII escapes
    (`\udcff`), which JSON allows and which `read_manifest` turns back into the same name (lossless)."""
    text = json.dumps(record, ensure_ascii=False)
    return text if not has_surrogate(text) else json.dumps(record)


def _relative(image: str, base: Path) -> str:
    """Both sides resolved alike: through a symlinked folder (/tmp on macOS) a mixed pair would point elsewhere."""
    return Path(os.path.relpath(Path(image).resolve(), base)).as_posix()


def write_minigpt4(records: list[dict], folder: Path, *, overwrite: bool = False) -> None:
    """``folder/<split>/filter_cap.json`` + ``image/<image_id>.jpg`` per split, and ``folder/manifest.jsonl``."""
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()) and not overwrite:
        raise InputError(f"{folder} already exists (--overwrite replaces it)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        written = _write_minigpt4_tree(records, temp)
        write_manifest(written, temp / "manifest.jsonl")
        _swap_in(temp, folder)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _write_minigpt4_tree(records: list[dict], root: Path) -> list[dict]:
    by_split: dict[str, list[dict]] = {}
    used: set[str] = set()
    written = []
    for record in records:
        split = record.get("split") or "train"
        image_id = _unique_id(Path(record["image"]).stem, used)
        target = root / split / "image" / f"{image_id}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        # Re-encoded from the loader's pixels: EXIF (GPS), ICC and text chunks of the source never reach the copy.
        load_image(record["image"]).save(target, "JPEG", quality=JPEG_QUALITY)
        by_split.setdefault(split, []).append({"image_id": image_id, "caption": record["caption"]})
        written.append({**record, "image": str(target), "image_id": image_id})
    for split, captions in by_split.items():
        text = json.dumps({"annotations": captions}, ensure_ascii=False, indent=1)
        (root / split / "filter_cap.json").write_text(text, encoding="utf-8")
    return written


def _unique_id(stem: str, used: set[str]) -> str:
    """A file-name-safe id; a clash (two `img1.jpg` in two class folders) gets a numbered suffix."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "image"
    image_id, n = base, 1
    while image_id in used:
        n += 1
        image_id = f"{base}_{n}"
    used.add(image_id)
    return image_id


def read_minigpt4(folder: Path) -> list[dict]:
    """Records from a MiniGPT-4 caption folder; ``image`` is relative to `folder` (``image/<image_id>.jpg``)."""
    folder = Path(folder)
    path = folder / "filter_cap.json"
    if not path.is_file():
        raise InputError(f"not a MiniGPT-4 caption folder (no filter_cap.json): {folder}")
    try:
        items = json.loads(path.read_text(encoding="utf-8"))["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise InputError(f'{path}: expected {{"annotations": [{{"image_id", "caption"}}]}}') from None
    records = []
    for number, item in enumerate(items, 1):
        if not isinstance(item, dict) or not item.get("image_id") or not isinstance(item.get("caption"), str):
            raise InputError(f"{path.name} annotation {number}: needs an image_id and a caption")
        image_id = str(item["image_id"])
        records.append(
            {"image": f"image/{image_id}.jpg", "caption": item["caption"], "image_id": image_id, "source": "minigpt4"}
        )
    return records


def _swap_in(temp: Path, folder: Path) -> None:
    """Move the finished tree into place; an old one (overwrite) is moved aside first, then deleted."""
    old = None
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        os.replace(folder, old)
    os.replace(temp, folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
