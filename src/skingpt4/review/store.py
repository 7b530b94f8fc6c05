"""The clinician questionnaire (the paper's seven Likert statements) and the SQLite file that keeps the ratings.

The statements are the seven items of the NC paper's clinical evaluation (docs/reference.md §6), each rated on the
paper's 5-point scale. One row per rater x case: rating a case again replaces the earlier answers (upsert), so a
rater can correct themselves and the summary never counts anyone twice.

Durability and privacy follow `records.py`: WAL with `synchronous=FULL` (a saved rating survives a killed process
or a power cut, and `review summary` can read while the page writes), a 0600 file created before SQLite touches
it, 0700 folders when we create them, `PRAGMA user_version` / `application_id` so a foreign or newer file is
refused rather than misread. One connection guarded by a lock, because the web server saves from several threads.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from skingpt4.errors import InputError
from skingpt4.sqlite_files import Kind, PrivateStore


@dataclass(frozen=True)
class Statement:
    key: str  # column name and form field
    label: str  # the item as docs/reference.md §6 / Fig. 4a names it
    text: str  # the sentence the rater agrees or disagrees with
    paper_share: float  # share agreeing in the paper's Fig. 4a, for comparison only


# The paper's seven items (NC paper, Methods; docs/reference.md §6), in its order, each as a statement to rate.
STATEMENTS = (
    Statement(
        "diagnosis", "Diagnosis correct or relevant", "The diagnosis by SkinGPT-4 is correct or relevant.", 0.8063
    ),
    Statement("informative", "Description informative", "The description by SkinGPT-4 is informative.", 0.8250),
    Statement("useful", "Suggestions useful", "The suggestions by SkinGPT-4 are useful.", 0.8563),
    Statement("helps_doctors", "Can help doctors", "SkinGPT-4 can help doctors with diagnosis.", 0.8750),
    Statement(
        "helps_patients",
        "Can help patients understand",
        "SkinGPT-4 can help patients understand their disease.",
        0.8370,
    ),
    Statement(
        "privacy",
        "Local deployment protects privacy",
        "If deployed locally, SkinGPT-4 protects patients' privacy.",
        0.9250,
    ),
    Statement("willingness", "Willingness to use", "I am willing to use SkinGPT-4.", 0.7750),
)
STATEMENT_KEYS = tuple(s.key for s in STATEMENTS)
# The paper's 5-point scale, most to least agreeing; the keys are what the database and the CSV hold.
ANSWERS = ("strongly_agree", "agree", "neutral", "disagree", "strongly_disagree")
ANSWER_LABELS = {a: a.replace("_", " ") for a in ANSWERS}
AGREEING = ("strongly_agree", "agree")  # Fig. 4a's "% agreeing"
MAX_COMMENT = 4000
MAX_RATER = 64

SCHEMA_VERSION = 1
APPLICATION_ID = 0x536B4752  # "SkGR": a review store, not a records store (0x536B4734)
_CHECKS = " AND ".join(f"{k} IN ({', '.join(repr(a) for a in ANSWERS)})" for k in STATEMENT_KEYS)
SCHEMA = f"""
CREATE TABLE ratings (
    rater TEXT NOT NULL,
    case_id TEXT NOT NULL,
    image_sha256 TEXT NOT NULL,
    {", ".join(f"{k} TEXT NOT NULL" for k in STATEMENT_KEYS)},
    comment TEXT NOT NULL,
    updated TEXT NOT NULL,
    PRIMARY KEY (rater, case_id),
    CHECK ({_CHECKS})
)
"""

KIND = Kind("review store", APPLICATION_ID, SCHEMA_VERSION, SCHEMA)
COLUMNS = ("rater", "case_id", "image_sha256", *STATEMENT_KEYS, "comment", "updated")


def clean_rater(value: object) -> str:
    """A rater's name as it counts: spaces collapsed and case folded ("Bob ", "BOB" and "bob" are one rater);
    1-64 characters, no control or invisible formatting characters."""
    value = value if isinstance(value, str) else ""
    name = " ".join(value.split()).casefold()
    if not 1 <= len(name) <= MAX_RATER or any(unicodedata.category(c).startswith("C") for c in value):
        raise InputError(f"a rater name is 1-{MAX_RATER} characters, without control characters")
    return name


@dataclass(frozen=True)
class Rating:
    """One rater's answers for one case: statement key -> answer key, all seven."""

    rater: str
    case: str
    answers: dict[str, str]
    comment: str = ""
    image_sha256: str = ""  # what the rater saw; a transcript regenerated later may point at another file
    updated: str = field(default="", compare=False)

    def checked(self) -> Rating:
        """This rating with a clean rater name, or InputError naming the first problem."""
        if not isinstance(self.case, str) or not self.case:
            raise InputError("a rating needs a case id")
        missing = [s.key for s in STATEMENTS if s.key not in self.answers]
        if missing:
            raise InputError(f"a rating needs all seven statements; missing: {', '.join(missing)}")
        if unknown := sorted(set(self.answers) - set(STATEMENT_KEYS)):
            raise InputError(f"unknown statements {unknown}")
        if bad := [k for k, a in self.answers.items() if a not in ANSWERS]:
            raise InputError(f"answers must be one of {', '.join(ANSWERS)} (statement {bad[0]})")
        if not isinstance(self.comment, str) or len(self.comment) > MAX_COMMENT:
            raise InputError(f"a comment is text of at most {MAX_COMMENT} characters")
        return Rating(clean_rater(self.rater), self.case, dict(self.answers), self.comment, self.image_sha256)


