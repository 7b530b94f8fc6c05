"""Adapters: each public dermatology set's own files in, manifest records out (docs/reference.md, section 7).

Every adapter returns a list of dicts with ``image`` (the source file's path; the writer makes it relative to the
manifest), ``caption``, ``source``, ``license`` and, where the set has them, ``label``, ``fitzpatrick`` (1-6) or
``fitzpatrick_group`` ("I-II", "III-IV", "V-VI"), ``patient_id`` (a lesion id where the set has no patient id).
Rows the dataset itself flags as unusable are kept with an ``exclude`` reason, so the report can count them.
Images are found by name anywhere under the images folder (the sets ship them in part_1/part_2 sub-folders).

Columns read, as in the files the sets distribute (checked against public copies where noted):

* ``skincon`` (SKINCON annotation CSV): ``ImageID`` (or ``DDI_file``, the DDI half), the 48 concept columns named
  in :data:`SKINCON_CONCEPTS` (0/1), ``Do not consider this image`` (1 = excluded). Column names and their order
  were checked against public code reading the released file. Concepts are listed in that order, by their column
  names (so "Brown(Hyperpigmentation)" stays as written).
* ``fitzpatrick17k`` (``fitzpatrick17k.csv``, checked against mattgroh/fitzpatrick17k): ``md5hash`` (image
  ``<md5hash>.jpg``), ``fitzpatrick_scale`` (1-6, -1 unknown), ``label``, optional ``three_partition_label``,
  ``nine_partition_label``, ``qc`` ("3 Wrongly labelled" is excluded). No patient id: each image is its own group.
* ``ddi`` (DDI metadata CSV): ``DDI_file``, ``skin_tone`` (12, 34, 56 = Fitzpatrick I-II, III-IV, V-VI),
  ``disease``, optional ``malignant``, ``DDI_ID``. Columns seen in public code, not in the distributed file.
* ``ham10000`` (``HAM10000_metadata.csv``, checked in several public copies): ``lesion_id`` (grouping id),
  ``image_id`` (image ``<image_id>.jpg``), ``dx`` (code, written out in full), optional ``dx_type``, ``age``,
  ``sex``, ``localization``.
* ``pad-ufes-20`` (``metadata.csv``, checked against the data paper's attribute table): ``patient_id``,
  ``lesion_id``, ``img_id``, ``diagnostic`` (code), optional ``fitspatrick`` (sic; "3.0"), ``region``, ``age``,
  ``gender``, ``biopsed``.
* ``folder`` / ``dermnet``: one sub-folder per class (``dermnet`` also takes Kaggle's ``train/`` and ``test/``
  halves, merges them and drops the " Photos" suffix from class names); the split is always recomputed.

Licences: Fitzpatrick17k CC BY-NC-SA 3.0 (its repository); HAM10000 CC BY-NC 4.0 and PAD-UFES-20 CC BY 4.0
(their data repositories' listings, not re-checked here); DDI and DermNet under their own terms. Always read the set's
terms before training on it or sharing a model.

Step-2 classes: the paper regrouped DermNet into 15 groups plus others (docs/reference.md, section 4.5); no
mapping is shipped, a user's mapping file (:func:`regroup`) gives it. The group names, in the paper's order:
:data:`PAPER_GROUPS`.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path

from skingpt4.data.captions import concept_caption, diagnosis_caption
from skingpt4.errors import InputError
from skingpt4.text import readable

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

SKINCON_CONCEPTS = (
    "Vesicle",
    "Papule",
    "Macule",
    "Plaque",
    "Abscess",
    "Pustule",
    "Bulla",
    "Patch",
    "Nodule",
    "Ulcer",
    "Crust",
    "Erosion",
    "Excoriation",
    "Atrophy",
    "Exudate",
    "Purpura/Petechiae",
    "Fissure",
    "Induration",
    "Xerosis",
    "Telangiectasia",
    "Scale",
    "Scar",
    "Friable",
    "Sclerosis",
    "Pedunculated",
    "Exophytic/Fungating",
    "Warty/Papillomatous",
    "Dome-shaped",
    "Flat topped",
    "Brown(Hyperpigmentation)",
    "Translucent",
    "White(Hypopigmentation)",
    "Purple",
    "Yellow",
    "Black",
    "Erythema",
    "Comedo",
    "Lichenification",
    "Blue",
    "Umbilicated",
    "Poikiloderma",
    "Salmon",
    "Wheal",
    "Acuminate",
    "Burrow",
    "Gray",
    "Pigmented",
    "Cyst",
)
SKINCON_EXCLUDE = "Do not consider this image"

PAPER_GROUPS = (
    "Acne and rosacea",
    "Malignant lesions",
    "Dermatitis",
    "Bullous",
    "Bacterial infections",
    "Light diseases",
    "Connective tissue",
    "Benign tumors",
    "Melanoma, nevi and moles",
    "Fungal",
    "Psoriasis and lichen planus",
    "Infestations and bites",
    "Urticaria",
    "Vascular tumors",
    "Herpes",
    "Others",
)

LICENSES = {
    "skincon": "SKINCON annotations over Fitzpatrick17k (CC BY-NC-SA 3.0) and DDI images (DDI terms); "
    "see the dataset's terms",
    "fitzpatrick17k": "CC BY-NC-SA 3.0",
    "ddi": "DDI research use agreement (Stanford AIMI); see the dataset's terms",
    "ham10000": "CC BY-NC 4.0",
    "pad-ufes-20": "CC BY 4.0",
    "dermnet": "DermNet images, copyright DermNet; see the dataset's terms",
}

HAM10000_NAMES = {
    "akiec": "actinic keratoses and intraepithelial carcinoma",
    "bcc": "basal cell carcinoma",
    "bkl": "benign keratosis-like lesions",
    "df": "dermatofibroma",
    "mel": "melanoma",
    "nv": "melanocytic nevi",
    "vasc": "vascular lesions",
}
PAD_UFES_NAMES = {
    "ACK": "actinic keratosis",
    "BCC": "basal cell carcinoma",
    "MEL": "melanoma",
    "NEV": "nevus",
    "SCC": "squamous cell carcinoma",
    "SEK": "seborrheic keratosis",
}
DDI_TONES = {"12": "I-II", "34": "III-IV", "56": "V-VI"}


# ---------------------------------------------------------------------------------------------------------------
# CSV and image look-up


def read_csv(path: Path, what: str, required: Iterable[str] = ()) -> tuple[list[str], list[dict]]:
    """Header and rows of a CSV that must hold `required`; a missing file or column is a one-line InputError."""
    if not path.is_file():
        raise InputError(f"{what}: no such file: {path}")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f, delimiter=delimiter(path))
            header = list(reader.fieldnames or [])
            rows = [{k: (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{what} {path.name}: not a readable UTF-8 CSV ({type(exc).__name__})") from None
    missing = [c for c in required if c not in header]
    if missing:
        raise InputError(
            f"{what} {path.name}: missing column(s) {', '.join(missing)} (read as {SEPARATORS[delimiter(path)]})"
        )
    return header, rows


SEPARATORS = {",": "comma-separated", "\t": "tab-separated", ";": "semicolon-separated"}


def delimiter(path: Path) -> str:
    """The separator of a CSV or TSV file, from its header line: the one of comma, tab and semicolon it holds most."""
    with open(path, encoding="utf-8-sig", errors="replace") as f:
        header = f.readline()
    return max(SEPARATORS, key=header.count)


class ImageIndex:
    """Finds an image by file name, or by name without suffix, anywhere under a folder (walked once, lazily)."""

    def __init__(self, root: Path):
        self.root = root
        self._by_name: dict[str, Path] | None = None

    def find(self, name: str, suffix: str = ".jpg") -> Path:
        """The file for `name`; when none exists, the path it should have had (the report calls it missing)."""
        direct = self.root / name
        if direct.is_file():
            return direct
        index = self._index()
        found = index.get(name) or index.get(f"stem:{name}")
        return found or (direct if Path(name).suffix else self.root / f"{name}{suffix}")

    def _index(self) -> dict[str, Path]:
        if self._by_name is None:
            self._by_name = {}
            for dirpath, _, files in sorted(os.walk(self.root)):
                for file in sorted(files):
                    if file.lower().endswith(IMAGE_SUFFIXES):
                        path = Path(dirpath) / file
                        self._by_name.setdefault(file, path)
                        self._by_name.setdefault(f"stem:{path.stem}", path)
        return self._by_name


def _record(image: Path, source: str, **fields) -> dict:
    if fields.get("label") and "caption" not in fields:
        fields["caption"] = diagnosis_caption(fields["label"])
    record = {"image": str(image), "source": source, "license": LICENSES.get(source), **fields}
    return {k: v for k, v in record.items() if v is not None}  # unknown (a -1 skin type) is left out, not null


def _skin_group(fitzpatrick: int | None) -> str | None:
    return None if fitzpatrick is None else ("I-II", "III-IV", "V-VI")[(fitzpatrick - 1) // 2]


def _fitzpatrick(text: str) -> int | None:
    try:
        value = int(float(text))
    except (ValueError, OverflowError):  # empty, "nan", "inf"
        return None
    return value if 1 <= value <= 6 else None  # Fitzpatrick17k writes -1 for unknown


def _truthy(text: str) -> bool:
    return text.strip().lower() in ("1", "1.0", "true", "yes")


# ---------------------------------------------------------------------------------------------------------------
# Adapters


def skincon(csv_path: Path, images: Path) -> list[dict]:
    """Step-1 records: the concept sentence over the image's positive concepts."""
    index, records = ImageIndex(images), []
    for image_id, present, exclude in skincon_rows(csv_path):
        record = _record(index.find(image_id), "skincon", caption=concept_caption(present), concepts=present)
        records.append({**record, "exclude": exclude} if exclude else record)
    return records


