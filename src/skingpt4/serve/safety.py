"""Deterministic safety rails, applied to every answer after generation, on every surface.

Why code and not the prompt: a model can be talked out of its instructions or cut off by the token budget, and a
dermatology model's most dangerous output is confident reassurance. So the rails are fixed texts and regular
expressions run after generation (docs/reliability.md §3.3-3.4), and nothing the model writes can remove them:

- every answer ends with `DISCLAIMER`, appended here;
- referral rules read both sides of the consultation (the user's questions and the model's answer), so they do not
  depend on the model agreeing: a named malignancy, ABCDE-type warning features, bleeding, rapid change, a child,
  the eye or the genitals add `REFERRAL_PROMPT`; signs of a systemic emergency add `REFERRAL_URGENT`; self-harm in
  the user's text adds `CRISIS`;
- false reassurance ("nothing to worry about", "benign", "no need to see a doctor") never reaches the user: each
  sentence holding one is replaced by `NEUTRAL`, and the prompt-referral advice is added.

The rule table is `safety_rules.py`. The rules over-fire on purpose: a needless "see a doctor" costs little, a
missed one can cost a life. The one relaxation is a short negation window ("no bleeding") for symptom features;
never for malignancy names, a child or self-harm. Pure text and stdlib only, so the rules run (and are tested)
without a model or a GPU.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from skingpt4.serve.safety_rules import LEVEL_OF, REASSURANCE, norm, rule_triggers

LEVELS = ("none", "prompt", "urgent", "crisis")  # rising; a verdict reports the highest that fired

INTENDED_USE = (
    "SkinGPT-4 is a research and education tool, not a medical device: "
    "do not use it for diagnosis, triage or treatment decisions."
)
DISCLAIMER = (
    "Disclaimer: this answer was written by an AI research tool and is not a diagnosis. A photo leaves out your "
    "history, touch, dermoscopy and a full skin check, and accuracy varies with skin tone, body site, lighting and "
    "camera. If in doubt, see a doctor. Get urgent care for fever with a rash, widespread blistering or peeling, "
    "swelling of the face, lips or tongue, difficulty breathing or rapidly spreading redness."
)
# NICE NG12 refers suspected skin cancer within 2 weeks; the wording keeps the time frame, not the UK pathway.
REFERRAL_PROMPT = (
    "Please have this checked by a doctor or dermatologist promptly, ideally within 2 weeks (the time frame used "
    "for suspected skin cancer referrals). This answer cannot rule anything out."
)
REFERRAL_URGENT = (
    "Some of what was described can be a sign of a serious illness. Seek urgent medical care now: contact your "
    "local emergency services or go to an emergency department."
)
CRISIS = (
    "If you are thinking about harming yourself or ending your life, please reach out now: contact your local "
    "emergency services or a crisis helpline, or tell someone you trust. You do not have to face this alone."
)
NEUTRAL = "This cannot be judged safely from a photo."  # replaces each sentence of false reassurance

_ADVICE = {"prompt": REFERRAL_PROMPT, "urgent": REFERRAL_URGENT, "crisis": CRISIS}


@dataclass(frozen=True)
class Verdict:
    text: str  # what the user sees: cleaned answer + advice (if any) + disclaimer
    answer: str  # the cleaned answer alone (reassurance replaced), no advice, no disclaimer
    level: str  # "none" | "prompt" | "urgent" | "crisis" (highest that fired)
    triggers: tuple[str, ...]  # names of the rules that fired, sorted
    replaced: int  # how many reassurance phrases were replaced


def advice_lines(level: str) -> tuple[str, ...]:
    """The fixed advice for one level ("none" gives nothing)."""
    return (_ADVICE[level],) if level in _ADVICE else ()


def _highest(levels) -> str:
    return max(levels, key=LEVELS.index, default="none")


def _advice(triggers: set[str]) -> tuple[str, ...]:
    """Crisis signposting first, then the medical advice: someone in crisis may also need the referral."""
    levels = {LEVEL_OF[name] for name in triggers}
    crisis = advice_lines("crisis") if "crisis" in levels else ()
    return (*crisis, *advice_lines(_highest(levels - {"crisis"})))


# --- reassurance filter -------------------------------------------------------------------------------------------

# Sentence ends: . ! ? ; followed by whitespace, or a blank line. A single line break is not one: a model that wraps
# its lines would split "nothing\nto worry about" and the phrase would pass. Nor is a sentence end inside Markdown
# link or image text or an HTML tag ("[Fine. Click](http://...)"): cut there, the markup would survive. Filtering
# the same sentences, the streaming Guard and `review` agree on the whole text.
_BOUNDARY = re.compile(r"[.!?;](?=\s)|\n[ \t]*\n")
_MARKUP_CAP = 500  # markup still open after this many characters is not markup: cut anyway ("a < 6 mm lesion.")
_LEAD = re.compile(r"\s*(?:[-*+>]\s+|#+\s+)?")  # kept when a sentence is replaced: indentation, list marker


def _open_markup(segment: str) -> bool:
    """Whether `segment` ends inside `[...]`, a link target `](...)` or a tag `<...>`."""
    return (
        segment.rfind("[") > segment.rfind("]")
        or segment.rfind("](") > segment.rfind(")")
        or segment.rfind("<") > segment.rfind(">")
    )


def _cuts(text: str) -> Iterator[int]:
    """Where `text` may be cut into sentences (positions after each sentence end)."""
    start = 0
    for match in _BOUNDARY.finditer(text):
        segment = text[start : match.end()]
        if _open_markup(segment) and len(segment.strip()) < _MARKUP_CAP:
            continue
        yield match.end()
        start = match.end()


def _clauses(text: str) -> Iterator[str]:
    start = 0
    for end in _cuts(text):
        yield text[start:end]
        start = end
    if start < len(text):
        yield text[start:]


# Output is plain text on every surface, but a client may render Markdown or HTML: an image there loads by itself,
# and its URL can carry the conversation out (docs/reliability.md §1.5). Images go, links keep only their text,
# tags go.
_MD_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_MD_LINK = re.compile(r"\[([^\]\n]*)\]\([^)\n]*\)")
_TAG = re.compile(r"</?[A-Za-z][^>\n]{0,300}>")


def _defang(clause: str) -> str:
    return _TAG.sub("", _MD_LINK.sub(r"\1", _MD_IMAGE.sub("[image removed]", clause)))


def _replace(clause: str) -> tuple[str, int]:
    clause = _defang(clause)
    found = len(REASSURANCE.findall(norm(clause)))
    if not found:
        return clause, 0
    lead, trail = _LEAD.match(clause).group(), clause[len(clause.rstrip()) :]
    return lead + NEUTRAL + trail, found


def _clean(text: str) -> tuple[str, int]:
    """Replace every sentence holding a reassurance phrase; whitespace around it is kept."""
    parts = [_replace(clause) for clause in _clauses(text)]
    return "".join(part for part, _ in parts), sum(found for _, found in parts)


# --- verdicts -----------------------------------------------------------------------------------------------------


def _verdict(question: str, raw: str, answer: str, replaced: int) -> Verdict:
    """Rules read the raw answer: a replaced sentence may still have named a warning sign."""
    triggers = rule_triggers(question, raw) | ({"reassurance"} if replaced else set())
    level = _highest(LEVEL_OF[name] for name in triggers)
    text = "\n\n".join(part for part in (answer, *_advice(triggers), DISCLAIMER) if part)
    return Verdict(text, answer, level, tuple(sorted(triggers)), replaced)


def review(answer: str, question: str = "") -> Verdict:
    """Apply every rule. `question` is all the user's text of the consultation so far."""
    clean, replaced = _clean(answer)
    return _verdict(question, answer, clean.strip(), replaced)