class ReviewStore(PrivateStore):
    """Ratings in one SQLite file. Thread-safe; use as a context manager or call `close()`.

    `create=False` opens an existing store only (the summary must not leave an empty file behind a typo)."""

    def __init__(self, path: str | Path, *, create: bool = True):
        path = Path(path).expanduser()
        if not create and not path.is_file():
            raise InputError(f"no review store at {path}")
        super().__init__(path, KIND)

    def save(self, rating: Rating) -> Rating:
        """Insert or replace (rater, case) in one transaction; returns the rating as stored, once committed."""
        rating = rating.checked()
        stamp = datetime.now(timezone.utc).isoformat(timespec="microseconds")
        row = (rating.rater, rating.case, rating.image_sha256, *(rating.answers[k] for k in STATEMENT_KEYS))
        updates = ", ".join(f"{c} = excluded.{c}" for c in COLUMNS[2:])
        with self._transaction() as conn:
            conn.execute(
                f"INSERT INTO ratings ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"
                f" ON CONFLICT (rater, case_id) DO UPDATE SET {updates}",
                (*row, rating.comment, stamp),
            )
        return Rating(rating.rater, rating.case, rating.answers, rating.comment, rating.image_sha256, stamp)

    def get(self, rater: str, case: str) -> Rating | None:
        rows = self._select("WHERE rater = ? AND case_id = ?", (clean_rater(rater), case))
        return rows[0] if rows else None

    def rated_cases(self, rater: str) -> set[str]:
        with self._locked() as conn:
            rows = conn.execute("SELECT case_id FROM ratings WHERE rater = ?", (clean_rater(rater),))
            return {row[0] for row in rows}

    def ratings(self) -> list[Rating]:
        """Every rating, by case then rater (a stable order for the CSV)."""
        return self._select("ORDER BY case_id, rater", ())

    def _select(self, where: str, params: tuple) -> list[Rating]:
        with self._locked() as conn:
            rows = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM ratings {where}", params).fetchall()
        return [_rating(row) for row in rows]


def _rating(row: tuple) -> Rating:
    n = len(STATEMENT_KEYS)
    answers = dict(zip(STATEMENT_KEYS, row[3 : 3 + n]))
    return Rating(row[0], row[1], answers, row[3 + n], row[2], row[4 + n])


# -- opening -----------------------------------------------------------------------------------------------------