def skincon_rows(csv_path: Path) -> list[tuple[str, list[str], str | None]]:
    """(image id, positive concepts in column order, reason to exclude or None) per row."""
    header, rows = read_csv(csv_path, "skincon CSV")
    id_column = next((c for c in ("ImageID", "DDI_file") if c in header), None)
    if id_column is None:
        raise InputError(f"skincon CSV {csv_path.name}: missing column ImageID (or DDI_file)")
    concepts = [c for c in SKINCON_CONCEPTS if c in header]
    if not concepts:
        raise InputError(f"skincon CSV {csv_path.name}: missing the 48 SKINCON concept columns (Papule, Plaque, ...)")
    result = []
    for row in rows:
        present = [c for c in concepts if _truthy(row.get(c, ""))]
        exclude = "marked 'Do not consider this image'" if _truthy(row.get(SKINCON_EXCLUDE, "")) else None
        result.append((row[id_column], present, exclude or (None if present else "no concept marked")))
    return result


def folder(root: Path, images: Path | None = None, *, source: str = "folder") -> list[dict]:
    """Step-2 records from one sub-folder per class (nested folders below a class folder belong to it).
    `images` is accepted for a uniform signature and ignored: the folder holds the images."""
    if not root.is_dir():
        raise InputError(f"{source}: not a folder: {root}")
    halves = [root / h for h in ("train", "test")] if source == "dermnet" else []
    tops = [h for h in halves if h.is_dir()] or [root]
    records = []
    for top in tops:
        loose = [p for p in top.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        classes = [p for p in top.iterdir() if p.is_dir()]
        example, where = readable(str(top / "eczema" / "photo1.jpg")), readable(str(top))
        if loose:  # a photo outside a class folder has no label: say so, never drop it silently
            raise InputError(f"{source}: {len(loose)} photos lie in {where} outside any class folder (as {example})")
        if not classes:
            raise InputError(f"{source}: {where} has no class sub-folders: one per class, named for it (as {example})")
        for class_dir in sorted(classes):
            label = _class_name(readable(class_dir.name), source)  # a folder name that is not UTF-8, shown
            if not label:
                raise InputError(f"{source}: the class folder {readable(str(class_dir))!r} names no class")
            for path in sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES):
                records.append(_record(path, source, label=label))
    return records


