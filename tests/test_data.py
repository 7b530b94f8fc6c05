"""Dataset preparation: every adapter on a synthetic CSV or folder with the set's real columns, captions, the
leakage-free split, the integrity report, the manifest and MiniGPT-4 writers, and one-line errors."""

from __future__ import annotations

import csv
import json
import random
from collections import Counter
from pathlib import Path

import pytest
from conftest import FITZPATRICK17K_HEADER
from malformed import gps_exif
from PIL import Image

from skingpt4.data import adapters, captions, options
from skingpt4.data.manifest import read_manifest
from skingpt4.data.prepare import assign_splits, prepare, read_minigpt4
from skingpt4.errors import InputError

CONCEPTS = "This is a skin disease image with the following medical features (clinical concepts): "
NOT_AN_IMAGE = "not an image file, or an unsupported image format; allowed: JPEG, PNG, WebP, BMP, TIFF"
TRUNCATED = "image is truncated or corrupt (PNG header could not be parsed)"


def picture(path: Path, n: int, fmt: str | None = None, **save) -> Path:
    """A 16x16 image whose colour is unique to `n`, so that no two test images are byte-identical by accident."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (n * 37 % 256, n * 11 % 256, 200 - n % 200)).save(path, fmt, **save)
    return path


def table(path: Path, header: list[str], rows: list[list]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def names(records: list[dict]) -> list[str]:
    return [Path(r["image"]).name for r in records]


def skincon_csv(path: Path, marked: dict[str, list[str]], do_not_consider: set[str] = frozenset()) -> Path:
    header = ["", "ImageID", *adapters.SKINCON_CONCEPTS, "Do not consider this image"]
    rows = [
        [i, image, *(int(c in concepts) for c in adapters.SKINCON_CONCEPTS), int(image in do_not_consider)]
        for i, (image, concepts) in enumerate(marked.items())
    ]
    return table(path, header, rows)


# ---------------------------------------------------------------------------------------------------------------
# Adapters and captions


def test_skincon_step1_captions(tmp_path):
    # Concepts are ticked out of column order on purpose: captions list them in the CSV's (SKINCON's) order.
    marked = {
        "a.jpg": ["Erythema", "Scale", "Plaque"],
        "b.jpg": ["Xerosis", "Fissure", "Induration"],
        "c.jpg": ["Papule"],
        "d.jpg": [],
    }
    csv_path = skincon_csv(tmp_path / "skincon.csv", marked, do_not_consider={"c.jpg"})
    for n, image in enumerate(marked):
        picture(tmp_path / "images" / image, n)
    records = adapters.skincon(csv_path, tmp_path / "images")
    assert [r["caption"] for r in records[:2]] == [
        CONCEPTS + "Plaque, Scale, Erythema.",
        "This is a skin disease image with the following medical features (clinical concepts): "
        "Fissure, Induration, Xerosis.",
    ]
    assert [r.get("exclude") for r in records] == [
        None,
        None,
        "marked 'Do not consider this image'",
        "no concept marked",
    ]
    assert records[0]["source"] == "skincon" and "CC BY-NC-SA 3.0" in records[0]["license"]

    report = prepare("skincon", csv_path, tmp_path / "out" / "step1.jsonl", images=tmp_path / "images")
    assert (report.read, report.written) == (4, 2)
    assert report.excluded == {"marked 'Do not consider this image'": 1, "no concept marked": 1}
    written = [json.loads(line) for line in (tmp_path / "out" / "step1.jsonl").read_text().splitlines()]
    assert sorted(r["image"] for r in written) == ["../images/a.jpg", "../images/b.jpg"]
    assert {r["concepts"][0] for r in written} == {"Plaque", "Fissure"}


def test_folder_and_dermnet_step2_captions(tmp_path):
    root = tmp_path / "mine"
    picture(root / "Eczema" / "e1.jpg", 1)
    picture(root / "Eczema" / "more" / "e2.png", 2, "PNG")  # nested: still Eczema
    picture(root / "lichen_planus" / "l1.jpg", 3)
    (root / "Eczema" / "notes.txt").write_text("not a picture")
    records = adapters.folder(root)
    assert names(records) == ["e1.jpg", "e2.png", "l1.jpg"]
    assert [r["caption"] for r in records] == [
        "This could be a skin disease image of Eczema.",
        "This could be a skin disease image of Eczema.",
        "This could be a skin disease image of lichen planus.",
    ]
    # Kaggle's DermNet: train/ and test/ halves, class folders ending in " Photos"; the halves are merged.
    dermnet = tmp_path / "dermnet"
    picture(dermnet / "train" / "Acne and Rosacea Photos" / "a1.jpg", 4)
    picture(dermnet / "test" / "Acne and Rosacea Photos" / "a2.jpg", 5)
    picture(dermnet / "train" / "Urticaria Hives" / "u1.jpg", 6)
    records = adapters.dermnet(dermnet)
    assert [r["label"] for r in records] == ["Acne and Rosacea", "Urticaria Hives", "Acne and Rosacea"]
    assert records[0]["caption"] == "This could be a skin disease image of Acne and Rosacea."
    assert records[0]["source"] == "dermnet" and "see the dataset's terms" in records[0]["license"]


def test_concept_prefix_and_regroup(tmp_path):
    root = tmp_path / "classes"
    for n, (cls, image) in enumerate([("Eczema", "e1.jpg"), ("Atopic Dermatitis", "a1.jpg"), ("Tinea", "t1.jpg")]):
        picture(root / cls / image, n)
    concepts = table(tmp_path / "concepts.csv", ["image", "concepts"], [["e1.jpg", "Plaque; Scale"], ["t1", "Scale"]])
    mapping = tmp_path / "groups.yaml"
    mapping.write_text("Dermatitis: [eczema, atopic  dermatitis]\nTinea: Fungal\n")
    out = tmp_path / "step2.jsonl"
    report = prepare("folder", root, out, concepts=concepts, mapping=mapping, fractions=(1, 0, 0))
    assert report.concepts_matched == 2
    by_name = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert by_name["e1.jpg"]["caption"] == (
        "This is a skin disease image with the following medical features (clinical concepts): Plaque, Scale. "
        "This could be a skin disease image of Dermatitis."
    )
    assert by_name["a1.jpg"]["caption"] == "This could be a skin disease image of Dermatitis."
    assert by_name["t1.jpg"]["caption"] == CONCEPTS + "Scale. This could be a skin disease image of Fungal."
    assert (by_name["a1.jpg"]["label"], by_name["a1.jpg"]["original_label"]) == ("Dermatitis", "Atopic Dermatitis")
    assert report.classes == {"train": {"Dermatitis": 2, "Fungal": 1}}

    # A CSV mapping that misses a class is an error naming it, unless '*' catches the rest.
    partial = table(tmp_path / "groups.csv", ["class", "group"], [["Eczema", "Dermatitis"]])
    with pytest.raises(InputError, match=r"^mapping groups.csv has no group for Atopic Dermatitis, Tinea \(add"):
        prepare("folder", root, tmp_path / "x.jsonl", mapping=partial)
    table(partial, ["class", "group"], [["Eczema", "Dermatitis"], ["*", "Others"]])
    prepare("folder", root, tmp_path / "x.jsonl", mapping=partial, fractions=(1, 0, 0))
    labels = Counter(json.loads(line)["label"] for line in (tmp_path / "x.jsonl").read_text().splitlines())
    assert labels == {"Dermatitis": 1, "Others": 2}

    # Concepts from a SKINCON-shaped CSV (ImageID + 0/1 columns), matched by file name.
    skincon_concepts = skincon_csv(tmp_path / "sc.csv", {"a1.jpg": ["Papule", "Erythema"]})
    records = adapters.folder(root)
    assert options.add_concepts(records, skincon_concepts) == 1
    captions.finish_captions(records)
    expected = CONCEPTS + "Papule, Erythema. This could be a skin disease image of Atopic Dermatitis."
    assert records[0]["caption"] == expected


def test_fitzpatrick17k_adapter(tmp_path):
    header = FITZPATRICK17K_HEADER[1:]
    rows = [
        ["5e82a45b", 3, 3, "psoriasis", "inflammatory", "non-neoplastic", "", "https://x/1.jpg", "x1.jpg"],
        ["9bc21ae9", -1, -1, "melanoma", "malignant melanoma", "malignant", "1 Diagnostic", "u", "x2.jpg"],
        ["0a94359e", 6, 5, "psoriasis", "inflammatory", "non-neoplastic", "3 Wrongly labelled", "u", "x3.jpg"],
    ]
    csv_path = table(tmp_path / "fitzpatrick17k.csv", header, rows)
    for n, row in enumerate(rows):
        picture(tmp_path / "data" / "finalfitz17k" / f"{row[0]}.jpg", n)  # found anywhere under the images folder
    records = adapters.fitzpatrick17k(csv_path, tmp_path / "data")
    assert names(records) == ["5e82a45b.jpg", "9bc21ae9.jpg", "0a94359e.jpg"]
    first = records[0]
    assert (first["label"], first["fitzpatrick"], first["fitzpatrick_group"]) == ("psoriasis", 3, "III-IV")
    assert (first["three_partition_label"], first["license"]) == ("non-neoplastic", "CC BY-NC-SA 3.0")
    assert "fitzpatrick" not in records[1] and "fitzpatrick_group" not in records[1]  # -1: unknown, left out
    assert records[2]["exclude"] == "qc: wrongly labelled" and "exclude" not in records[1]
    assert "patient_id" not in first  # no patient id in this set: each image is its own split group


def test_ddi_adapter(tmp_path):
    rows = [
        [1, "000001.png", 56, True, "melanoma-in-situ"],
        [2, "000002.png", 12, False, "verruca-vulgaris"],
        [3, "000003.png", 34, False, "seborrheic-keratosis"],
    ]
    csv_path = table(tmp_path / "ddi_metadata.csv", ["DDI_ID", "DDI_file", "skin_tone", "malignant", "disease"], rows)
    for n, row in enumerate(rows):
        picture(tmp_path / row[1], n, "PNG")
    records = adapters.ddi(csv_path, tmp_path)
    assert [(r["fitzpatrick_group"], r["malignant"], r["label"]) for r in records] == [
        ("V-VI", True, "melanoma-in-situ"),
        ("I-II", False, "verruca-vulgaris"),
        ("III-IV", False, "seborrheic-keratosis"),
    ]
    assert records[0]["caption"] == "This could be a skin disease image of melanoma-in-situ."
    assert records[0]["source"] == "ddi" and "research use" in records[0]["license"]


def test_ham10000_adapter_finds_both_image_parts(tmp_path):
    header = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]
    rows = [
        ["HAM_0000118", "ISIC_0027419", "bkl", "histo", "80.0", "male", "scalp"],
        ["HAM_0000118", "ISIC_0025030", "bkl", "histo", "80.0", "male", "scalp"],
        ["HAM_0002730", "ISIC_0026769", "mel", "histo", "75.0", "female", "back"],
    ]
    csv_path = table(tmp_path / "HAM10000_metadata.csv", header, rows)
    picture(tmp_path / "HAM10000_images_part_1" / "ISIC_0027419.jpg", 1)
    picture(tmp_path / "HAM10000_images_part_2" / "ISIC_0025030.jpg", 2)
    picture(tmp_path / "HAM10000_images_part_2" / "ISIC_0026769.jpg", 3)
    records = adapters.ham10000(csv_path, tmp_path)
    folders = [Path(r["image"]).parent.name for r in records]
    assert folders == ["HAM10000_images_part_1", "HAM10000_images_part_2", "HAM10000_images_part_2"]
    assert records[2]["caption"] == "This could be a skin disease image of melanoma."
    assert records[0]["label"] == "benign keratosis-like lesions" and records[0]["dx"] == "bkl"
    assert (records[0]["patient_id"], records[0]["localization"], records[0]["license"]) == (
        "HAM_0000118",
        "scalp",
        "CC BY-NC 4.0",
    )


def test_pad_ufes_20_adapter(tmp_path):
    header = [
        "patient_id",
        "lesion_id",
        "smoke",
        "age",
        "gender",
        "fitspatrick",
        "region",
        "diameter_1",
        "diagnostic",
        "img_id",
        "biopsed",
    ]
    rows = [
        ["PAT_46", 881, "False", 55, "FEMALE", "3.0", "NECK", "6.0", "BCC", "PAT_46_881_939.png", "True"],
        ["PAT_46", 882, "False", 55, "FEMALE", "", "FACE", "", "ACK", "PAT_46_882_14.png", "False"],
    ]
    csv_path = table(tmp_path / "metadata.csv", header, rows)
    picture(tmp_path / "images" / "imgs_part_1" / "PAT_46_881_939.png", 1, "PNG")
    picture(tmp_path / "images" / "imgs_part_2" / "PAT_46_882_14.png", 2, "PNG")
    records = adapters.pad_ufes_20(csv_path, tmp_path / "images")
    assert [r["caption"] for r in records] == [
        "This could be a skin disease image of basal cell carcinoma.",
        "This could be a skin disease image of actinic keratosis.",
    ]
    assert [(r.get("fitzpatrick"), r.get("fitzpatrick_group")) for r in records] == [(3, "III-IV"), (None, None)]
    ids = [(r["patient_id"], r["lesion_id"], r["region"]) for r in records]
    assert ids == [("PAT_46", "881", "NECK"), ("PAT_46", "882", "FACE")]
    assert all(Path(r["image"]).is_file() for r in records) and records[0]["license"] == "CC BY 4.0"


# ---------------------------------------------------------------------------------------------------------------
# Splits


def patients(n_patients: int = 120, seed: int = 7) -> list[dict]:
    """Synthetic records: patients with 1-4 images each, plus 30 images with no patient id."""
    rng = random.Random(seed)
    records = [
        {"image": f"/d/p{p}_{i}.jpg", "patient_id": f"P{p}", "source_sha256": f"{p}-{i}"}
        for p in range(n_patients)
        for i in range(rng.randint(1, 4))
    ]
    return records + [{"image": f"/d/solo{i}.jpg", "source_sha256": f"solo{i}"} for i in range(30)]


def split_of(records: list[dict]) -> dict[str, str]:
    return {r["image"]: r["split"] for r in records}


def test_split_is_leakage_free_seeded_and_close_to_fractions():
    records = patients()
    assign_splits(records, (0.8, 0.1, 0.1), seed=0)
    by_patient: dict[str, set] = {}
    for r in records:
        by_patient.setdefault(r.get("patient_id") or r["image"], set()).add(r["split"])
    assert all(len(splits) == 1 for splits in by_patient.values())  # no patient in two splits
    groups = len(by_patient)
    counts = Counter(r["split"] for r in records)
    for split, fraction in zip(("train", "val", "test"), (0.8, 0.1, 0.1)):
        # Each group's split is its own draw: the shares are binomial around the fractions (4 sd, in images).
        assert abs(counts[split] - fraction * len(records)) <= 4 * 4 * (groups * fraction * (1 - fraction)) ** 0.5

    again = patients()
    random.Random(1).shuffle(again)  # the same records in another order: the same assignment
    assign_splits(again, (0.8, 0.1, 0.1), seed=0)
    assert split_of(again) == split_of(records)
    other = patients()
    assign_splits(other, (0.8, 0.1, 0.1), seed=1)
    assert split_of(other) != split_of(records)


def test_an_image_has_one_split_in_every_manifest():
    """The split follows from the image's content and the seed alone: other records (another data set, with other
    images around it and no patient ids) do not move it."""
    records = patients()
    assign_splits(records, (0.8, 0.1, 0.1), seed=0)
    solos = [r for r in records if "patient_id" not in r]
    subset = [{"image": f"/elsewhere/{r['image'][3:]}", "source_sha256": r["source_sha256"]} for r in solos[::2]]
    assign_splits(subset + [{"image": "/x/new.jpg", "source_sha256": "new"}], (0.8, 0.1, 0.1), seed=0)
    assert [r["split"] for r in subset] == [r["split"] for r in solos[::2]]


def test_stratified_splits_meet_fractions_per_class():
    # Without ids every image is its own group, so fractions are met to the image, in every class.
    singles = [{"image": f"/d/{i}.jpg", "source_sha256": str(i), "label": "ab"[i % 2]} for i in range(200)]
    assign_splits(singles, (0.7, 0.2, 0.1), seed=3, stratify=True)
    for label in "ab":
        counts = Counter(r["split"] for r in singles if r["label"] == label)
        assert counts == {"train": 70, "val": 20, "test": 10}
    small = [{"image": f"/s/{i}.jpg", "source_sha256": f"s{i}", "label": "rare"} for i in range(6)]
    assign_splits(small + singles, (0.7, 0.2, 0.1), seed=3, stratify=True)
    assert set(Counter(r["split"] for r in small)) == {"train", "val", "test"}  # a class of 6 reaches every split


def test_split_keeps_duplicates_together_end_to_end(tmp_path):
    # HAM10000 through prepare: lesions with several images, and the same photo filed under two lesions.
    rows, n = [], 0
    for lesion in range(40):
        for _view in range(1 + lesion % 3):
            rows.append([f"HAM_{lesion:07d}", f"ISIC_{n:07d}", ("mel", "nv", "bkl")[lesion % 3]])
            picture(tmp_path / "HAM10000_images_part_1" / f"ISIC_{n:07d}.jpg", n)
            n += 1
    rows.append(["HAM_9999999", "ISIC_9999999", "nv"])
    (tmp_path / "HAM10000_images_part_1" / "ISIC_9999999.jpg").write_bytes(
        (tmp_path / "HAM10000_images_part_1" / "ISIC_0000000.jpg").read_bytes()
    )
    csv_path = table(tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx"], rows)
    out = tmp_path / "ham.jsonl"
    report = prepare("ham10000", csv_path, out, seed=5)
    assert (report.patients_across_splits, report.duplicates_across_splits) == (0, 0)
    assert len(report.duplicates) == 1 and sorted(names([{"image": i} for i in report.duplicates[0]])) == [
        "ISIC_0000000.jpg",
        "ISIC_9999999.jpg",
    ]
    written = {Path(r["image"]).name: r for r in map(json.loads, out.read_text().splitlines())}
    assert written["ISIC_0000000.jpg"]["split"] == written["ISIC_9999999.jpg"]["split"]
    assert sum(report.splits.values()) == n + 1 == report.written
    assert report.splits["train"] == pytest.approx(0.8 * (n + 1), abs=3)


# ---------------------------------------------------------------------------------------------------------------
# Integrity report


def test_integrity_report_counts(tmp_path):
    images = tmp_path / "images"
    header = ["md5hash", "fitzpatrick_scale", "label"]
    rows = [
        ["h1", 1, "psoriasis"],
        ["h2", 2, "psoriasis"],
        ["h3", 3, "eczema"],
        ["h4", 5, "eczema"],
        ["h5", -1, "melanoma"],
        ["h6", 4, "psoriasis"],
        ["h7", 2, "eczema"],
        ["h8", 6, "eczema"],
        ["h9", 1, "melanoma"],
    ]
    csv_path = table(tmp_path / "fitzpatrick17k.csv", header, rows)
    for n in range(1, 6):
        picture(images / f"h{n}.jpg", n)
    (images / "h6.jpg").write_bytes((images / "h1.jpg").read_bytes())  # a duplicate under another name
    picture(images / "full.png", 7, "PNG")
    (images / "h7.jpg").write_bytes((images / "full.png").read_bytes()[:30])  # truncated PNG
    (images / "full.png").unlink()
    (images / "h8.jpg").write_text("these are notes, not a photo")  # h9.jpg does not exist

    report = prepare("fitzpatrick17k", csv_path, tmp_path / "m.jsonl", images=images, fractions=(1, 0, 0))
    assert (report.read, report.written) == (9, 6)
    assert names([{"image": m} for m in report.missing]) == ["h9.jpg"]
    assert {Path(k).name: v for k, v in report.unreadable.items()} == {"h7.jpg": TRUNCATED, "h8.jpg": NOT_AN_IMAGE}
    assert report.unreadable_reasons() == {TRUNCATED: 1, NOT_AN_IMAGE: 1}
    assert [sorted(Path(p).name for p in group) for group in report.duplicates] == [["h1.jpg", "h6.jpg"]]
    assert report.splits == {"train": 6}
    assert report.classes == {"train": {"psoriasis": 3, "eczema": 2, "melanoma": 1}}
    assert report.skin_types == {"train": {"I-II": 2, "III-IV": 2, "V-VI": 1, "unknown": 1}}
    text = report.text()
    assert "fitzpatrick17k: 6 of 9 images written to" in text and "missing: 1 (first: " in text
    assert f"unreadable: 1 ({TRUNCATED})" in text and "duplicates: 1 groups, 1 extra images; across splits: 0" in text
    assert "train          6        2        2        1        1" in text and "  psoriasis: 3" in text

    # Without decoding, broken files pass (only missing ones are caught); duplicates can be dropped.
    quick = prepare("fitzpatrick17k", csv_path, tmp_path / "q.jsonl", images=images, check_images=False)
    assert (quick.written, quick.unreadable, len(quick.missing)) == (8, {}, 1)
    dropped = prepare("fitzpatrick17k", csv_path, tmp_path / "d.jsonl", images=images, drop_duplicates=True)
    assert dropped.written == 5 and len(dropped.duplicates) == 1


# ---------------------------------------------------------------------------------------------------------------
# Writers, reader, atomic output


def test_manifest_is_read_back_and_not_overwritten(tmp_path):
    root = tmp_path / "classes"
    for n in range(6):
        picture(root / ("A", "B")[n % 2] / f"{n}.jpg", n)
    out = tmp_path / "sets" / "all.jsonl"
    prepare("folder", root, out, seed=2)
    items = list(read_manifest(out))  # the reader train.py and diagnose use
    assert len(items) == 6 and all(item.path.is_file() for item in items)
    assert {item.manifest["split"] for item in items} <= {"train", "val", "test"}
    assert all(len(item.manifest["source_sha256"]) == 64 and item.manifest["source"] == "folder" for item in items)
    before = out.read_bytes()
    with pytest.raises(InputError, match=r"all.jsonl already exists \(--overwrite replaces it\)$"):
        prepare("folder", root, out, seed=3)
    assert out.read_bytes() == before
    prepare("folder", root, out, seed=3, overwrite=True)
    assert sorted(p.name for p in out.parent.iterdir()) == ["all.jsonl"]  # no temporary file left behind


def test_minigpt4_round_trip_without_exif(tmp_path):
    root = tmp_path / "classes"
    gps_source = root / "Nevus" / "phone photo.jpg"
    gps_source.parent.mkdir(parents=True)
    Image.new("RGB", (16, 16), (90, 60, 40)).save(gps_source, "JPEG", exif=gps_exif(), quality=95)
    assert Image.open(gps_source).getexif().get_ifd(0x8825)  # the source really carries a GPS position
    picture(root / "Melanoma" / "m1.png", 1, "PNG")
    picture(root / "Melanoma" / "m2.jpg", 2)
    out = tmp_path / "minigpt4"
    report = prepare("folder", root, out, layout="minigpt4", fractions=(1, 0, 0))
    assert report.written == 3 and sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "train"]

    cap = json.loads((out / "train" / "filter_cap.json").read_text())
    assert cap == {
        "annotations": [
            {"image_id": "m1", "caption": "This could be a skin disease image of Melanoma."},
            {"image_id": "m2", "caption": "This could be a skin disease image of Melanoma."},
            {"image_id": "phone_photo", "caption": "This could be a skin disease image of Nevus."},
        ]
    }
    records = read_minigpt4(out / "train")
    assert [(r["image"], r["caption"]) for r in records] == [
        (f"image/{a['image_id']}.jpg", a["caption"]) for a in cap["annotations"]
    ]
    for record in records:
        path = out / "train" / record["image"]
        with Image.open(path) as img:
            assert img.format == "JPEG" and img.size == (16, 16)
            assert not img.getexif() and "exif" not in img.info and "icc_profile" not in img.info
        assert b"Exif" not in path.read_bytes()

    # The manifest next to the folders keeps every field and points at the written copies.
    items = list(read_manifest(out / "manifest.jsonl"))
    assert [item.path.name for item in items] == ["m1.jpg", "m2.jpg", "phone_photo.jpg"]
    assert items[2].manifest["label"] == "Nevus" and items[2].manifest["split"] == "train"

    # The folder format is also an input: back to a manifest, captions unchanged.
    back = tmp_path / "back.jsonl"
    assert prepare("minigpt4", out / "train", back, fractions=(1, 0, 0)).written == 3
    assert [json.loads(line)["caption"] for line in back.read_text().splitlines()] == [r["caption"] for r in records]
    with pytest.raises(InputError, match="already exists"):
        prepare("folder", root, out, layout="minigpt4")
    prepare("folder", root, out, layout="minigpt4", overwrite=True, seed=4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.jsonl", "classes", "minigpt4"]


# ---------------------------------------------------------------------------------------------------------------
# Bad input: one line each


def test_bad_inputs_are_one_line_errors(tmp_path):
    picture(tmp_path / "images" / "a.jpg", 1)
    ham = table(tmp_path / "ham.csv", ["lesion_id", "image_name", "diagnosis"], [["L1", "a", "mel"]])
    fitz = table(tmp_path / "fitz.csv", ["md5hash", "fitzpatrick_scale", "label"], [["gone", 2, "x"]])
    mgpt = tmp_path / "cap"
    mgpt.mkdir()
    (mgpt / "filter_cap.json").write_text('{"annotations": [{"image_id": "1"}]}')
    cases = [
        (("dermascope", ham, tmp_path / "o.jsonl"), {}, "unknown format 'dermascope'; choose from skincon, folder"),
        (("ham10000", tmp_path / "nope.csv", tmp_path / "o.jsonl"), {}, "ham10000 CSV: no such file: "),
        (("ham10000", ham, tmp_path / "o.jsonl"), {}, "ham10000 CSV ham.csv: missing column(s) image_id, dx"),
        (("skincon", ham, tmp_path / "o.jsonl"), {}, "skincon CSV ham.csv: missing column ImageID (or DDI_file)"),
        (("fitzpatrick17k", fitz, tmp_path / "o.jsonl"), {"images": tmp_path / "images"}, "no usable images from "),
        (("folder", tmp_path / "images", tmp_path / "o.jsonl"), {}, "outside any class folder (as "),
        (("folder", tmp_path / "absent", tmp_path / "o.jsonl"), {}, "folder: not a folder: "),
        (("folder", tmp_path, tmp_path / "o.json"), {}, "a manifest must be a .jsonl file, got "),
        (
            ("folder", tmp_path, tmp_path / "o.jsonl"),
            {"fractions": (0.8, 0.3, 0.1)},
            "fractions (train, val, test) must be >= 0, sum to 1, train > 0; got (0.8, 0.3, 0.1)",
        ),
        (("folder", tmp_path, tmp_path / "o.jsonl"), {"layout": "tar"}, "unknown layout 'tar'"),
        (("skincon", ham, tmp_path / "o.jsonl"), {"mapping": ham}, "skincon captions are concepts only"),
        (("minigpt4", mgpt, tmp_path / "o.jsonl"), {}, "annotation 1: needs an image_id and a caption"),
        (("minigpt4", tmp_path, tmp_path / "o.jsonl"), {}, "not a MiniGPT-4 caption folder (no filter_cap.json)"),
    ]
    for args, kwargs, message in cases:
        with pytest.raises(InputError) as caught:
            prepare(*args, **kwargs)
        assert message in str(caught.value) and "\n" not in str(caught.value), (args, str(caught.value))
    latin = tmp_path / "latin.csv"
    latin.write_bytes("lesion_id,image_id,dx\nL1,caf\xe9,mel\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"^ham10000 CSV latin.csv: not a readable UTF-8 CSV \(UnicodeDecodeError\)$"):
        prepare("ham10000", latin, tmp_path / "o.jsonl")
    bad_yaml = tmp_path / "map.yaml"
    bad_yaml.write_text("- just\n- a list\n")
    picture(tmp_path / "classes" / "red" / "a.jpg", 1)
    with pytest.raises(InputError, match=r"^mapping file map.yaml: expected \{class: group\}"):
        prepare("folder", tmp_path / "classes", tmp_path / "o.jsonl", mapping=bad_yaml)


def test_minigpt4_layout_through_a_symlinked_folder_points_at_its_images(tmp_path):
    """The manifest's image paths stay right when the output folder is reached through a link (/tmp on macOS)."""
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    source = tmp_path / "src" / "eczema"
    source.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (20, 20), (60 * i, 20, 20)).save(source / f"{i}.png")
    out = tmp_path / "link" / "out"
    prepare("folder", tmp_path / "src", out, layout="minigpt4")
    items = list(read_manifest(out / "manifest.jsonl"))
    assert len(items) == 3 and all(item.path.is_file() for item in items)


