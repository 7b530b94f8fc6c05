"""Finding the diagnosis in an answer and matching it to a label set: a table of real-style answers, negation,
the synonym table's coverage, the hierarchy and the fuzzy fallback."""

from __future__ import annotations

import pytest

from skingpt4.evaluate import labels as L
from skingpt4.evaluate import synonyms as S

PAPER = S.named_set("paper15")
HAM = S.named_set("ham10000")
FITZ = S.named_set("fitzpatrick17k")
FITZ3 = S.named_set("fitzpatrick17k-3")
DDI = S.named_set("ddi")
SMALL = ["eczema", "psoriasis", "melanoma"]
U = "unmatched"

# (answer, label set, expected label or "unmatched"): answers in the style SkinGPT-4 / MiniGPT-4 write.
CASES = [
    # the trained sentence, with the step-1 concepts sentence before it
    (
        "This is a skin disease image with the following clinical concepts: Plaque, Scale, Erythema. This could be a "
        "skin disease image of psoriasis.",
        SMALL,
        "psoriasis",
    ),
    ("This could be a skin disease image of epidermal cyst.", PAPER, "Benign tumors"),
    ("This could be a skin disease image of actinic keratosis.", PAPER, "Malignant lesions"),
    ("This could be a skin disease image of actinic keratosis.", HAM, "akiec"),
    ("This could be a skin disease image of Melanoma.", HAM, "mel"),
    ("This could be a skin disease image of melanocytic nevi.", HAM, "nv"),
    ("This could be a skin disease image of seborrheic keratoses.", HAM, "bkl"),
    ("This could be a skin disease image of a cherry angioma.", HAM, "vasc"),
    ("This could be a skin disease image of dermatofibroma.", HAM, "df"),
    ("This may be a skin disease image of basal cell carcinoma (BCC).", HAM, "bcc"),
    ("This is a skin disease image of tinea corporis, also called ringworm.", PAPER, "Fungal"),
    ("This could be an image of urticaria, commonly known as hives.", PAPER, "Urticaria"),
    ("This could be a skin disease image of herpes zoster.", PAPER, "Herpes"),
    ("This could be a skin disease image of bullous pemphigoid.", PAPER, "Bullous"),
    ("This could be a skin disease image of impetigo.", PAPER, "Bacterial infections"),
    ("This could be a skin disease image of vitiligo.", PAPER, "Light diseases"),
    ("This could be a skin disease image of discoid lupus erythematosus.", PAPER, "Connective tissue"),
    ("This could be a skin disease image of scabies.", PAPER, "Infestations and bites"),
    ("This could be a skin disease image of a pyogenic granuloma.", PAPER, "Vascular tumors"),
    ("This could be a skin disease image of rosacea.", PAPER, "Acne and rosacea"),
    ("This could be a skin disease image of lichen planus.", PAPER, "Psoriasis and lichen planus"),
    ("This could be a skin disease image of atopic dermatitis.", PAPER, "Dermatitis"),
    ("This could be a skin disease image of a dysplastic nevus.", PAPER, "Melanoma / nevi / moles"),
    ("This could be a skin disease image of melanoma.", PAPER, "Melanoma / nevi / moles"),
    # spelling variants: British, hyphens, plurals, accents, apostrophes
    ("This could be a skin disease image of seborrhoeic keratosis.", PAPER, "Benign tumors"),
    ("This could be a skin disease image of a haemangioma.", PAPER, "Vascular tumors"),
    ("This could be a skin disease image of naevi.", HAM, "nv"),
    ("This could be a skin disease image of Darier's disease.", FITZ, "dariers disease"),
    ("This could be a skin disease image of Behçet's disease.", FITZ, "behcets disease"),
    ("This could be a skin disease image of Hailey-Hailey disease.", FITZ, "hailey hailey disease"),
    ("This could be a skin disease image of halo nevi.", FITZ, "halo nevus"),
    (
        "This could be a skin disease image of superficial spreading melanoma.",
        FITZ,
        "superficial spreading melanoma ssm",
    ),
    ("This could be a skin disease image of nodular melanoma.", DDI, "nodular-melanoma-(nm)"),
    ("This could be a skin disease image of a keratoacanthoma.", DDI, "squamous-cell-carcinoma-keratoacanthoma"),
    ("This could be a skin disease image of a skin tag.", DDI, "acrochordon"),
    ("This could be a skin disease image of common warts.", DDI, "verruca-vulgaris"),  # both DDI labels: first
    ("This could be a skin disease image of warts.", DDI, "wart"),  # a label's own name comes first
    # cues other than the trained sentence, with hedges
    (
        "The lesion is an erythematous, scaly plaque on the elbow. These findings are consistent with psoriasis.",
        SMALL,
        "psoriasis",
    ),
    (
        "The image shows a pigmented lesion with irregular borders and variegated colour, which is suggestive of "
        "melanoma. Please see a dermatologist.",
        SMALL,
        "melanoma",
    ),
    ("Diagnosis: eczema. The skin is dry, red and itchy.", SMALL, "eczema"),
    ("The most likely diagnosis is atopic dermatitis, a chronic inflammatory condition.", SMALL, "eczema"),
    ("Based on the appearance, it is likely a basal cell carcinoma. It grows slowly.", HAM, "bcc"),
    ("It appears to be a seborrheic keratosis, a common benign growth in older adults.", HAM, "bkl"),
    ("It looks like a fungal infection such as tinea. Antifungal cream may help.", PAPER, "Fungal"),
    ("The patient may have shingles, which is caused by the varicella zoster virus.", PAPER, "Herpes"),
    ("This skin condition is known as hives. It often follows an allergic reaction.", PAPER, "Urticaria"),
    ("I think this is probably psoriasis, although eczema is also possible.", SMALL, "psoriasis"),
    ("It could be eczema or psoriasis; a biopsy would help.", SMALL, "eczema"),
    ("The features are characteristic of a melanocytic nevus, i.e. a mole.", HAM, "nv"),
    # broader group words do not stop the search for the named disease
    ("It is a type of skin cancer called melanoma.", HAM, "mel"),
    ("It is a benign lesion, most likely a seborrheic keratosis.", HAM, "bkl"),
    (
        "This could be a skin disease image of a malignant tumor, likely squamous cell carcinoma.",
        PAPER,
        "Malignant lesions",
    ),
    ("This could be a skin disease image of basal cell carcinoma.", FITZ3, "malignant"),
    ("This could be a skin disease image of psoriasis.", FITZ3, "non-neoplastic"),
    ("This could be a skin disease image of a dermatofibroma.", FITZ3, "benign"),
    # negation: a negated name is never the prediction
    ("This is not melanoma; it is most likely a benign nevus.", HAM, "nv"),
    ("Melanoma is unlikely. The lesion is consistent with a seborrheic keratosis.", HAM, "bkl"),
    ("We should rule out melanoma. It is probably a dysplastic nevus.", HAM, "nv"),
    ("There are no signs of melanoma here, and the lesion looks like a dermatofibroma.", HAM, "df"),
    ("The lesion is not consistent with melanoma.", HAM, U),
    ("It is unlikely to be melanoma.", HAM, U),
    ("Melanoma was ruled out.", HAM, U),
    ("This could be a skin disease image of non-melanoma skin cancer.", HAM, U),
    ("A biopsy cannot rule out melanoma.", HAM, U),
    ("There is no doubt that this is psoriasis.", SMALL, "psoriasis"),
    # a named diagnosis outside the label set is not rescued by a later mention
    ("This could be a skin disease image of lichen planus. Unlike psoriasis, it is itchy and purple.", SMALL, U),
    ("This could be a skin disease image of psoriasis.", HAM, U),
    ("The lesion is consistent with nevus sebaceous.", HAM, U),
    # other mentions when no cue names a disease
    (
        "The skin shows thickened red plaques with silvery scale. Psoriasis often appears on elbows and knees.",
        SMALL,
        "psoriasis",
    ),
    ("Treatment options for eczema include emollients and topical steroids.", SMALL, "eczema"),
    # fuzzy fallback for misspellings in a diagnostic phrase
    ("This could be a skin disease image of psoriais.", SMALL, "psoriasis"),
    ("The findings are consistent with seborheic keratosis.", HAM, "bkl"),
    ("This could be a skin disease image of melanomma.", SMALL, "melanoma"),
    # nothing to match
    ("I am sorry, I cannot see the image clearly. Please upload a better photo.", SMALL, U),
    ("The image shows a red area on the skin with some swelling.", SMALL, U),
    ("", SMALL, U),
    ("in <\ufffd\ufffd random tokens ###", SMALL, U),
    # labels unknown to the table still match their own name
    ("This could be a skin disease image of frobnitz syndrome.", ["frobnitz syndrome", "eczema"], "frobnitz syndrome"),
]


