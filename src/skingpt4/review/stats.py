"""`skingpt4 review summary`: agreement shares with Wilson intervals (the paper's Fig. 4a), Fleiss' kappa, CSV, plot.

Agreement is the share of "agree" + "strongly agree" among all ratings of a statement, as Fig. 4a reports it. The
interval is Wilson's score interval (95%): unlike the normal approximation it stays inside [0, 1] and keeps its
coverage near 0% and 100%, where these shares tend to sit.

Fleiss' kappa (Fleiss 1971) needs the same number of raters on every case. When raters covered different cases we
use the cases rated by the most common number of raters among those rated by two or more (the larger number on a
tie), and report how many cases that was; kappa is computed per statement over the five answers. Where every
counted rating falls in one answer, chance agreement is 1 and kappa is undefined: reported as None, not as 0 or 1.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from collections import Counter
from pathlib import Path

from skingpt4.errors import InputError, first_line
from skingpt4.private_files import write_private
from skingpt4.review.store import AGREEING, ANSWER_LABELS, ANSWERS, STATEMENTS, Rating, ReviewStore, clean_rater

Z95 = 1.959963984540054  # the 97.5th percentile of the standard normal
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # cells a spreadsheet would run as a formula


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0.0, 1.0) when there are no trials."""
    if not 0 <= successes <= n:
        raise ValueError("successes must be between 0 and n")
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def fleiss_kappa(table: list[list[int]]) -> float | None:
    """Fleiss' kappa from a subjects x categories table of counts, every row summing to the same n >= 2.

    None when chance agreement is 1 (all ratings in one category): kappa is 0/0 there."""
    if not table:
        raise ValueError("Fleiss' kappa needs at least one subject")
    n = sum(table[0])
    if n < 2 or any(sum(row) != n for row in table):
        raise ValueError("Fleiss' kappa needs the same number (>= 2) of ratings for every subject")
    subjects, total = len(table), len(table) * n
    p_j = [sum(row[j] for row in table) / total for j in range(len(table[0]))]
    p_bar = sum((sum(c * c for c in row) - n) / (n * (n - 1)) for row in table) / subjects
    p_e = sum(p * p for p in p_j)
    if math.isclose(p_e, 1.0):
        return None
    return (p_bar - p_e) / (1 - p_e)


# -- the summary -------------------------------------------------------------------------------------------------


def summary(store: Path, out: Path | None = None, key: Path | None = None) -> dict:
    """Summarise a review store; with `out` (a folder) also write ratings.csv, summary.json and agreement.png;
    with `key` (the blinding key of `eval` with several models) also each model's own summary."""
    with ReviewStore(store, create=False) as opened:
        ratings = one_per_rater(opened.ratings())
    if not ratings:
        raise InputError(f"{store} holds no ratings yet; rate some cases with `skingpt4 review` first")
    result = summarise(ratings)
    if key is not None:
        result["by_model"] = by_model(ratings, read_key(key))
    if out is not None:
        folder = _output_folder(Path(out).expanduser())
        write_private(folder / "ratings.csv", lambda f: write_csv(ratings, f))
        write_private(folder / "summary.json", lambda f: f.write(json.dumps(result, indent=2) + "\n"))
        plot(result, folder / "agreement.png")
        result["files"] = [str(folder / name) for name in ("ratings.csv", "summary.json", "agreement.png")]
    return result


