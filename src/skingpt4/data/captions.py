"""Captions: the step-1 concept sentence and the step-2 diagnosis sentence, as the recipe trains them."""

from __future__ import annotations

from collections.abc import Iterable

CONCEPT_SENTENCE = "This is a skin disease image with the following medical features (clinical concepts): {}."
DIAGNOSIS_SENTENCE = "This could be a skin disease image of {}."


def concept_caption(concepts: Iterable[str]) -> str:
    return CONCEPT_SENTENCE.format(", ".join(concepts))


def diagnosis_caption(label: str, concepts: Iterable[str] = ()) -> str:
    """Step 2: the concept sentence first when concepts are known (maintainer, SkinGPT-4#11), then the class."""
    concepts = list(concepts)
    sentence = DIAGNOSIS_SENTENCE.format(label)
    return f"{concept_caption(concepts)} {sentence}" if concepts else sentence


def finish_captions(records: list[dict]) -> None:
    """Labelled records get their step-2 caption (after any regrouping and concepts are applied)."""
    for record in records:
        if record.get("label"):
            record["caption"] = diagnosis_caption(record["label"], record.get("concepts", ()))
