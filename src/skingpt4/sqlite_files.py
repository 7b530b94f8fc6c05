"""Private SQLite files for the consultation records and the review ratings: opened one way, checked one way,
used one way (`PrivateStore`: one connection behind a lock, transactions that have committed before they return).

A file is created 0600 (its folders 0700) before SQLite touches it, and a wider mode on an existing file and its
-wal/-shm companions is tightened. A file that is not ours (another application's database, a newer schema, not
SQLite at all) is refused with one line before anything is written to it. Then WAL mode with `synchronous=FULL`:
a committed transaction survives a killed process and a power cut.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from skingpt4.errors import InputError, first_line

SQLITE_MAGIC = b"SQLite format 3\x00"
BUSY_TIMEOUT_S = 30.0  # another process (the CLI) may hold the write lock briefly


@dataclass(frozen=True)
class Kind:
    """What a file holds: its name in messages, its application id and schema version, how to create it."""

    what: str  # "records database", "review store"
    application_id: int  # PRAGMA application_id: marks the file as ours, and as this kind
    version: int  # PRAGMA user_version; a newer file is refused rather than misread
    schema: str  # CREATE statements separated by ";"
    pragmas: tuple[str, ...] = ("synchronous = FULL",)


class PrivateStore:
    """One private SQLite file of `kind`. Thread-safe; use as a context manager or call `close()`."""

    def __init__(self, path: Path, kind: Kind):
        self.path, self.kind = path, kind
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = open_private(path, kind)

    def integrity(self) -> str:
        """PRAGMA integrity_check: "ok", or its findings joined by "; "."""
        with self._locked() as conn:
            return "; ".join(row[0] for row in conn.execute("PRAGMA integrity_check"))

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()  # the last connection checkpoints and removes the -wal file
                self._conn = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._conn is None:
                raise InputError(f"{self.kind.what} {self.path} is closed")
            yield self._conn

    @contextmanager
    def _transaction(self, begin: str = "BEGIN IMMEDIATE") -> Iterator[sqlite3.Connection]:
        """BEGIN ... COMMIT under the lock; COMMIT has returned (and, with FULL, fsynced) before we leave."""
        with self._locked() as conn:
            conn.execute(begin)
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself on some errors (disk full)
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


def open_private(path: Path, kind: Kind) -> sqlite3.Connection:
    """Validate or create the file and return a configured connection (autocommit; callers open transactions)."""
    if path.is_dir():
        raise InputError(f"{path} is a directory, not a skingpt4 {kind.what}")
    _make_private_dir(path.parent)
    _prepare_file(path, kind)
    try:
        conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise InputError(f"cannot open {kind.what} {path}: {first_line(exc)}") from exc
    try:
        _check_schema(conn, path, kind)  # before any write: a foreign database must not be switched to WAL
        if conn.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
            raise InputError(f"{path}: SQLite cannot use WAL mode there (a network file system?)")
        for pragma in kind.pragmas:
            conn.execute(f"PRAGMA {pragma}")
        _create_schema(conn, path, kind)
    except BaseException as exc:
        conn.close()
        if isinstance(exc, sqlite3.OperationalError):
            raise InputError(f"cannot open {kind.what} {path}: {first_line(exc)}") from exc
        if isinstance(exc, sqlite3.DatabaseError):
            raise InputError(f"{path} is not a skingpt4 {kind.what}") from exc
        raise
    return conn


def _make_private_dir(folder: Path) -> None:
    """Create missing folders 0700 (as XDG asks for data folders); existing ones are left as they are."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder")
    for created in reversed(missing):
        try:
            created.mkdir(mode=0o700)
            os.chmod(created, 0o700)  # mkdir's mode passes through the umask
        except FileExistsError:  # another process made it
            pass
        except OSError as exc:
            raise InputError(f"cannot create {created}: {first_line(exc)}") from exc


def _prepare_file(path: Path, kind: Kind) -> None:
    """Create the file 0600 before SQLite does (no moment with a wider mode); check an existing one's header."""
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise InputError(f"cannot create {kind.what} {path}: {first_line(exc)}") from exc
    try:
        with open(path, "rb") as f:
            header = f.read(len(SQLITE_MAGIC))
        # An existing file readable by others (copied in, older umask) is tightened to 0600, and so are its
        # -wal/-shm companions, which SQLite creates with the main file's mode.
        for member in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            if member.exists() and member.stat().st_mode & 0o177:
                os.chmod(member, 0o600)
    except OSError as exc:
        raise InputError(f"cannot open {kind.what} {path}: {first_line(exc)}") from exc
    if header and header != SQLITE_MAGIC:  # an empty file is a new database
        raise InputError(f"{path} is not a skingpt4 {kind.what}")


def _check_schema(conn: sqlite3.Connection, path: Path, kind: Kind) -> int:
    """Our schema version (0: an empty file, ready to create); InputError for a foreign or newer database."""
    app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    empty = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0
    if (app_id, version) == (0, 0) and empty:
        return 0
    if app_id != kind.application_id or version < 1:
        raise InputError(f"{path} is not a skingpt4 {kind.what}")
    if version > kind.version:
        raise InputError(f"{path} is a {kind.what} of a newer version ({version}); upgrade skingpt4")
    return version


def _create_schema(conn: sqlite3.Connection, path: Path, kind: Kind) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        if _check_schema(conn, path, kind) == 0:  # again under the write lock: another process may have made it
            for statement in kind.schema.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id = {kind.application_id}")
            conn.execute(f"PRAGMA user_version = {kind.version}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