def without_rails(text: str) -> str:
    """A shown answer without the advice and disclaimer appended here (to give the model back its own answer)."""
    blocks = text.split("\n\n")
    fixed = {DISCLAIMER, *_ADVICE.values()}
    while blocks and blocks[-1] in fixed:
        blocks.pop()
    return "\n\n".join(blocks)


class Guard:
    """Streaming version of `review`: what it emits never contains a reassurance phrase.

    Text is held back until a sentence boundary (. ! ? ; followed by whitespace, or a blank line), so a phrase is never
    split across emitted pieces; trailing whitespace is held too, so the answer is emitted exactly as `review`
    strips it. `finish()` returns the remaining tail (filtered) plus advice and disclaimer, and the Verdict.
    Invariant: "".join(all fed outputs) + tail == verdict.text == review(answer, question).text.
    """

    def __init__(self, question: str = ""):
        self.question = question
        self._raw: list[str] = []
        self._shown: list[str] = []
        self._buffer = ""
        self._replaced = 0
        self._started = False  # whether any non-blank text has been shown
        self._done = False

    def feed(self, piece: str) -> str:
        if self._done:
            raise RuntimeError("Guard.feed after finish")
        self._raw.append(piece)
        self._buffer += piece
        cut = max(_cuts(self._buffer), default=0)
        head = self._buffer[:cut].rstrip()
        self._buffer = self._buffer[len(head) :]
        return self._show(head)

    def finish(self) -> tuple[str, Verdict]:
        if self._done:
            raise RuntimeError("Guard.finish called twice")
        self._done = True
        shown = "".join(self._shown)
        answer = (shown + self._show(self._buffer)).rstrip()
        verdict = _verdict(self.question, "".join(self._raw), answer, self._replaced)
        assert verdict.text.startswith(shown)  # held by construction: nothing shown is ever taken back
        return verdict.text[len(shown) :], verdict

    def _show(self, text: str) -> str:
        text, found = _clean(text)
        self._replaced += found
        if not self._started:
            text = text.lstrip()  # `review` strips the answer's leading whitespace
            self._started = bool(text)
        self._shown.append(text)
        return text