def _class_name(name: str, source: str) -> str:
    name = name.replace("_", " ").strip()
    return re.sub(r"\s+Photos$", "", name) if source == "dermnet" else name


def dermnet(root: Path, images: Path | None = None) -> list[dict]:
    return folder(root, images, source="dermnet")


FITZPATRICK17K_LABELS = ("label", "three_partition_label", "nine_partition_label")  # 114, 3 or 9 classes
FITZPATRICK17K_SKIN = ("fitzpatrick_scale", "fitzpatrick_centaur")  # the default: scale, else centaur


def fitzpatrick17k(
    csv_path: Path, images: Path, label_column: str = "label", skin_type_columns=FITZPATRICK17K_SKIN
) -> list[dict]:
    """`label_column` picks the class (`label`, or a partition: `three_partition_label`, `nine_partition_label`);
    the skin type is the first of `skin_type_columns` that is known (1-6; the CSV writes -1 for unknown)."""
    if label_column not in FITZPATRICK17K_LABELS:
        raise InputError(f"--label-column must be one of {', '.join(FITZPATRICK17K_LABELS)}, not {label_column!r}")
    if not skin_type_columns or set(skin_type_columns) - set(FITZPATRICK17K_SKIN):
        raise InputError(f"--skin-type-columns takes {' and/or '.join(FITZPATRICK17K_SKIN)}, in the order to try")
    index, records = ImageIndex(images), []
    header, rows = read_csv(csv_path, "fitzpatrick17k CSV", ["md5hash", skin_type_columns[0], label_column])
    for row in rows:
        fitz = next(filter(None, (_fitzpatrick(row.get(c, "")) for c in skin_type_columns)), None)
        extra = {k: row[k] for k in ("three_partition_label", "nine_partition_label", "qc") if row.get(k)}
        extra.update({"fine_label": row["label"]} if label_column != "label" and row.get("label") else {})
        record = _record(
            index.find(row["md5hash"]),
            "fitzpatrick17k",
            label=row[label_column],
            fitzpatrick=fitz,
            fitzpatrick_group=_skin_group(fitz),
            **extra,
        )
        if row.get("qc", "").startswith("3"):
            record["exclude"] = "qc: wrongly labelled"
        records.append(record)
    return records


