"""The web app's uploads: Gradio's cache made a private folder of ours, each upload read once and deleted, and a
sweeper for what no event handler will delete (docs/reliability.md §1.4).

Gradio stores an upload at `<cache>/<hash of its bytes>/<name>`, so the same photo uploaded from two tabs at once
is one file that both events name. The first event to run reads it and deletes it; the bytes it read are kept in
memory, by that path, for `ttl` seconds, so the second event gets the same bytes instead of "not found". Nothing
of an upload stays on disk once an event has taken it.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path

from skingpt4.errors import InputError

NOT_FOUND = "the upload was not found; please add the photo again"
RECENT = 8  # uploads kept in memory for a twin event; each is at most the upload cap (10 MB)


def private_cache(parent: str | None = None) -> Path:
    """A fresh 0700 directory for Gradio's uploads and outputs, made Gradio's cache (`GRADIO_TEMP_DIR`).

    Set before any component is built: components note the cache directory when created, the server when launched.
    """
    path = Path(tempfile.mkdtemp(prefix="skingpt4-web-", dir=parent)).resolve()  # mkdtemp makes it 0700
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    return path


class Uploads:
    """Takes uploads out of the cache folder `root`: read once, deleted at once, shared by twin events."""

    def __init__(self, root: Path, ttl: float):
        self.root, self.ttl = root, ttl
        self._lock = threading.Lock()
        self._recent: OrderedDict[str, tuple[float, bytes]] = OrderedDict()  # path -> (when taken, bytes)

    def take(self, path: str) -> bytes:
        """The upload's bytes; the file (and its now-empty folder) is gone when this returns."""
        file = Path(path)
        if not file.resolve().is_relative_to(self.root):  # Gradio checks this too; deleting makes it worth twice
            raise InputError(NOT_FOUND)
        key = str(file.resolve())
        with self._lock:
            try:
                data = file.read_bytes()  # Gradio's max_file_size already bounded it
            except OSError:
                if key in self._recent:  # a twin event took it first: the same bytes (same hash, same name)
                    return self._recent[key][1]
                raise InputError(NOT_FOUND) from None
            finally:
                _remove(file, self.root)
            self._recent[key] = (time.monotonic(), data)
            self._recent.move_to_end(key)
            while len(self._recent) > RECENT:
                self._recent.popitem(last=False)
            return data

    def forget_old(self, now: float | None = None) -> None:
        """Drop the in-memory copies older than `ttl` (the sweeper calls this)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for key in [k for k, (when, _) in self._recent.items() if now - when > self.ttl]:
                del self._recent[key]


def _remove(file: Path, root: Path) -> None:
    file.unlink(missing_ok=True)
    if file.parent != root:
        try:
            file.parent.rmdir()  # Gradio's per-upload folder, named by the bytes' hash
        except OSError:
            pass  # not empty: an upload with the same bytes and another name is still there


def sweep(root: Path, ttl: float, now: float | None = None) -> int:
    """Delete uploads no handler will take (the queue was full, Restart cancelled the event, the tab closed while it
    waited), `ttl` seconds after they arrived. Returns how many."""
    now = time.time() if now is None else now
    removed = 0
    for path in list(root.rglob("*")):
        try:
            if path.is_file() and now - path.stat().st_mtime > ttl:
                _remove(path, root)
                removed += 1
        except OSError:  # deleted meanwhile by its handler
            pass
    return removed


def release_freed_memory() -> None:
    """Hand memory freed by finished consultations back to the system (glibc keeps it in its heap otherwise, so a
    morning of large photos would leave the process at its peak). A no-op where there is no glibc."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class Sweeper:
    """Every `every` seconds, in a daemon thread until `stop()`: untaken uploads go, old in-memory copies too."""

    def __init__(self, uploads: Uploads, every: float):
        self.uploads, self.every, self.stopped = uploads, every, threading.Event()
        threading.Thread(target=self._run, daemon=True, name="skingpt4-web-sweeper").start()

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            sweep(self.uploads.root, self.uploads.ttl)
            self.uploads.forget_old()
            release_freed_memory()

    def stop(self) -> None:
        self.stopped.set()