def read_key(path: Path) -> dict[str, str]:
    """Blinded case id -> model, from `blinding-key.json`."""
    try:
        return {case: entry["model"] for case, entry in json.loads(path.read_text(encoding="utf-8")).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise InputError(f"{path}: not a blinding key from `skingpt4 eval` ({first_line(exc)})") from None


def by_model(ratings: list[Rating], key: dict[str, str]) -> dict[str, dict]:
    """Each model's summary over the ratings of its own cases (cases the key does not name are left out)."""
    if not any(r.case in key for r in ratings):
        raise InputError("the blinding key names none of the rated cases: is it the key of these transcripts?")
    models = sorted({key[r.case] for r in ratings if r.case in key})
    return {model: summarise([r for r in ratings if key.get(r.case) == model]) for model in models}


def one_per_rater(ratings: list[Rating]) -> list[Rating]:
    """Names as they count now (a store written before names were normalised may hold "BOB" and "bob"); where one
    rater rated a case twice under such names, the later rating stands. Order kept."""
    latest: dict[tuple[str, str], Rating] = {}
    for rating in ratings:
        key = (clean_rater(rating.rater), rating.case)
        if key not in latest or (rating.updated or "") >= (latest[key].updated or ""):
            latest[key] = dataclasses.replace(rating, rater=key[0])
    return [r for r in latest.values()]


def summarise(ratings: list[Rating]) -> dict:
    """The numbers behind `summary`, from ratings in memory (JSON-serialisable)."""
    by_case: dict[str, list[Rating]] = {}
    for rating in ratings:
        by_case.setdefault(rating.case, []).append(rating)
    kappa_cases, kappa_info = _kappa_cases(by_case)
    statements = []
    for s in STATEMENTS:
        counts = Counter(r.answers[s.key] for r in ratings)
        agree = sum(counts[a] for a in AGREEING)
        low, high = wilson(agree, len(ratings))
        table = [[Counter(r.answers[s.key] for r in group)[a] for a in ANSWERS] for group in kappa_cases]
        statements.append(
            {
                "key": s.key,
                "label": s.label,
                "text": s.text,
                "n": len(ratings),
                "agree": agree,
                "share": agree / len(ratings),
                "wilson_low": low,
                "wilson_high": high,
                "counts": {a: counts[a] for a in ANSWERS},
                "kappa": fleiss_kappa(table) if table else None,
                "paper_share": s.paper_share,
            }
        )
    raters = {r.rater for r in ratings}
    return {
        "ratings": len(ratings),
        "raters": len(raters),
        "cases": len(by_case),
        "statements": statements,
        **kappa_info,
    }


def _kappa_cases(by_case: dict[str, list[Rating]]) -> tuple[list[list[Rating]], dict]:
    """The cases Fleiss' kappa can use: those with the modal number of raters among cases with two or more."""
    sizes = Counter(len(group) for group in by_case.values() if len(group) >= 2)
    modal = max(sizes, key=lambda size: (sizes[size], size)) if sizes else None
    used = [group for group in by_case.values() if len(group) == modal]
    info = {"kappa_raters_per_case": modal, "kappa_cases": len(used), "kappa_cases_total": len(by_case)}
    return used, info


# -- text table --------------------------------------------------------------------------------------------------


def format_summary(result: dict) -> str:
    """A plain-text table for the terminal: one line per statement, then how kappa was computed."""
    head = f"{result['ratings']} rating(s) by {result['raters']} rater(s) on {result['cases']} case(s)"
    width = max(len(s["label"]) for s in result["statements"])
    answers = "  ".join(f"{_initials(a):>3}" for a in ANSWERS)
    lines = [
        head,
        "",
        f"{'statement':<{width}}  {'agree':>9} {'share':>6}  {'95% CI (Wilson)':<16}  {answers}   kappa  paper",
    ]
    for s in result["statements"]:
        counts = "  ".join(f"{s['counts'][a]:>3}" for a in ANSWERS)
        kappa = f"{'-':>6}" if s["kappa"] is None else f"{s['kappa']:>6.3f}"
        agree = f"{s['agree']}/{s['n']}"
        lines.append(
            f"{s['label']:<{width}}  {agree:>9} {s['share']:>6.1%}  "
            f"[{s['wilson_low']:>6.1%}, {s['wilson_high']:>6.1%}]  {counts}  {kappa}  {s['paper_share']:.2%}"
        )
    lines += ["", _kappa_note(result), "agree = strongly agree + agree; paper = Fig. 4a (150 cases, 5 raters)"]
    for model, own in result.get("by_model", {}).items():
        lines += ["", f"model {model}:", *format_summary(own).splitlines()[:-2]]
    return "\n".join(lines)


def _initials(answer: str) -> str:
    return "".join(word[0].upper() for word in answer.split("_"))


def _kappa_note(result: dict) -> str:
    if not result["kappa_cases"]:
        return "Fleiss' kappa: not computed (no case was rated by two or more raters)"
    return (
        f"Fleiss' kappa: {result['kappa_cases']} of {result['kappa_cases_total']} cases, those rated by "
        f"{result['kappa_raters_per_case']} raters (the most common number of 2+); '-' = undefined (one answer only)"
    )


# -- files -------------------------------------------------------------------------------------------------------


def write_csv(ratings: list[Rating], stream) -> None:
    """One row per rating; answers as words. Free text that a spreadsheet would run as a formula gets a quote."""
    writer = csv.writer(stream)
    writer.writerow(["rater", "case", "image_sha256", *(s.key for s in STATEMENTS), "comment", "updated"])
    for r in ratings:
        answers = [ANSWER_LABELS[r.answers[s.key]] for s in STATEMENTS]
        writer.writerow([_cell(r.rater), _cell(r.case), r.image_sha256, *answers, _cell(r.comment), r.updated])


def _cell(text: str) -> str:
    return "'" + text if text.startswith(FORMULA_START) else text


def plot(result: dict, path: Path) -> None:
    """Horizontal bars of the agreeing share per statement with Wilson intervals, the paper's value marked."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display; must precede pyplot
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("the review plot needs matplotlib: pip install 'skingpt4[eval]'") from exc
    rows = result["statements"][::-1]  # first statement on top
    shares = [100 * s["share"] for s in rows]
    errors = [
        [100 * (s["share"] - s["wilson_low"]) for s in rows],
        [100 * (s["wilson_high"] - s["share"]) for s in rows],
    ]
    fig, ax = plt.subplots(figsize=(8, 4.6), dpi=100)
    try:
        ys = range(len(rows))
        ax.barh(ys, shares, xerr=errors, color="#9db4d6", capsize=4, label="agree + strongly agree, 95% Wilson CI")
        paper = [100 * s["paper_share"] for s in rows]
        ax.scatter(paper, ys, marker="D", color="#dd8452", zorder=3, label="paper, Fig. 4a")
        ax.set_yticks(list(ys), [s["label"] for s in rows])
        ax.set_xlim(0, 100)
        ax.set_xlabel("% of ratings agreeing")
        ax.set_title(f"Clinician review: {result['ratings']} rating(s) by {result['raters']} rater(s)")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
        fig.tight_layout()
        write_private(path, lambda f: fig.savefig(f, format="png"), binary=True)
    finally:
        plt.close(fig)


def _output_folder(folder: Path) -> Path:
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot create {folder}: {first_line(exc)}") from exc
    return folder
