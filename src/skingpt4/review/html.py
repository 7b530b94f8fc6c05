"""The review page's HTML: escaped text, no outside assets, forms that post back to the same origin."""

from __future__ import annotations

import html
from dataclasses import dataclass

from skingpt4.review.cases import ROLES, Case
from skingpt4.review.store import ANSWER_LABELS, ANSWERS, MAX_COMMENT, MAX_RATER, STATEMENTS

STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 70rem; padding: 0 1rem 3rem; color: #222; }
header, nav { display: flex; gap: 1rem; align-items: center; flex-wrap: wrap; padding: .6rem 0; }
header { border-bottom: 1px solid #ccc; } header form { margin-left: auto; }
.case { display: grid; grid-template-columns: minmax(0, 1fr) minmax(0, 1.3fr); gap: 1.5rem; }
img { max-width: 100%; height: auto; border: 1px solid #ccc; }
.turn { margin: 0 0 .8rem; } .turn h3 { margin: 0; font-size: .85rem; color: #555; }
.turn p, #reference p { white-space: pre-wrap; margin: .2rem 0; }
.assistant p { background: #f3f6fa; padding: .4rem .6rem; border-radius: 4px; }
#reference { border-left: 4px solid #7a9; padding-left: .8rem; }
.warn, .error { color: #a00; font-weight: 600; }
table { border-collapse: collapse; margin: 1rem 0; width: 100%; }
th, td { padding: .35rem .5rem; border-bottom: 1px solid #ddd; text-align: center; }
th[scope=row] { text-align: left; font-weight: normal; } tr.missing th { color: #a00; font-weight: 600; }
textarea { width: 100%; min-height: 5rem; } button { font-size: 1rem; padding: .4rem 1rem; }
"""


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


def page(title: str, body: str, header: str = "") -> str:
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>{esc(title)}</title><link rel='stylesheet' href='/style.css'></head>"
        f"<body><header><strong>SkinGPT-4 clinician review</strong>{header}</header>{body}</body></html>"
    )


def rater_page(token: str, name: str = "", message: str = "") -> str:
    error = f"<p class='error' id='message' role='alert'>{esc(message)}</p>" if message else ""
    return page(
        "Who is rating?",
        f"<h1>Who is rating?</h1>{error}<form method='post' action='/rater'>{_token(token)}"
        f"<label for='rater-name'>Your name or rater token (1-{MAX_RATER} characters)</label><br>"
        f"<input id='rater-name' name='name' maxlength='{MAX_RATER}' value='{esc(name)}' required autofocus> "
        "<button id='start' type='submit'>Start rating</button></form>",
    )


def _token(token: str) -> str:
    return f"<input type='hidden' name='token' value='{esc(token)}'>"


def rater_header(rater: str, done: int, total: int, token: str) -> str:
    return (
        f"<span id='progress'>{done} of {total} done</span><span>Rater: <b id='rater'>{esc(rater)}</b></span>"
        f"<form method='post' action='/signout'>{_token(token)}<button id='signout'>Change rater</button></form>"
    )


UNTRAINED = "UNTRAINED random model: these answers are noise, written to try the software, not to be rated as care."


@dataclass
class Entered:
    """What the form shows: the saved rating, or what was just entered (kept when the server refuses it)."""

    answers: dict[str, str]
    comment: str = ""
    message: str = ""
    missing: tuple[str, ...] = ()
    saved: str = ""  # when this rater last saved this case


def case_body(number: int, case: Case, reason: str, entered: Entered, total: int, token: str) -> str:
    nav = (
        (f"<a id='previous' href='/case/{number - 1}'>&larr; Previous</a>" if number > 1 else "")
        + (f"<a id='next' href='/case/{number + 1}'>Next &rarr;</a>" if number < total else "")
        + f"<a id='next-unrated' href='/next/{number}'>Next unrated</a>"
    )
    if reason:
        figure = f"<p class='warn' id='image-unavailable'>image unavailable: {esc(reason)}</p>"
    else:
        figure = f"<img id='case-image' src='/image/{number}' alt='case {number} image'>"
    turns = "".join(
        f"<div class='turn {role}'><h3>{ROLES[role]}</h3><p>{esc(text)}</p></div>" for role, text in case.turns
    )
    reference = (
        f"<section id='reference'><h2>Your reference answer</h2><p>{esc(case.reference)}</p></section>"
        if case.reference is not None
        else ""
    )
    label = f"<details><summary>Dataset label</summary><p id='label'>{esc(case.label)}</p></details>"
    untrained = f"<p class='warn' id='untrained'>{UNTRAINED}</p>" if case.untrained else ""
    return (
        f"<nav>{nav}</nav>{untrained}<h1>Case {number} of {total}: <span id='case-id'>{esc(case.id)}</span></h1>"
        f"<div class='case'><div>{figure}{label if case.label else ''}</div>"
        f"<div><section id='transcript'>{turns}</section>{reference}</div></div>"
        f"{rating_form(number, entered, token)}"
    )


def rating_form(number: int, entered: Entered, token: str) -> str:
    heads = "".join(f"<th scope='col'>{esc(ANSWER_LABELS[a])}</th>" for a in ANSWERS)
    rows = []
    for i, s in enumerate(STATEMENTS, 1):
        cells = "".join(
            f"<td><input type='radio' name='{s.key}' value='{a}' id='{s.key}-{a}'"
            f" aria-label='{esc(ANSWER_LABELS[a])}: {esc(s.text)}'"
            f"{' checked' if entered.answers.get(s.key) == a else ''}></td>"
            for a in ANSWERS
        )
        missing = " class='missing'" if s.key in entered.missing else ""
        rows.append(f"<tr{missing}><th scope='row'>{i}. {esc(s.text)}</th>{cells}</tr>")
    message = f"<p class='error' id='message' role='alert'>{esc(entered.message)}</p>" if entered.message else ""
    saved = (
        f"<p id='saved'>You rated this case ({esc(entered.saved)} UTC); saving replaces it.</p>"
        if entered.saved
        else ""
    )
    return (
        f"<form method='post' action='/case/{number}' id='rating'>{_token(token)}<h2>Your rating</h2>{saved}{message}"
        f"<table><thead><tr><th scope='col'>Statement</th>{heads}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        f"<label for='comment'>Comment (optional)</label><br><textarea id='comment' name='comment'"
        f" maxlength='{MAX_COMMENT}'>{esc(entered.comment)}</textarea><br>"
        "<button type='submit' id='save'>Save rating</button></form>"
    )


def read_rating(form: dict[str, list[str]]) -> Entered:
    """The answers and comment from a posted form; `message` says (in one line) what is wrong, if anything."""
    answers, problems = {}, []
    for i, s in enumerate(STATEMENTS, 1):
        values = form.get(s.key, [])
        if len(values) > 1 or (values and values[0] not in ANSWERS):
            problems.append(f"statement {i} needs exactly one of the five answers")
        elif values:
            answers[s.key] = values[0]
    comments = form.get("comment", [""])
    comment = comments[0].replace("\r\n", "\n").strip() if len(comments) == 1 else ""
    if len(comments) > 1 or len(comment) > MAX_COMMENT:
        problems.append(f"the comment must be one text of at most {MAX_COMMENT} characters")
    missing = tuple(s.key for s in STATEMENTS if s.key not in answers)
    if missing and not problems:
        numbers = ", ".join(str(i) for i, s in enumerate(STATEMENTS, 1) if s.key in missing)
        problems.append(f"Please answer all seven statements; missing: {numbers}.")
    message = problems[0][:1].upper() + problems[0][1:] if problems else ""
    return Entered(answers, comment, message, missing)


# -- the app -----------------------------------------------------------------------------------------------------
