"""Diagnosis names: find the diagnosis in a free-text answer and match it to a dataset's label set.

The synonym table (`label_synonyms.yaml`, shipped with the package) names each disease or group once with its
synonyms and the groups it belongs to; with `isic-metadata` installed, the ISIC diagnosis hierarchy is merged in.
A label matches its own names and, below them, the names of everything in it ("basal cell carcinoma" is one of the
paper's "Malignant lesions"). Text and names go through one normaliser (case, accents, hyphens, punctuation,
plurals, British spellings), and names match whole words only.

Where the diagnosis is looked for, in order (`explain` says which step matched):
1. "sentence": the trained answer format, "This could be a skin disease image of X" and close variants;
2. "cue": phrases after a diagnostic cue ("consistent with X", "likely X", "diagnosis: X", "suggestive of X"...),
   in reading order;
3. "mention": any other mention, sentence by sentence (the clinical-concepts sentence of step-1 training is skipped);
4. "fuzzy": a misspelt name in a step 1-2 phrase (difflib; a phrase naming another known disease never does).

Within a phrase the first name wins (then the longest), so "psoriasis, although eczema is possible" is psoriasis.
If the first name found in a step-1 or step-2 phrase is a known disease outside the label set, the answer is
"outside": unmatched, counted as wrong, and not rescued by a later mention of a label. Names of groups above a
label ("skin cancer", "benign lesion") are passed over: they say too little to be an answer outside the set.

Negation (decided here): a name with a negation cue shortly before it in its clause ("not melanoma", "no signs of
melanoma", "rule out melanoma", "unlikely to be melanoma", "non-melanoma", "rather than melanoma") or after it
("melanoma is unlikely", "melanoma was ruled out") is not a prediction of that label, and is skipped entirely.
"Cannot rule out melanoma" counts as negated too: it names a differential, not the diagnosis.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import cache

from skingpt4.errors import InputError
from skingpt4.evaluate.synonyms import Table, clauses, norm, table, tokens

SENTENCE = "sentence"
CUE = "cue"
MENTION = "mention"
FUZZY = "fuzzy"
OUTSIDE = "outside"

# --- one label set ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hit:
    clause: int
    start: int
    length: int
    label: str | None  # None: a known disease outside the label set
    depth: int = 0


class LabelIndex:
    """The names each label of one set answers to, and every known disease name (to recognise "outside")."""

    def __init__(self, labels: list[str]):
        if not labels:
            raise InputError("the label set is empty")
        self.labels = list(labels)
        t = table()
        kids = t.children()
        self.terms: dict[tuple[str, ...], list[tuple[int, int, str]]] = {}  # words -> [(depth, order, label)]
        for order, label in enumerate(self.labels):
            self._add(tokens(label), -1, order, label)  # its own name first: DDI has melanoma and melanoma-in-situ
            concept = t.by_name.get(norm(label))
            if concept is None:
                continue
            for depth, name in _descendants(concept, kids):
                for n in t.concepts[name].names:
                    self._add(tuple(n.split()), depth, order, label)
        self.known = {tuple(n.split()) for n in t.by_name if n}
        # Names of groups above a label ("skin cancer" above melanoma) say too little to be an answer outside the set.
        concepts = {t.by_name[norm(label)] for label in self.labels if norm(label) in t.by_name}
        above = {a for c in concepts for a in _ancestors(c, t)} - concepts
        self.broader = {tuple(n.split()) for a in above for n in t.concepts[a].names} - set(self.terms)
        self.longest = max(len(k) for k in (*self.terms, *self.known))
        self._by_length: dict[int, list[str]] = {}

    def _add(self, words: tuple[str, ...], depth: int, order: int, label: str) -> None:
        if words:
            self.terms.setdefault(words, []).append((depth, order, label))

    def first(self, text: str) -> Hit | None:
        """The first (then longest) name in `text` that is not negated: a label, or a known disease (label None)."""
        for c, words in enumerate(clauses(text)):
            for start in range(len(words)):
                for length in range(min(self.longest, len(words) - start), 0, -1):
                    span = words[start : start + length]
                    if span not in self.terms and (span not in self.known or span in self.broader):
                        continue
                    if negated(words, start, start + length):
                        break  # the longest name here is negated; shorter ones inside it are too
                    if span in self.terms:
                        depth, _, label = min(self.terms[span])
                        return Hit(c, start, length, label, depth)
                    return Hit(c, start, length, None)
        return None

    def fuzzy(self, text: str, cutoff: float = 0.88) -> str | None:
        """The label whose name is closest to a run of words in `text`, if close enough (misspellings)."""
        best, label = cutoff, None
        for words in clauses(text):
            for start in range(len(words)):
                for length in range(1, min(self.longest, len(words) - start) + 1):
                    span = words[start : start + length]
                    if span in self.known or len(" ".join(span)) < 5 or negated(words, start, start + length):
                        continue
                    found = difflib.get_close_matches(" ".join(span), self._names(length), n=1, cutoff=best)
                    if found:
                        best = difflib.SequenceMatcher(None, " ".join(span), found[0]).ratio()
                        label = min(self.terms[tuple(found[0].split())])[2]
        return label

    def _names(self, length: int) -> list[str]:
        if length not in self._by_length:
            names = [" ".join(k) for k in self.terms if abs(len(k) - length) <= 1]
            self._by_length[length] = [n for n in names if len(n) >= 5]
        return self._by_length[length]


def _descendants(root: str, kids: dict[str, set[str]]) -> list[tuple[int, str]]:
    """(depth, concept) for `root` (depth 0) and everything below it, breadth first."""
    seen, out, level = {root}, [(0, root)], [root]
    depth = 0
    while level:
        depth += 1
        level = sorted({k for name in level for k in kids[name]} - seen)
        seen.update(level)
        out += [(depth, name) for name in level]
    return out


def _ancestors(root: str, t: Table) -> set[str]:
    seen, todo = set(), [root]
    while todo:
        for parent in t.concepts[todo.pop()].parents - seen:
            seen.add(parent)
            todo.append(parent)
    return seen


@cache
def index(labels: tuple[str, ...]) -> LabelIndex:
    return LabelIndex(list(labels))


# --- negation -----------------------------------------------------------------------------------------------------

_BEFORE = [
    tokens(c)
    for c in (
        "not",
        "no",
        "never",
        "without",
        "rule out",
        "ruled out",
        "rules out",
        "ruling out",
        "exclude",
        "excluded",
        "excluding",
        "unlikely",
        "less likely",
        "rather than",
        "instead of",
        "absence of",
        "negative for",
        "free of",
        "r o",
        "isn't",
        "don't",
        "doesn't",
        "aren't",
        "wasn't",
        "weren't",
        "didn't",
    )
]
_RIGHT_BEFORE = [tokens("non")]  # "non-melanoma skin cancer" negates; "non-pigmented basal cell carcinoma" does not
_AFTER = [
    tokens(c)
    for c in (
        "is unlikely",
        "unlikely",
        "is ruled out",
        "was ruled out",
        "can be ruled out",
        "ruled out",
        "is excluded",
        "was excluded",
        "can be excluded",
        "is not likely",
        "is less likely",
        "seems unlikely",
        "is not the diagnosis",
    )
]
_NOT_NEGATION = [tokens(c) for c in ("no doubt", "not only", "no question")]
WINDOW = 4  # words before a name that a cue may stand in ("unlikely to be a melanoma")


def negated(words: tuple[str, ...], start: int, end: int) -> bool:
    before = words[max(0, start - WINDOW) : start]
    for cue in _BEFORE:
        for i in range(len(before) - len(cue) + 1):
            if before[i : i + len(cue)] == cue and not _exempt(words, start - len(before) + i):
                return True
    if any(words[max(0, start - len(cue)) : start] == cue for cue in _RIGHT_BEFORE):
        return True
    after = words[end : end + 3]
    return any(after[: len(cue)] == cue for cue in _AFTER)


def _exempt(words: tuple[str, ...], at: int) -> bool:
    return any(words[at : at + len(p)] == p for p in _NOT_NEGATION)


# --- extraction ---------------------------------------------------------------------------------------------------

_END = r"(?P<x>[^.!?\n]+)"  # the phrase: up to the end of the sentence
_SENTENCES = [  # the trained format and close variants
    re.compile(r"\b(?:this|it|the\s+image)\b[^.!?\n]{0,50}?\bimage\s+(?:of|showing|shows|depicting)\s+" + _END, re.I),
    re.compile(r"\bthis\s+(?:could|may|might|would)\s+be\s+(?:a\s+case\s+of\s+)?" + _END, re.I),
]
_CUES = re.compile(
    r"\b(?:(?:most\s+likely|probable|possible|likely|final|working|differential|clinical)\s+)?diagnos(?:is|ed|e)\b"
    r"[^.!?\n:]{0,30}?(?:\bis\b|\bas\b|\bof\b|\bwith\b|:|\bwould\s+be\b|\bcould\s+be\b|\bmay\s+be\b|\bmight\s+be\b)"
    r"|\b(?:consistent|compatible)\s+with|\bsuggestive\s+of|\bindicative\s+of|\bcharacteristic\s+of|\btypical\s+of"
    r"|\bsuggests?|\bsuggesting|\b(?:most\s+)?(?:likely|probably|possibly)(?:\s+to\s+be)?"
    r"|\b(?:appears?|seems?)\s+to\s+be|\blooks?\s+like|\bresembles?|\b(?:could|may|might)\s+be"
    r"|\b(?:this|it)\s+is\b|\b(?:you|patient)\s+(?:may\s+|might\s+|probably\s+)?(?:have|has)|\ba\s+case\s+of"
    r"|\bknown\s+as|\bcalled|\bdiagnosis\b",
    re.I,
)
_CONCEPTS_SENTENCE = re.compile(r"clinical concepts|medical features|following features", re.I)


def extract(answer: str) -> list[str]:
    """Candidate diagnosis phrases, best first: the trained "This could be a skin disease image of X" sentence (and
    close variants), then phrases after diagnostic cues in reading order. Each runs to the end of its sentence."""
    return [phrase for phrase, _ in candidates(answer)]


def candidates(answer: str) -> list[tuple[str, str]]:
    """(phrase, SENTENCE or CUE); a cue that is itself negated ("not consistent with X") gives no phrase. Cues in
    a concessive clause ("although it resembles X, ...") or naming a history ("has a history of X") come last:
    they say what the lesion is not, or was."""
    found = [(m.group("x").strip(), SENTENCE) for pattern in _SENTENCES for m in pattern.finditer(answer)]
    deferred = []
    for m in _CUES.finditer(answer):
        rest = re.match(_END, answer[m.end() :])
        if rest and rest.group("x").strip() and not _negated_cue(answer, m.start(), m.end()):
            phrase = rest.group("x").strip()
            opening = answer[max(answer.rfind(c, 0, m.start()) for c in ".!?\n") + 1 : m.start()]
            aside = _CONCESSIVE.search(opening) or _HISTORY.match(phrase)
            (deferred if aside else found).append((phrase, CUE))
    seen: set[str] = set()
    return [(p, kind) for p, kind in found + deferred if not (p in seen or seen.add(p))]


_CONCESSIVE = re.compile(r"\b(?:although|though|while|whereas|despite|even if|unlike)\b[^,;]*$", re.I)
_HISTORY = re.compile(r"(?:an?\s+)?(?:(?:past|family|previous|prior)\s+)?history\b|(?:previous|prior)\b", re.I)


def _negated_cue(answer: str, start: int, end: int) -> bool:
    """Whether a negation cue stands just before (or in) the cue at answer[start:end], in the same clause."""
    parts = clauses(answer[max(0, start - 60) : end])
    if not parts:
        return False
    words = parts[-1]
    return negated(words, max(0, len(words) - len(tokens(answer[start:end]))), len(words))


def sentences(answer: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+|\n+", answer) if s.strip() and not _CONCEPTS_SENTENCE.search(s)]


# --- matching -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Match:
    label: str | None
    how: str | None  # sentence | cue | mention | fuzzy | outside | None (nothing found)
    phrase: str = ""


def explain(answer: str, labels: list[str] | tuple[str, ...]) -> Match:
    """Which label `answer` names, how it was found, and the phrase it was found in."""
    idx = index(tuple(labels))
    found = candidates(answer or "")
    for phrase, how in found:
        hit = idx.first(phrase)
        if hit is not None:
            return Match(hit.label, how if hit.label else OUTSIDE, phrase)
    for sentence in sentences(answer or ""):
        hit = idx.first(sentence)
        if hit is not None and hit.label is not None:
            return Match(hit.label, MENTION, sentence)
    for phrase, _ in found:
        label = idx.fuzzy(phrase)
        if label is not None:
            return Match(label, FUZZY, phrase)
    return Match(None, None)


def match(answer: str, labels: list[str] | tuple[str, ...]) -> str | None:
    """The label of `labels` that `answer` names as its diagnosis, or None (unmatched)."""
    return explain(answer, labels).label


def unknown_labels(labels: list[str]) -> list[str]:
    """Labels the synonym table does not know (they still match their own name, but no synonyms)."""
    t = table()
    return [label for label in labels if norm(label) not in t.by_name]


def coverage() -> dict[str, int]:
    """Counts for documentation: concepts, names, and how many labels of each named set the table resolves."""
    t = table()
    counts = {"concepts": len(t.concepts), "names": len(t.by_name)}
    for name, labels in t.sets.items():
        counts[name] = sum(norm(label) in t.by_name for label in labels)
    return counts