def test_table_has_at_least_60_cases():
    assert len(CASES) >= 60


@pytest.mark.parametrize(("answer", "label_set", "expected"), CASES)
def test_answers_match_their_label(answer, label_set, expected):
    found = L.match(answer, label_set)
    assert (found or U) == expected, L.explain(answer, label_set)


def test_explain_says_how():
    assert L.explain("This could be a skin disease image of eczema.", SMALL).how == L.SENTENCE
    assert L.explain("It is consistent with eczema.", SMALL).how == L.CUE
    assert L.explain("Eczema is itchy.", SMALL).how == L.MENTION
    assert L.explain("It is consistent with eczma.", SMALL).how == L.FUZZY
    assert L.explain("This could be a skin disease image of lichen planus.", SMALL) == L.Match(
        None, L.OUTSIDE, "lichen planus"
    )
    assert L.explain("Nothing here.", SMALL) == L.Match(None, None)


def test_extract_puts_the_trained_sentence_first():
    answer = "It is consistent with eczema. This could be a skin disease image of psoriasis."
    assert L.extract(answer)[0] == "psoriasis"
    assert "eczema" in L.extract(answer)
    assert L.match(answer, SMALL) == "psoriasis"
    assert L.extract("The lesion is not consistent with melanoma.") == []


def test_normalisation():
    assert S.norm("Seborrhoeic Keratoses") == S.norm("seborrheic keratosis")
    assert S.norm("Naevi") == S.norm("nevus") == "nevus"
    assert S.norm("Behçet’s-disease") == S.norm("behcets disease")
    assert S.norm("Melanoma / nevi / moles") == "melanoma nevus mole"


