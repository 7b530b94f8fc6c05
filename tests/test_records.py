"""Consultation records: round trips, upserts, privacy (no pixels unless asked, 0600/0700), retention, export,
threads, bad files, and durability under SIGKILL (docs/reliability.md T-6: no acknowledged record may be lost)."""

from __future__ import annotations

import base64
import inspect
import io
import json
import random
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

import skingpt4.serve.records as records
from skingpt4.errors import InputError
from skingpt4.serve.records import RecordStore, default_records_path

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def fake_png(seed: int) -> bytes:
    """PNG-signed noise: the store never decodes images, and the signature is what the raw-file scan looks for."""
    return PNG_SIGNATURE + random.Random(seed).randbytes(200)


def make_record(**fields) -> dict:
    record = {
        "surface": "web",
        "model_id": "tiny",
        "model_sha256": "ab" * 32,
        "images": [{"sha256": "11" * 32, "png": fake_png(1)}],
        "turns": [
            {"role": "user", "text": "Is this mole a concern? ✓"},
            {"role": "assistant", "text": "See a dermatologist.", "triggers": ["referral"]},
        ],
        "settings": {"max_new_tokens": 16, "temperature": 0.7},
    }
    return record | fields


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_bytes(folder: Path) -> bytes:
    """Everything SQLite left on disk: the database and any -wal/-shm files."""
    return b"".join(p.read_bytes() for p in sorted(folder.glob("records.sqlite*")))


@pytest.fixture
def db(tmp_path) -> Path:
    return tmp_path / "records.sqlite"


@pytest.fixture
def store(db):
    with RecordStore(db, keep_images=True) as opened:
        yield opened


# ---------------------------------------------------------------------------------------------------------------
# Saving and reading


def test_round_trip(store):
    sent = make_record(meta={"session": "s1"})
    record_id = store.save(sent)
    got = store.get(record_id)
    assert len(record_id) == 32 and int(record_id, 16) >= 0  # uuid4 hex when no id was given
    assert {k: got[k] for k in sent} == sent  # png bytes, extra turn keys and meta come back as saved
    assert got["id"] == record_id and got["created"] == got["updated"]
    assert datetime.fromisoformat(got["created"]).utcoffset() == timedelta(0)


def test_upsert_replaces_turns_and_images(store, db, monkeypatch):
    first = store.save(make_record(id="c1", images=[{"sha256": "a" * 64, "png": fake_png(2)}] * 3))
    before = store.get(first)
    monkeypatch.setattr(records, "utc_now", lambda: "2999-01-01T00:00:00.000000+00:00")
    turns = before["turns"] + [{"role": "user", "text": "And now?"}]
    assert store.save(make_record(id="c1", turns=turns, images=[{"png": fake_png(3)}])) == "c1"
    after = store.get("c1")
    assert after["turns"] == turns
    assert after["images"] == [{"sha256": records.hashlib.sha256(fake_png(3)).hexdigest(), "png": fake_png(3)}]
    assert after["created"] == before["created"] and after["updated"] > before["updated"]
    assert [row["id"] for row in store.list()] == ["c1"]
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT count(*) FROM images").fetchone()[0] == 1


def test_caller_given_created_is_normalised_to_utc(store):
    store.save(make_record(id="old", created="2026-03-01T10:00:00+02:00"))
    assert store.get("old")["created"] == "2026-03-01T08:00:00.000000+00:00"


@pytest.mark.parametrize("keep", [False, True])
def test_pixels_only_when_kept(tmp_path, keep):
    with RecordStore(tmp_path / "records.sqlite", keep_images=keep) as store:
        record_id = store.save(make_record(images=[{"sha256": "c" * 64, "png": fake_png(4)}]))
        store.save(make_record())
        assert store.get(record_id)["images"] == [{"sha256": "c" * 64, "png": fake_png(4) if keep else None}]
        assert (b"\x89PNG" in raw_bytes(tmp_path)) is keep  # while open: database + WAL
    assert (b"\x89PNG" in raw_bytes(tmp_path)) is keep  # after close: checkpointed into the database


def test_list_newest_first_with_counts(store):
    store.save(make_record(id="a", turns=[]))
    store.save(make_record(id="b", images=[]))
    store.save(make_record(id="c", images=[{"sha256": "d" * 64}] * 2))
    store.save(make_record(id="a", turns=[{"role": "user", "text": "back again"}]))  # a is now the newest
    listed = store.list()
    assert [row["id"] for row in listed] == ["a", "c", "b"]
    assert [(row["images"], row["turns"]) for row in listed] == [(1, 1), (2, 2), (0, 2)]
    assert set(listed[0]) == {"id", "created", "updated", "surface", "model_id", "images", "turns"}


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"surface": "fax"}, "surface"),
        ({"turns": [{"role": "system", "text": "x"}]}, "role"),
        ({"turns": "hello"}, "turns must be a list"),
        ({"images": [{"png": "not bytes"}]}, "image"),
        ({"images": [{}]}, "sha256"),
        ({"settings": {"x": float("nan")}}, "JSON"),
        ({"patient_name": "x"}, "meta"),
        ({"id": "../../etc"}, "id"),
        ({"created": "yesterday"}, "created"),
    ],
)
def test_invalid_records_are_refused(store, fields, message):
    with pytest.raises(InputError, match=message):
        store.save(make_record(**fields))
    assert store.list() == []


