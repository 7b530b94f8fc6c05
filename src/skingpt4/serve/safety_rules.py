"""The rule table of the safety rails: referral rules, the reassurance pattern, and how text is read.

Each rule is a named regular expression with a level (`prompt`, `urgent`, `crisis`), the side it reads (the
user's questions, the model's answer, or both), and whether a short negation ("no bleeding") switches it off.
`safety.py` applies them; this file is the table a clinician would review.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass


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
REASSURANCE = _rx(
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

LEVEL_OF = {rule.name: rule.level for rule in RULES} | {"reassurance": "prompt"}

_FOLD = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "\u00b4": "'", "`": "'"})
_INVISIBLE = re.compile("[\u00ad\u200b-\u200f\u2060\ufeff]")
_DASHES = re.compile("[\u2010-\u2015\u2212]")


def norm(text: str) -> str:
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


def rule_triggers(question: str, answer: str) -> set[str]:
    sides = {"question": norm(question), "answer": norm(answer)}
    return {rule.name for rule in RULES if any(_fires(rule, sides[side]) for side in rule.sides)}
