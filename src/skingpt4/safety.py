"""Deterministic safety rails, applied to every answer after generation, on every surface.

Why code and not the prompt: a model can be talked out of its instructions or cut off by the token budget, and a
dermatology model's most dangerous output is confident reassurance. So the rails are fixed texts and regular
expressions run after generation (reliability.md §3.3-3.4), and nothing the model writes can remove them:

- every answer ends with `DISCLAIMER`, appended here;
- referral rules read both sides of the consultation (the user's questions and the model's answer), so they do not
  depend on the model agreeing: a named malignancy, ABCDE-type warning features, bleeding, rapid change, a child,
  the eye or the genitals add `REFERRAL_PROMPT`; signs of a systemic emergency add `REFERRAL_URGENT`; self-harm in
  the user's text adds `CRISIS`;
- false reassurance ("nothing to worry about", "benign", "no need to see a doctor") never reaches the user: each
  sentence holding one is replaced by `NEUTRAL`, and the prompt-referral advice is added.

The rules over-fire on purpose: a needless "see a doctor" costs little, a missed one can cost a life. The one
relaxation is a short negation window ("no bleeding") for symptom features; never for malignancy names, a child or
self-harm. Pure text and stdlib only, so the rules run (and are tested) without a model or a GPU.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Rule:
    name: str
    level: str  # "prompt" | "urgent" | "crisis"
    pattern: re.Pattern[str]
    sides: tuple[str, ...] = ("question", "answer")  # which text it reads
    negatable: bool = True  # "no bleeding" does not fire; never true for names of diseases or for self-harm


# Between words: whitespace, markdown emphasis, quotes and hyphens, so "nothing **to** worry" or "non-healing"
# cannot slip past a pattern written with plain spaces.
_SEP = r"(?:[\s*_~\"-]+)"


def _rx(*alternatives: str) -> re.Pattern[str]:
    """Whole-word alternatives over normalised text; a space in a pattern matches any run of separators."""
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives).replace(" ", _SEP) + r")(?!\w)")


_WARNING_FEATURES = (  # ABCDE and the NICE 7-point checklist, each its own trigger name for the audit log
    ("asymmetry", _rx(r"asymmetr\w*", r"(?:not|un|non) ?symmetric\w*", r"lopsided")),
    (
        "border",
        _rx(
            r"(?:irregular|ragged|notched|jagged|uneven|scalloped|blurred|fuzzy) (?:[\w']+ ){0,2}"
            r"(?:borders?|edges?|margins?|outlines?|shape)",
            r"(?:borders?|edges?|margins?|outlines?|shape) (?:[\w']+ ){0,3}"
            r"(?:irregular|ragged|notched|jagged|uneven|scalloped|blurred|fuzzy)",
            r"irregular(?:ly)? ?shaped",
        ),
    ),
    (
        "colour",
        _rx(
            r"(?:irregular|uneven|patchy|variegated|mixed|multiple|several|different|various|varied|varying"
            r"|two|three|many) (?:[\w']+ )?(?:colou?rs?|colou?ration|pigment\w*|shades|hues)",
            r"(?:multi|two|three|many|different) ?colou?red",
            r"colou?rs? (?:[\w']+ ){0,2}(?:vary|varies|varying|uneven|irregular)",
            r"colou?r (?:variation|irregularit\w*)|variegat\w*",
        ),
    ),
    (
        "diameter",  # >= 6 mm; the lookbehinds keep "5.7 mm" from reading as "7 mm"
        _rx(
            r"(?<![\d.,])(?:[6-9]|[1-9]\d+)(?:[.,]\d+)? ?(?:mm|millimet(?:er|re)s?)",
            r"(?<![\d.,])(?:0?[.,][6-9]\d*|[1-9]\d*(?:[.,]\d+)?) ?(?:cm|centimet(?:er|re)s?)",
            r"(?:\d+(?:[.,]\d+)?|an?|one|two|half|quarter) (?:of )?(?:an )?inch(?:es)?",
            r"(?:larger|bigger|wider|greater) than (?:a |the )?(?:pencil )?(?:eraser|rubber)",
        ),
    ),
    (
        "changing",
        _rx(
            r"evolv\w*",
            r"(?:chang\w*|grow\w*|grew|increas\w*|enlarg\w*|expand\w*|darken\w*) (?:[\w']+ ){0,2}"
            r"(?:size|shape|colou?r|appearance|diameter)",
            r"(?:size|shape|colou?r|appearance) (?:[\w']+ ){0,3}(?:chang\w*|grow\w*|increas\w*)",
            r"(?:getting|got|gotten|grown|growing|become|becoming|became|gets) (?:[\w']+ )?"
            r"(?:bigger|larger|darker|wider|thicker|raised|lumpy)",
            r"new (?:[\w']+ )?(?:mole|lump|growth)s?",
        ),
    ),
    (
        "rapid",
        _rx(
            r"rapid(?:ly)? (?:[\w']+ )?(?:grow\w*|chang\w*|enlarg\w*|increas\w*|evolv\w*|develop\w*|expand\w*)",
            r"(?:grow\w*|grew|chang\w*|enlarg\w*|increas\w*|develop\w*|appear\w*|expand\w*|got bigger"
            r"|getting bigger) (?:[\w']+ ){0,2}(?:rapidly|quickly|fast|suddenly|overnight)",
            r"(?:fast|quick|rapid|rapidly) ?growing|(?:doubled|tripled) in size",
            r"sudden(?:ly)? (?:[\w']+ )?(?:appear\w*|grow\w*|grew|chang\w*|enlarg\w*)",
        ),
    ),
    (
        "ugly_duckling",
        _rx(
            r"ugly duckling",
            r"(?:looks?|looking|is) (?:[\w']+ )?different from (?:[\w']+ ){0,2}(?:moles|spots|marks)",
            r"stands? out from (?:[\w']+ ){0,2}(?:others?|rest)",
        ),
    ),
    (
        "non_healing",
        _rx(
            r"non ?heal\w*",
            r"(?:not|never|won't|doesn't|does not|didn't|did not|hasn't|has not|haven't|have not|isn't|is not"
            r"|will not) (?:[\w']+ ){0,2}heal\w*",
            r"(?:keeps?|kept) (?:coming back|reopening|re ?opening|breaking open)",
            r"ulcer\w*",
        ),
    ),
    (
        "nail_streak",
        _rx(
            r"(?:streak|stripe|band|line)s? (?:[\w']+ ){0,3}(?:finger|toe|thumb)?nails?",
            r"(?:finger|toe|thumb)?nails? (?:[\w']+ ){0,2}(?:streak|stripe|band)s?",
            r"melanonychia",
        ),
    ),
    (
        "bleeding",
        _rx(
            r"bleed\w*|bled",
            r"blood(?! ?(?:tests?|pressure|sugar|vessels?|work|flow|counts?|circulation|supply))\w*",
            r"ooz\w*|crust\w*|weep\w*",
        ),
    ),
)

_EMERGENCIES = (  # any of these alone: in a skin consultation, "fever" is taken as fever with a rash
    (
        "fever",
        _rx(r"fevers?", r"feverish", r"febrile", r"high temperature", r"temperature of", r"chills", r"rigou?rs"),
    ),
    (
        "blistering",
        _rx(
            r"(?:widespread|extensive|large|big|many|multiple|spreading|all over) (?:[\w']+ ){0,2}"
            r"(?:blister\w*|peel\w*|raw skin)",
            r"(?:blister\w*|peel\w*) (?:[\w']+ ){0,4}(?:all over|large areas?|widespread|(?:whole|entire) body"
            r"|most of|everywhere)",
            r"slough\w*",
            r"(?:skin|it) (?:is |was )?(?:coming|falling|peeling) off",
            r"sheets of skin|nikolsky|stevens ?johnson|toxic epidermal|scalded skin",
        ),
    ),
    (
        "swelling",
        _rx(
            r"(?:swell\w*|swollen|puff\w*|o?edema\w*) (?:[\w']+ ){0,3}(?:face|lips?|tongue|throat|mouth)",
            r"(?:face|facial|lips?|tongue|throat|mouth) (?:[\w']+ ){0,3}(?:swell\w*|swollen|puff\w*)",
            r"angio ?o?edema|anaphyla\w*",
        ),
    ),
    (
        "breathing",
        _rx(
            r"(?:difficult\w*|trouble|hard|struggl\w*|problems?|unable|can't|cannot|labou?red) (?:[\w']+ )?breath\w*",
            r"short(?:ness)? of breath|breathless\w*|wheez\w*|throat (?:is )?(?:closing|tight\w*)",
            r"gasping",
        ),
    ),
    (
        "spreading",
        _rx(
            r"(?:rapidly|quickly|fast) (?:[\w']+ )?spread\w*",
            r"spread\w* (?:[\w']+ ){0,2}(?:rapidly|quickly|fast|by the hour|within hours)",
            r"red (?:streaks?|lines?) (?:[\w']+ ){0,3}(?:spread\w*|up|running|along)",
            r"red streaks?|necroti[sz]ing",
        ),
    ),
    (
        "purpura",
        _rx(
            r"purpur\w*|petechi\w*|non ?blanch\w*",
            r"(?:doesn't|does not|don't|do not|won't|will not|didn't|did not) (?:[\w']+ )?(?:fade|blanch\w*)",
            r"(?:glass|tumbler) test",
            r"(?:purple|dark red|bruise ?like) (?:[\w']+ )?(?:spots?|dots|patches|rash|blotches|pin ?pricks)",
            r"meningit\w*|meningococc\w*|sepsis|septic\w*",
        ),
    ),
    (
        "confusion",
        _rx(  # not "can be confused with psoriasis", nor "I'm confused about which cream"
            r"(?:is|seems|became|becoming|got|getting|very|more) confused(?! (?:with|between|about|over|by|as))",
            r"confusion(?! (?:with|between|about|over))",
            r"disorient\w*|delirious|delirium|(?:hard|difficult|unable) to wake|unresponsive",
            r"(?:passed|passing) out|faint(?:ed|ing)|collaps\w*|floppy|letharg\w*",
        ),
    ),
    (
        "vision",  # eye pain or changed vision with a rash near the eye (e.g. shingles) needs same-day care
        _rx(
            r"(?:blurr\w*|double|loss of|losing|lost|reduced|impaired|changes? in|changing|decreased|worse) vision",
            r"vision (?:[\w']+ )?(?:loss|chang\w*|problems?|blurr\w*)",
            r"can't see (?:properly|clearly|well|out of)",
            r"(?:pain\w*|hurts?|hurting|aching) (?:[\w']+ ){0,2}eyes?",
            r"eyes? (?:[\w']+ )?(?:pain|hurts?|hurting|aches?)",
        ),
    ),
)

RULES = (
    # Not negatable: "not melanoma" from the model still names it, and the photo cannot settle the question.
    Rule(
        "malignancy",
        "prompt",
        _rx(
            r"melanom\w*|lentigo maligna|carcinom\w*|basal cell|squamous cell|bcc|scc|cancer\w*",
            r"pre ?cancer\w*|malignan\w*|lymphom\w*|kaposi\w*|merkel|mycosis fungoides|\w*sarcoma\w*",
            r"bowen's|bowens|metasta\w*|tumou?rs?|neoplas\w*",
        ),
        negatable=False,
    ),
    *(Rule(name, "prompt", pattern) for name, pattern in _WARNING_FEATURES),
    # The patient's age is the user's to state; answers say "common in children" about eczema.
    Rule(
        "child",
        "prompt",
        _rx(
            r"bab(?:y|ies)|infants?|toddlers?|newborns?|child(?:ren)?|kids?",
            r"my (?:little |young )?(?:son|daughter|boy|girl)s?",
            r"(?:little|young) (?:one|boy|girl)s?|pre ?teens?",
            r"(?<![\d.,])(?:1[0-5]|\d)(?:[.,]5)? ?(?:year|yr)s? ?old",
            r"(?<![\d.,])(?:1[0-5]|\d) ?(?:yo|y/o|y\.o\.?)",
            r"aged? (?:1[0-5]|\d)(?![\d.,])|\d+ ?(?:months?|weeks?|days?) ?old",
            r"(?:one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen|fifteen) ?"
            r"(?:year|month|week|day)s? ?old",
        ),
        sides=("question",),
        negatable=False,
    ),
    Rule("eye", "prompt", _rx(r"eyes?", r"eyelids?", r"eyelash\w*", r"eyeballs?", r"\w*ocular", r"conjunctiv\w*")),
    Rule(
        "genital",  # not "groin": tinea cruris there is ordinary; the organs themselves need an examination
        "prompt",
        _rx(
            r"genital\w*|penis|penile|vulva\w*|vagina\w*|labia\w*|scrot\w*|testic\w*|testes|foreskin",
            r"glans|perine\w*|anus|anal|perianal|pubic|private (?:parts?|areas?)",
        ),
    ),
    *(Rule(name, "urgent", pattern) for name, pattern in _EMERGENCIES),
    # Only the user's words count, and no negation: a crisis message shown once too often is the safe error.
    Rule(
        "self_harm",
        "crisis",
        _rx(
            r"suicid\w*|kill(?:ing)? my ?self|end(?:ing)? (?:my (?:own )?life|it all)",
            r"take my (?:own )?life",
            r"(?:want|wanna|wish|going|ready) (?:[\w']+ ){0,3}(?:die|dead)",
            r"better off (?:[\w']+ ){0,4}(?:dead|gone|without me)",
            r"self ?harm\w*|(?:hurt|harm|burn|injur)\w* my ?self",
            r"cut(?:ting)? my ?self(?! (?:shaving|by accident|accidentally))",
            r"no (?:reason|point) (?:in |to )?(?:liv\w*|going on)",
            r"(?:don't|do not) want to (?:live|be alive|be here|exist|wake up)",
            r"overdos\w*|unaliv\w*|can't go on",
        ),
        sides=("question",),
        negatable=False,
    ),
)

# False reassurance in the model's answer. A match replaces its whole sentence, so the patterns only need to find
# the claim, not to cover every word of it.
_REASSURANCE = _rx(
    r"benign\w*|harmless\w*|innocuous",
    r"nothing(?: [\w']+){0,3}? (?:to )?(?:be )?(?:worr(?:y|ied|ying)|concern(?:ed|ing)?|alarm(?:ed|ing)?|fear"
    r"|panic|serious|sinister|dangerous|harmful|malignant|cancerous)",
    r"no (?:need|reason|cause|call)(?: [\w']+){0,2}? (?:to|for) (?:be )?(?:worr\w*|concern\w*|alarm\w*|panic\w*"
    r"|fear\w*|anxi\w*)",
    r"(?:don't|dont|do not|doesn't|does not|needn't|need not|shouldn't|should not|won't|will not|no) "
    r"(?:(?:really|even|need|have|to) ){0,3}(?:be )?worr(?:y|ied|ies)",
    r"not (?:(?:something|anything|a thing|a cause|cause|a reason|reason|a|any)(?: [\w']+){0,3}? )?(?:(?:to|for) )?"
    r"(?:be )?(?:worr(?:y|ied|ying)|concern(?:ed|ing)?|alarm(?:ed|ing)?)",
    r"not (?:(?:seem|look|appear|likely) )?(?:to be )?(?:(?:very|at all|anything|something) )?"
    r"(?:dangerous|serious|harmful|sinister|a problem|a big deal|life ?threatening)",
    r"(?:certainly|definitely|clearly|surely|obviously|absolutely|most likely|likely|probably|is|it's|this is"
    r"|that's) not (?:a |an |any )?(?:(?:type|form|kind|sign) of )?(?:skin )?(?:cancer\w*|malignan\w*|melanoma"
    r"|carcinoma)",
    r"(?:not|doesn't|does not|don't|do not|isn't|unlikely|no signs? of|no evidence of) (?:(?:looks?|seems?|appears?)"
    r" (?:like )?|to be )?(?:a |an |any )?(?:skin )?(?:cancer\w*|malignan\w*|melanoma|carcinoma)",
    r"non ?(?:cancerous|malignant)",
    r"(?:no|without) (?:worrying|concerning|suspicious|alarming|sinister|malignant) (?:features?|signs?)",
    r"(?:completely|perfectly|totally|entirely|absolutely|100 ?%) (?:normal|safe|fine|okay|ok)",
    r"(?:(?:don't|dont|do not|doesn't|does not|won't|will not|shouldn't|should not) (?:really |even )?"
    r"(?:need|have)(?: to)?|needn't|need not|no (?:need|reason)(?: for you)?(?: to| for)?"
    r"|not (?:necessary|needed|required|essential)(?: for you)?(?: to)?|unnecessary(?: to)?) "
    r"(?:(?:see|visit|consult|go to|call|contact|seek|get|book|bother) )?(?:(?:a|an|your|the|any) )?(?:medical )?"
    r"(?:doctor|dermatologist|gp|physician|clinician|specialist|professional|attention|advice|help|care"
    r"|appointment|treatment|review|check ?up)s?",
    r"(?:doctor|dermatologist|gp|medical attention|treatment|appointment)s? (?:is |are )?(?:not |un)"
    r"(?:necessary|needed|required)",
    r"(?:no|without) (?:medical )?(?:treatment|attention) (?:is )?(?:needed|necessary|required)",
    r"(?:needn't|need not|doesn't need to|does not need to|no need (?:for it )?to) be "
    r"(?:seen|checked|examined|looked at|biopsied)",
)

_LEVEL_OF = {rule.name: rule.level for rule in RULES} | {"reassurance": "prompt"}

_FOLD = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060\ufeff]")
_DASHES = re.compile("[\u2010-\u2015\u2212]")


def _norm(text: str) -> str:
    """Text as the rules read it: compatibility forms, no invisible characters, plain quotes and dashes, casefold."""
    text = _INVISIBLE.sub("", unicodedata.normalize("NFKC", text))
    return _DASHES.sub("-", text.translate(_FOLD)).casefold()


# --- referral rules ---------------------------------------------------------------------------------------------

# A negation reaches at most 3 words back and never across a clause: "no pain, bleeding" still fires.
_CLAUSE_BREAK = re.compile(r"[.,;:!?()\n]|\b(?:but|and|or|although|though|however|yet|except|apart from)\b")
_NEGATORS = re.compile(r"no|not|without|never|none|nor|denies|denied|cannot|\w+n't|dont|doesnt|didnt|isnt|hasnt")
_HEDGES = ("stop", "sure", "certain", "know", "just", "only")  # "not stopped bleeding", "not sure it bleeds"
_WINDOW = 120  # characters before a match that can hold its 3-word negation


def _negated(text: str, start: int) -> bool:
    before = text[max(0, start - _WINDOW) : start]  # bounded, so hostile text with many matches stays linear
    words = re.findall(r"[\w']+", _CLAUSE_BREAK.split(before)[-1])[-3:]
    return not any(word.startswith(_HEDGES) for word in words) and any(map(_NEGATORS.fullmatch, words))


def _fires(rule: Rule, text: str) -> bool:
    return any(not (rule.negatable and _negated(text, m.start())) for m in rule.pattern.finditer(text))


def _rule_triggers(question: str, answer: str) -> set[str]:
    sides = {"question": _norm(question), "answer": _norm(answer)}
    return {rule.name for rule in RULES if any(_fires(rule, sides[side]) for side in rule.sides)}


def advice_lines(level: str) -> tuple[str, ...]:
    """The fixed advice for one level ("none" gives nothing)."""
    return (_ADVICE[level],) if level in _ADVICE else ()


def _highest(levels) -> str:
    return max(levels, key=LEVELS.index, default="none")


def _advice(triggers: set[str]) -> tuple[str, ...]:
    """Crisis signposting first, then the medical advice: someone in crisis may also need the referral."""
    levels = {_LEVEL_OF[name] for name in triggers}
    crisis = advice_lines("crisis") if "crisis" in levels else ()
    return (*crisis, *advice_lines(_highest(levels - {"crisis"})))


# --- reassurance filter -------------------------------------------------------------------------------------------

# Sentence ends: . ! ? ; followed by whitespace, or a newline. No reassurance pattern can span one, which is what
# lets the streaming Guard filter sentence by sentence and still agree with `review` on the whole text.
_BOUNDARY = re.compile(r"[.!?;](?=\s)|\n")
_LEAD = re.compile(r"\s*(?:[-*+>]\s+|#+\s+)?")  # kept when a sentence is replaced: indentation, list marker


def _clauses(text: str) -> Iterator[str]:
    start = 0
    for match in _BOUNDARY.finditer(text):
        yield text[start : match.end()]
        start = match.end()
    if start < len(text):
        yield text[start:]


# Output is plain text on every surface, but a client may render Markdown or HTML: an image there loads by itself,
# and its URL can carry the conversation out (reliability.md §1.5). Images go, links keep only their text, tags go.
_MD_IMAGE = re.compile(r"!\[([^\]\n]*)\]\([^)\n]*\)")
_MD_LINK = re.compile(r"\[([^\]\n]*)\]\([^)\n]*\)")
_TAG = re.compile(r"</?[A-Za-z][^>\n]{0,300}>")


def _defang(clause: str) -> str:
    return _TAG.sub("", _MD_LINK.sub(r"\1", _MD_IMAGE.sub("[image removed]", clause)))


def _replace(clause: str) -> tuple[str, int]:
    clause = _defang(clause)
    found = len(_REASSURANCE.findall(_norm(clause)))
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
    triggers = _rule_triggers(question, raw) | ({"reassurance"} if replaced else set())
    level = _highest(_LEVEL_OF[name] for name in triggers)
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

    Text is held back until a sentence boundary (. ! ? ; followed by whitespace, or a newline), so a phrase is never
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
        scanned = max(0, len(self._buffer) - 1)  # earlier text holds no boundary but held-back whitespace
        self._buffer += piece
        cut = max((m.end() for m in _BOUNDARY.finditer(self._buffer, scanned)), default=0)
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