def test_unknown_id_and_closed_store(db):
    store = RecordStore(db)
    with pytest.raises(InputError, match="no consultation record nope"):
        store.get("nope")
    store.close()
    store.close()  # twice is fine
    with pytest.raises(InputError, match="closed"):
        store.list()


# ---------------------------------------------------------------------------------------------------------------
# Erasure, retention, export


def test_delete_and_delete_all(store, db):
    for name in "abcd":
        store.save(make_record(id=name))
    assert store.delete(["a", "nope", "b"]) == 2
    assert [row["id"] for row in store.list()] == ["d", "c"]
    with pytest.raises(InputError):
        store.get("a")
    assert store.delete([]) == 0
    with pytest.raises(InputError, match="list"):
        store.delete("c")  # not the ids "c" one letter at a time
    assert store.delete_all() == 2 and store.list() == []
    assert store.delete_all() == 0
    with closing(sqlite3.connect(db)) as raw:  # images went with their consultations; the erased pixels left the WAL
        assert raw.execute("SELECT count(*) FROM images").fetchone()[0] == 0
    assert b"\x89PNG" not in raw_bytes(db.parent)


def test_purge_older_than(store, monkeypatch):
    long_ago = (datetime.now(timezone.utc) - timedelta(days=40)).isoformat(timespec="microseconds")
    monkeypatch.setattr(records, "utc_now", lambda: long_ago)
    store.save(make_record(id="old"))
    monkeypatch.undo()
    store.save(make_record(id="new"))
    assert store.purge_older_than(30) == 1
    assert [row["id"] for row in store.list()] == ["new"]
    assert store.purge_older_than(30) == 0
    assert store.purge_older_than(0) == 1
    assert store.purge_older_than(float("inf")) == 0
    with pytest.raises(InputError, match="retention"):
        store.purge_older_than(-1)


def test_export_jsonl(store, tmp_path):
    store.save(make_record(id="one", meta={"k": 1}))
    store.save(make_record(id="two", images=[{"sha256": "e" * 64}]))
    out = tmp_path / "export.jsonl"
    assert store.export(out) == 2
    assert mode(out) == 0o600
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [line["id"] for line in lines] == ["two", "one"]
    assert lines[1]["images"] == [{"sha256": "11" * 32, "png_base64": base64.b64encode(fake_png(1)).decode()}]
    assert lines[0]["images"] == [{"sha256": "e" * 64, "png_base64": None}]
    assert lines[1]["turns"] == make_record()["turns"] and lines[1]["meta"] == {"k": 1}

    stream = io.StringIO()
    assert store.export(stream, ids=["one"]) == 1
    assert json.loads(stream.getvalue())["id"] == "one"
    stream = io.StringIO()
    with pytest.raises(InputError, match="no consultation record nope"):
        store.export(stream, ids=["one", "nope"])
    assert stream.getvalue() == ""  # nothing half-written
    with pytest.raises(InputError, match="directory"):
        store.export(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "export.jsonl",
        "records.sqlite",
        "records.sqlite-shm",
        "records.sqlite-wal",
    ]


# ---------------------------------------------------------------------------------------------------------------
# The file itself


def test_private_file_wal_and_full_sync(tmp_path):
    path = tmp_path / "made" / "by us" / "records.sqlite"
    with RecordStore(path) as store:
        store.save(make_record())
        assert store._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL, on the writer connection
        assert mode(path) == 0o600 and mode(Path(f"{path}-wal")) == 0o600
        assert mode(path.parent) == mode(path.parent.parent) == 0o700
    with sqlite3.connect(path) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    path.chmod(0o644)
    RecordStore(path).close()
    assert mode(path) == 0o600  # tightened on open


def test_concurrent_saves_from_threads(store):
    def writer(thread: int) -> list[str]:
        return [store.save(make_record(id=f"t{thread}-{n}", settings={"n": n})) for n in range(25)]

    with ThreadPoolExecutor(8) as pool:
        saved = [rid for ids in pool.map(writer, range(8)) for rid in ids]
    assert len(saved) == len(set(saved)) == 200
    assert {row["id"] for row in store.list()} == set(saved)
    assert store.get("t7-24")["settings"] == {"n": 24}
    assert store.integrity() == "ok"


def _foreign_sqlite(path: Path) -> None:
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE notes (text TEXT)")
    raw.close()