def ddi(csv_path: Path, images: Path) -> list[dict]:
    index, records = ImageIndex(images), []
    for row in read_csv(csv_path, "ddi CSV", ["DDI_file", "skin_tone", "disease"])[1]:
        extra = {"malignant": _truthy(row["malignant"])} if row.get("malignant") else {}
        records.append(
            _record(
                index.find(row["DDI_file"]),
                "ddi",
                label=row["disease"],
                fitzpatrick_group=DDI_TONES.get(row["skin_tone"]),
                **extra,
            )
        )
    return records


def ham10000(csv_path: Path, images: Path) -> list[dict]:
    index, records = ImageIndex(images), []
    for row in read_csv(csv_path, "ham10000 CSV", ["lesion_id", "image_id", "dx"])[1]:
        extra = {k: row[k] for k in ("dx_type", "age", "sex", "localization") if row.get(k)}
        code = row["dx"].lower()  # published in lower case; some copies write MEL, NV, ...
        label = HAM10000_NAMES.get(code, code)
        records.append(
            _record(
                index.find(row["image_id"]),
                "ham10000",
                label=label,
                dx=code,
                patient_id=row["lesion_id"],
                lesion_id=row["lesion_id"],
                **extra,
            )
        )
    return records


def pad_ufes_20(csv_path: Path, images: Path) -> list[dict]:
    index, records = ImageIndex(images), []
    for row in read_csv(csv_path, "pad-ufes-20 CSV", ["patient_id", "lesion_id", "img_id", "diagnostic"])[1]:
        fitz = _fitzpatrick(row.get("fitspatrick", ""))
        extra = {k: row[k] for k in ("region", "age", "gender", "biopsed") if row.get(k)}
        label = PAD_UFES_NAMES.get(row["diagnostic"].upper(), row["diagnostic"])
        records.append(
            _record(
                index.find(row["img_id"], ".png"),
                "pad-ufes-20",
                label=label,
                dx=row["diagnostic"],
                fitzpatrick=fitz,
                fitzpatrick_group=_skin_group(fitz),
                patient_id=row["patient_id"],
                lesion_id=row["lesion_id"],
                **extra,
            )
        )
    return records


ADAPTERS: dict[str, Callable[..., list[dict]]] = {
    "skincon": skincon,
    "folder": folder,
    "dermnet": dermnet,
    "fitzpatrick17k": fitzpatrick17k,
    "ddi": ddi,
    "ham10000": ham10000,
    "pad-ufes-20": pad_ufes_20,
}