def test_named_sets_resolve_in_the_table():
    counts = L.coverage()
    assert counts["paper15"] == 15 and counts["ham10000"] == 7 and counts["fitzpatrick17k"] == 114
    assert counts["fitzpatrick17k-3"] == 3 and counts["fitzpatrick17k-9"] == 9 and counts["ddi"] == len(DDI) >= 75
    assert not L.unknown_labels(PAPER + HAM + FITZ + DDI)
    with pytest.raises(L.InputError, match="unknown label set 'nope'"):
        S.named_set("nope")


def test_every_fitzpatrick_label_falls_in_a_three_partition_group():
    # Each of the 114 fine labels, named in an answer, is matched to one of the three partitions (or named
    # as itself), so the coarse evaluation never loses a case to the table.
    for label in FITZ:
        assert L.match(f"This could be a skin disease image of {label}.", FITZ) == label
    groups = {label: L.match(f"This could be a skin disease image of {label}.", FITZ3) for label in FITZ}
    assert sum(g is not None for g in groups.values()) == 114, [k for k, g in groups.items() if g is None]
    assert groups["melanoma"] == "malignant" and groups["psoriasis"] == "non-neoplastic"


def test_isic_hierarchy_terms_join_the_table():
    bcc = "Malignant:Malignant epidermal proliferations:Basal cell carcinoma"
    values = ["Malignant", bcc.rsplit(":", 1)[0], bcc, bcc + ":Basal cell carcinoma, Pigmented"]
    entries = S.isic_entries(values)
    assert ("Basal cell carcinoma", [], ["Malignant epidermal proliferations"]) in entries
    table = S.build_table([("basal cell carcinoma", ["bcc"], []), ("malignant", [], [])], {}, entries)
    assert table.by_name["basal cell carcinoma"] == "basal cell carcinoma"  # merged, not duplicated
    assert table.concepts["basal cell carcinoma"].parents == {"Malignant epidermal proliferations"}
    assert table.concepts["Basal cell carcinoma, Pigmented"].parents == {"basal cell carcinoma"}
    with pytest.raises(ValueError, match="names both"):
        S.build_table([("a", ["x"], []), ("b", ["x"], [])], {})
    with pytest.raises(ValueError, match="not a concept"):
        S.build_table([("a", [], ["nowhere"])], {})


def test_isic_groups_as_labels():
    isic = ["Benign", "Malignant", "Indeterminate"]
    assert L.match("This could be a skin disease image of melanoma in situ.", isic) == "Malignant"
    assert L.match("This could be a skin disease image of a compound nevus.", isic) == "Benign"
    assert L.match("This could be a skin disease image of solar keratosis.", isic) == "Indeterminate"


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("This is a non-healing basal cell carcinoma.", "bcc"),
        ("This could be a skin disease image of a non-pigmented basal cell carcinoma.", "bcc"),
        ("This isn't melanoma, it's a nevus.", "nv"),
        ("I don't think this is melanoma; it looks like a nevus.", "nv"),
        ("This is a non-melanoma skin cancer.", None),
    ],
)
def test_modifiers_and_contractions(answer, expected):
    assert L.match(answer, S.named_set("ham10000")) == expected


def test_a_concessive_aside_does_not_beat_the_answer():
    ham = S.named_set("ham10000")
    assert L.match("Although it resembles melanoma, it is a seborrheic keratosis.", ham) == "bkl"
    assert L.match("Though it looks like a nevus at first, this is a dermatofibroma.", ham) == "df"