def _newer_records(path: Path) -> None:
    RecordStore(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA user_version = 99")
    raw.close()


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p.mkdir(), "is a directory"),
        (lambda p: p.write_text("hello, not a database\n"), "not a skingpt4 records database"),
        (lambda p: p.write_bytes(random.Random(0).randbytes(4096)), "not a skingpt4 records database"),
        (lambda p: p.write_bytes(b"SQLite format 3\x00" + bytes(4096)), "not a skingpt4 records database"),
        (_foreign_sqlite, "not a skingpt4 records database"),
        (_newer_records, "newer version"),
    ],
    ids=["directory", "text", "random-bytes", "sqlite-header-garbage", "other-sqlite-db", "newer-schema"],
)
def test_bad_files_are_refused_in_one_line(tmp_path, make, message):
    path = tmp_path / "records.sqlite"
    make(path)
    with pytest.raises(InputError, match=message) as caught:
        RecordStore(path)
    assert str(path) in str(caught.value) and "\n" not in str(caught.value)
    if make is _foreign_sqlite:  # refused before anything was written: not switched to WAL
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
        raw.close()


def test_default_records_path(monkeypatch, tmp_path):
    for name in ("SKINGPT4_RECORDS", "SKINGPT4_HOME", "XDG_DATA_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_records_path() == tmp_path / ".local" / "share" / "skingpt4" / "records.sqlite"
    monkeypatch.setenv("XDG_DATA_HOME", "relative/ignored")
    assert default_records_path() == tmp_path / ".local" / "share" / "skingpt4" / "records.sqlite"
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert default_records_path() == tmp_path / "xdg" / "skingpt4" / "records.sqlite"
    monkeypatch.setenv("SKINGPT4_HOME", str(tmp_path / "home"))
    assert default_records_path() == tmp_path / "home" / "records.sqlite"
    monkeypatch.setenv("SKINGPT4_RECORDS", str(tmp_path / "explicit.sqlite"))
    assert default_records_path() == tmp_path / "explicit.sqlite"
    with RecordStore() as store:
        assert store.path == tmp_path / "explicit.sqlite" and store.keep_images is False


# ---------------------------------------------------------------------------------------------------------------
# Durability (T-6): SIGKILL a writer at random moments; every acknowledged save must survive


KILLS = 24

WRITER = """
import sys

from skingpt4.serve.records import RecordStore

store = RecordStore(sys.argv[1])
for n in range(10**9):
    record_id = f"{sys.argv[2]}-{n}"
    for version in (1, 2):  # an insert, then an upsert of the same consultation
        store.save(record_for(record_id, version))
        print(record_id, version, flush=True)  # the acknowledgement: only after save returned
"""


def record_for(record_id: str, version: int) -> dict:
    """The content a writer saves, derived from the id so the survivor check can rebuild it."""
    return {
        "id": record_id,
        "surface": "api",
        "model_id": "tiny",
        "model_sha256": "f" * 64,
        "images": [{"sha256": record_id.ljust(64, "0")[:64], "png": None}],
        "turns": [
            {"role": ("user", "assistant")[n % 2], "text": f"{record_id} turn {n} " * 8} for n in range(2 * version)
        ],
        "settings": {"version": version},
        "meta": {},
    }


def kill_writer_once(script: Path, db: Path, prefix: str, delay: float, err: Path) -> tuple[list[str], bool]:
    """Start a writer, let it write for `delay` s after its first acknowledgement, SIGKILL it; its ack lines."""
    with err.open("w") as stderr:
        proc = subprocess.Popen(
            [sys.executable, str(script), str(db), prefix], stdout=subprocess.PIPE, stderr=stderr, text=True
        )
    try:
        first = proc.stdout.readline()
        assert first, f"writer failed to start: {err.read_text()[-2000:]}"
        time.sleep(delay)
        killed_mid_write = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()
    lines = (first + rest).splitlines(keepends=True)
    return [line for line in lines if line.endswith("\n")], killed_mid_write  # a cut-off line was never acked


def test_sigkill_loses_no_acknowledged_record(tmp_path):
    script, db = tmp_path / "writer.py", tmp_path / "records.sqlite"
    script.write_text(inspect.getsource(record_for) + WRITER)
    rng = random.Random(20260601)
    acked: dict[str, int] = {}  # record id -> highest acknowledged version
    kills = acks = 0
    for round_no in range(KILLS):
        lines, killed = kill_writer_once(script, db, f"k{round_no}", rng.uniform(0.05, 0.4), tmp_path / "err.txt")
        kills += killed
        acks += len(lines)
        for line in lines:
            record_id, version = line.split()
            acked[record_id] = max(acked.get(record_id, 0), int(version))
        with RecordStore(db) as store:
            assert store.integrity() == "ok", f"round {round_no}"
    with RecordStore(db) as store:
        lost = [rid for rid, version in acked.items() if not survived(store, rid, version)]
        integrity = store.integrity()
    summary = (
        f"T-6 durability: kills={kills} acknowledged={acks} records={len(acked)} lost={len(lost)}"
        f" integrity={integrity}"
    )
    print(f"\n{summary}")
    assert kills >= 20 and not lost and integrity == "ok", summary


def survived(store: RecordStore, record_id: str, version: int) -> bool:
    """Present with full content, at the acknowledged version or a later one committed just before the kill."""
    try:
        got = store.get(record_id)
    except InputError:
        return False
    saved = got["settings"]["version"]
    del got["created"], got["updated"]
    return saved >= version and got == record_for(record_id, saved)