def test_the_next_batch_decodes_while_this_one_is_answered(tmp_path):
    """`prefetched` yields each batch's `load_images` in order, with the next batch's decoding already begun in
    the background while the caller still holds this one; a broken file is an error record as before."""
    import time

    from conftest import image_bytes

    from skingpt4.data.manifest import collect, prefetched

    for n in range(3):
        (tmp_path / f"p{n}.png").write_bytes(image_bytes(noise_seed=n))
    (tmp_path / "p3.png").write_bytes(b"not a photo")
    items = collect([str(tmp_path)])
    started = []

    def blank(item):
        started.append(item.key)
        return {"image": item.key}

    seen = []
    for n, (records, _good, images) in enumerate(prefetched([[item] for item in items], blank)):
        seen += [(record["image"], record.get("error") is None, len(images)) for record in records]
        deadline = time.monotonic() + 10
        while len(started) < min(n + 2, len(items)) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(started) == min(n + 2, len(items))  # the next batch began before this one was let go
    assert seen == [(item.key, n < 3, int(n < 3)) for n, item in enumerate(items)]


def test_a_class_folder_layout_is_explained_when_it_is_not_one(tmp_path):
    flat = tmp_path / "flat"
    picture(flat / "a.jpg", 1)
    with pytest.raises(InputError, match=r"^folder: 1 photos lie in .*flat outside any class folder \(as "):
        prepare("folder", flat, tmp_path / "o.jsonl")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match=r"^folder: .*empty has no class sub-folders: one per class, named for it"):
        prepare("folder", empty, tmp_path / "o.jsonl")


def test_an_empty_test_split_is_reported(tmp_path):
    """A few photos at 0.8/0.1/0.1 can leave no test image: `eval` would then refuse by default, so prepare says
    so (and says nothing where no test share was asked for)."""
    for n in range(4):
        picture(tmp_path / "set" / ("red" if n % 2 else "blue") / f"{n}.jpg", n)
    report = prepare("folder", tmp_path / "set", tmp_path / "o.jsonl")
    assert report.splits.get("test", 0) == 0
    assert "warning: the test split is empty, so `skingpt4 eval` finds nothing to score by default" in report.text()
    asked = prepare("folder", tmp_path / "set", tmp_path / "p.jsonl", fractions=(0.5, 0.5, 0.0))
    assert "test split is empty" not in asked.text()
