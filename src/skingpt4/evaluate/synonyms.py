"""Diagnosis names: one normaliser for text and names, and the synonym table (`label_synonyms.yaml`, shipped with
the package; with `isic-metadata` installed, the ISIC diagnosis hierarchy is merged in). Each disease or group is
named once, with its synonyms and the groups it belongs to; named label sets (paper15, ham10000, ...) live there too.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from skingpt4.errors import InputError

# --- normalisation ------------------------------------------------------------------------------------------------

_IRREGULAR = {
    "nevi": "nevus",
    "naevi": "nevus",
    "naevus": "nevus",
    "tumour": "tumor",
    "tumours": "tumor",
    "colour": "color",
    "lentigines": "lentigo",
    "milium": "milia",
    "striae": "striae",
    "telangiectasia": "telangiectases",
    "telangiectasis": "telangiectases",
}
_CLAUSE = re.compile(r"[,;:!?\n]|\.(?=\s|$)|\s[-\u2013\u2014]\s|\bbut\b|\bwhereas\b|\bhowever\b", re.IGNORECASE)


def _word(token: str) -> str:
    """One lowercase token in its canonical spelling: irregular plurals, British spellings, regular plurals."""
    if token in _IRREGULAR:
        return _IRREGULAR[token]
    if len(token) > 3:
        token = token.replace("ae", "e").replace("oe", "e")  # naevus, haemangioma, oedema, seborrhoeic
    if token.endswith("oses") and len(token) > 5:
        return token[:-2] + "is"  # keratoses, dermatoses
    if token.endswith("ies") and len(token) > 4:
        return token[:-3] + "y"
    if token.endswith("s") and len(token) > 3 and not token.endswith(("ss", "us", "is")):
        return token[:-1]
    return token


def tokens(text: str) -> tuple[str, ...]:
    """Normalised words of `text`: accents and apostrophes dropped, other punctuation (hyphens, slashes) a space."""
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode().lower()
    text = re.sub(r"['\u2019`]", "", text)
    return tuple(_word(t) for t in re.findall(r"[a-z0-9]+", text))


def norm(text: str) -> str:
    return " ".join(tokens(text))


def clauses(text: str) -> list[tuple[str, ...]]:
    """`text` split at clause boundaries (commas, semicolons, sentence ends, "but"), each as normalised words."""
    return [t for t in (tokens(part) for part in _CLAUSE.split(text)) if t]


# --- the synonym table --------------------------------------------------------------------------------------------


@dataclass
class Concept:
    name: str
    names: set[str] = field(default_factory=set)  # normalised
    parents: set[str] = field(default_factory=set)  # concept names
    say: str | None = None  # how an answer names it, where the name is a code ("bkl": "benign keratosis")


@dataclass
class Table:
    concepts: dict[str, Concept]
    by_name: dict[str, str]  # normalised name -> concept name
    sets: dict[str, list[str]]

    def children(self) -> dict[str, set[str]]:
        kids: dict[str, set[str]] = {name: set() for name in self.concepts}
        for concept in self.concepts.values():
            for parent in concept.parents:
                kids[parent].add(concept.name)
        return kids


@cache
def table() -> Table:
    """The shipped synonym table, with the ISIC hierarchy from `isic-metadata` merged in when it is installed."""
    import yaml

    data = yaml.safe_load(
        resources.files("skingpt4.evaluate").joinpath("label_synonyms.yaml").read_text(encoding="utf-8")
    )
    entries = [(name, spec.get("also", []), spec.get("in", [])) for name, spec in data["concepts"].items()]
    built = build_table(entries, data["sets"], isic_entries())
    for name, spec in data["concepts"].items():
        built.concepts[name].say = spec.get("say")
    return built


def build_table(entries, sets: dict[str, list[str]], merged=()) -> Table:
    """Concepts from (name, synonyms, groups) entries; a name may belong to one entry only. `merged` entries (the
    ISIC hierarchy) join the concept that already has their name, if any."""
    concepts: dict[str, Concept] = {}
    by_name: dict[str, str] = {}
    for name, also, _ in entries:
        concepts[name] = Concept(name)
        for n in (name, *also):
            if by_name.setdefault(norm(n), name) != name:
                raise ValueError(f"label table: {n!r} names both {by_name[norm(n)]!r} and {name!r}")
            concepts[name].names.add(norm(n))
    for name, _, _ in merged:
        key = by_name.setdefault(norm(name), name)
        concepts.setdefault(key, Concept(key, {norm(name)}))
    for name, _, groups in (*entries, *merged):
        concept = concepts[by_name[norm(name)]]
        for group in groups:
            if norm(group) not in by_name:
                raise ValueError(f"label table: {name!r} is in {group!r}, which is not a concept")
            if by_name[norm(group)] != concept.name:
                concept.parents.add(by_name[norm(group)])
    return Table(concepts, by_name, sets)


def isic_entries(values: list[str] | None = None) -> list[tuple[str, list[str], list[str]]]:
    """The ISIC diagnosis hierarchy ("Malignant:Malignant epidermal proliferations:Basal cell carcinoma:...") as
    (term, [], [parent]) entries; from `isic-metadata` when `values` is not given and the package is installed."""
    if values is None:
        try:
            from isic_metadata.diagnosis_hierarchical import DiagnosisEnum
        except ImportError:
            return []
        values = [member.value for member in DiagnosisEnum]
    entries = []
    for value in values:
        path = [part.strip() for part in value.split(":")]
        for depth, term in enumerate(path):
            entries.append((term, [], path[depth - 1 : depth] if depth else []))
    return entries


def named_set(name: str) -> list[str]:
    """A named label set: paper15, ham10000, fitzpatrick17k, fitzpatrick17k-3, fitzpatrick17k-9, ddi."""
    sets = table().sets
    if name not in sets:
        raise InputError(f"unknown label set {name!r}; choose one of: {', '.join(sets)}")
    return list(sets[name])
