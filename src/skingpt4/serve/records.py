"""Opt-in consultation records (`--record`): one SQLite file per user, private, with retention and erasure.

Why SQLite in WAL mode with `synchronous=FULL`: `save` returns only after COMMIT, and with FULL the WAL is fsynced at
every commit, so an acknowledged record survives a killed process and a power cut; WAL also lets readers (the
`records` CLI) run while the web app writes. Rewriting a JSON file instead loses everything on a kill mid-write
(docs/reliability.md T-6). One writer connection per store, guarded by a lock, because the web app and the API save
from several threads; other processes wait on SQLite's own lock (busy timeout).

Privacy: the file is 0600 (its -wal/-shm files inherit that) in a 0700 folder when we create it; pixels are kept
only when the store is opened with `keep_images=True`; deletes overwrite freed pages (`secure_delete`) and
checkpoint the WAL so erased content does not linger on disk. Nothing here logs patient text, file names or pixels.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import sqlite3
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

from skingpt4.errors import InputError, first_line
from skingpt4.private_files import write_private
from skingpt4.sqlite_files import Kind, PrivateStore
from skingpt4.text import readable_values

SCHEMA_VERSION = 1  # PRAGMA user_version; a newer file is refused rather than misread
APPLICATION_ID = 0x536B4734  # PRAGMA application_id, "SkG4": marks the file as ours
SURFACES = ("chat", "web", "api", "diagnose")
ROLES = ("user", "assistant")
RECORD_KEYS = set("id created updated surface model_id model_sha256 images turns settings meta".split())
NEWEST_FIRST = "ORDER BY updated DESC, rowid DESC"  # rowid breaks ties between saves in the same microsecond
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")  # ids are printed and typed on the command line

SCHEMA = """
CREATE TABLE consultations (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    surface TEXT NOT NULL,
    model_id TEXT NOT NULL,
    model_sha256 TEXT NOT NULL,
    turns_json TEXT NOT NULL,
    settings_json TEXT NOT NULL,
    meta_json TEXT NOT NULL
);
CREATE INDEX consultations_updated ON consultations (updated);
CREATE TABLE images (
    consultation_id TEXT NOT NULL REFERENCES consultations (id) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    png BLOB,
    PRIMARY KEY (consultation_id, position)
);
"""

KIND = Kind(
    "records database",
    APPLICATION_ID,
    SCHEMA_VERSION,
    SCHEMA,
    ("synchronous = FULL", "foreign_keys = ON", "secure_delete = ON"),
)


def default_records_path() -> Path:
    """$SKINGPT4_RECORDS if set; else $SKINGPT4_HOME/records.sqlite if SKINGPT4_HOME is set; else
    $XDG_DATA_HOME/skingpt4/records.sqlite (XDG_DATA_HOME defaults to ~/.local/share)."""
    if explicit := os.environ.get("SKINGPT4_RECORDS"):
        return Path(explicit).expanduser()
    if home := os.environ.get("SKINGPT4_HOME"):
        return Path(home).expanduser() / "records.sqlite"
    data = os.environ.get("XDG_DATA_HOME", "")
    if not os.path.isabs(data):  # the XDG spec says to ignore a relative value
        data = str(Path.home() / ".local" / "share")
    return Path(data) / "skingpt4" / "records.sqlite"


def utc_now() -> str:
    """Now as UTC ISO-8601 with microseconds; one fixed format, so text order is time order."""
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class RecordStore(PrivateStore):
    """Consultation records in one SQLite file. Thread-safe; use as a context manager or call `close()`."""

    def __init__(self, path: str | Path | None = None, keep_images: bool = False):
        super().__init__(Path(path).expanduser() if path is not None else default_records_path(), KIND)
        self.keep_images = keep_images

    # -- writing ---------------------------------------------------------------------------------------------

    def save(self, record: dict) -> str:
        """Insert or replace one consultation in one transaction; returns its id once committed (durable)."""
        row, images = _to_row(readable_values(record), self.keep_images)  # text SQLite can store
        with self._transaction("BEGIN IMMEDIATE") as conn:
            old = conn.execute("SELECT created FROM consultations WHERE id = ?", (row["id"],)).fetchone()
            row["created"] = row["created"] or (old[0] if old else row["updated"])
            conn.execute(
                "INSERT INTO consultations VALUES (:id, :created, :updated, :surface, :model_id, :model_sha256,"
                " :turns_json, :settings_json, :meta_json) ON CONFLICT (id) DO UPDATE SET created = excluded.created,"
                " updated = excluded.updated, surface = excluded.surface, model_id = excluded.model_id,"
                " model_sha256 = excluded.model_sha256, turns_json = excluded.turns_json,"
                " settings_json = excluded.settings_json, meta_json = excluded.meta_json",
                row,
            )
            conn.execute("DELETE FROM images WHERE consultation_id = ?", (row["id"],))
            conn.executemany(
                "INSERT INTO images VALUES (?, ?, ?, ?)",
                [(row["id"], position, sha, png) for position, (sha, png) in enumerate(images)],
            )
        return row["id"]

    def delete(self, ids: list[str]) -> int:
        """Erase these consultations (unknown ids are ignored); returns how many were deleted."""
        return self._erase("DELETE FROM consultations WHERE id = ?", [(i,) for i in _id_list(ids)])

    def delete_all(self) -> int:
        return self._erase("DELETE FROM consultations", [()])

    def purge_older_than(self, days: float) -> int:
        """Retention: erase consultations not updated for `days` days; returns how many."""
        if not days >= 0:
            raise InputError(f"retention must be zero or more days, not {days}")
        try:
            cutoff = (datetime.now(timezone.utc) - timedelta(days=days)).isoformat(timespec="microseconds")
        except OverflowError:  # before year 1: nothing is that old
            return 0
        return self._erase("DELETE FROM consultations WHERE updated < ?", [(cutoff,)])

    def _erase(self, sql: str, params: list[tuple]) -> int:
        with self._transaction("BEGIN IMMEDIATE") as conn:
            count = sum(conn.execute(sql, p).rowcount for p in params)  # images go by ON DELETE CASCADE
        if count:
            with self._locked() as conn:
                # Old page images stay in the WAL until a checkpoint; TRUNCATE also empties the -wal file.
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return count

    # -- reading ---------------------------------------------------------------------------------------------

    def list(self) -> list[dict]:
        """Newest first (by last update): id, created, updated, surface, model_id, images and turns (counts)."""
        with self._transaction("BEGIN") as conn:
            rows = conn.execute(
                "SELECT id, created, updated, surface, model_id,"
                " (SELECT count(*) FROM images WHERE consultation_id = c.id), json_array_length(turns_json)"
                f" FROM consultations AS c {NEWEST_FIRST}"
            ).fetchall()
        keys = ("id", "created", "updated", "surface", "model_id", "images", "turns")
        return [dict(zip(keys, row)) for row in rows]

    def get(self, record_id: str) -> dict:
        """The full record as saved (png bytes or None); an unknown id is an InputError."""
        with self._transaction("BEGIN") as conn:
            return _read_record(conn, record_id)

    def export(self, out, ids: list[str] | None = None) -> int:
        """Write records as JSON Lines (png as base64 under "png_base64") to a path or a text stream; returns the
        count. A path is written 0600 through a temporary file and os.replace, so it is never seen half-written."""
        if not isinstance(out, (str, os.PathLike)):
            return self._export_to(out, ids)
        target = Path(out).expanduser()
        if target.is_dir():
            raise InputError(f"{target} is a directory; give a file name for the export")
        return write_private(target, lambda stream: self._export_to(stream, ids))

    def _export_to(self, stream, ids: list[str] | None) -> int:
        with self._transaction("BEGIN") as conn:  # one snapshot, even while another thread saves
            if ids is None:
                ids = [row[0] for row in conn.execute(f"SELECT id FROM consultations {NEWEST_FIRST}")]
            ids = _id_list(ids)
            for record_id in ids:  # an unknown id fails before the first line is written
                if conn.execute("SELECT 1 FROM consultations WHERE id = ?", (record_id,)).fetchone() is None:
                    raise InputError(f"no consultation record {record_id}")
            for record_id in ids:
                record = _read_record(conn, record_id)
                for image in record["images"]:
                    png = image.pop("png")
                    image["png_base64"] = base64.b64encode(png).decode("ascii") if png is not None else None
                stream.write(json.dumps(record, ensure_ascii=False) + "\n")
        return len(ids)


# ---------------------------------------------------------------------------------------------------------------
# Records <-> rows


def _to_row(record: dict, keep_images: bool) -> tuple[dict, list[tuple[str, bytes | None]]]:
    """Validate a record; return the consultations row and (sha256, png) per image. Pixels only if kept."""
    if not isinstance(record, dict):
        raise InputError("a consultation record must be a dict")
    if unknown := sorted(set(record) - RECORD_KEYS):
        raise InputError(f"unknown consultation record fields {unknown}; put extra data under 'meta'")
    record_id = record.get("id") or uuid.uuid4().hex
    if not isinstance(record_id, str) or not ID_PATTERN.fullmatch(record_id):
        raise InputError("a consultation id is 1-64 letters, digits, '-' or '_'")
    if record.get("surface") not in SURFACES:
        raise InputError(f"consultation surface must be one of {', '.join(SURFACES)}")
    for key in ("model_id", "model_sha256"):
        if not isinstance(record.get(key, ""), str):
            raise InputError(f"consultation {key} must be a string")
    row = {
        "id": record_id,
        "created": _timestamp(record.get("created")),
        "updated": utc_now(),  # time of this save, which is what retention counts from
        "surface": record["surface"],
        "model_id": record.get("model_id", ""),
        "model_sha256": record.get("model_sha256", ""),
        "turns_json": _json(_turns(record.get("turns", [])), "turns"),
        "settings_json": _json(_mapping(record.get("settings", {}), "settings"), "settings"),
        "meta_json": _json(_mapping(record.get("meta", {}), "meta"), "meta"),
    }
    return row, [_image(image, keep_images) for image in _sequence(record.get("images", []), "images")]


def _timestamp(value) -> str | None:
    """A caller-given creation time, normalised to our UTC format; None when absent."""
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise InputError("consultation 'created' must be an ISO-8601 time with a UTC offset")
    return moment.astimezone(timezone.utc).isoformat(timespec="microseconds")


def _turns(turns) -> list[dict]:
    for turn in _sequence(turns, "turns"):
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("text"), str):
            raise InputError("each consultation turn needs a role ('user' or 'assistant') and a text string")
    return turns


def _image(image, keep_images: bool) -> tuple[str, bytes | None]:
    png = image.get("png") if isinstance(image, dict) else None
    if not isinstance(image, dict) or not isinstance(png, (bytes, bytearray, type(None))):
        raise InputError("each consultation image is a dict with 'sha256' and optional 'png' bytes")
    sha = image.get("sha256") or (hashlib.sha256(png).hexdigest() if png is not None else None)
    if not isinstance(sha, str):
        raise InputError("each consultation image needs its 'sha256'")
    return sha, bytes(png) if keep_images and png is not None else None


def _id_list(ids) -> list[str]:
    """Guard against a lone id string, which would otherwise be taken as a list of one-letter ids."""
    if isinstance(ids, str) or not all(isinstance(i, str) for i in ids):
        raise InputError("consultation ids must be given as a list of strings")
    return list(ids)


def _sequence(value, name: str) -> list:
    if not isinstance(value, list):
        raise InputError(f"consultation {name} must be a list")
    return value


def _mapping(value, name: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"consultation {name} must be a dict")
    return value


def _json(value, name: str) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InputError(f"consultation {name} cannot be stored as JSON: {first_line(exc)}") from exc


def _read_record(conn: sqlite3.Connection, record_id: str) -> dict:
    row = conn.execute(
        "SELECT id, created, updated, surface, model_id, model_sha256, turns_json, settings_json, meta_json"
        " FROM consultations WHERE id = ?",
        (record_id,),
    ).fetchone()
    if row is None:
        raise InputError(f"no consultation record {record_id}")
    images = conn.execute(
        "SELECT sha256, png FROM images WHERE consultation_id = ? ORDER BY position", (record_id,)
    ).fetchall()
    return {
        **dict(zip(("id", "created", "updated", "surface", "model_id", "model_sha256"), row[:6])),
        "images": [{"sha256": sha, "png": png} for sha, png in images],
        "turns": json.loads(row[6]),
        "settings": json.loads(row[7]),
        "meta": json.loads(row[8]),
    }
