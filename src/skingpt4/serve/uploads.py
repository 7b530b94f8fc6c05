"""The web app's uploads: Gradio's cache made a private folder of ours, each upload read once and deleted, and a
sweeper for what no event handler will delete (docs/reliability.md §1.4)."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

from skingpt4.errors import InputError

SUMMARY_NAME = "consultation-summary.html"


def private_cache(parent: str | None = None) -> Path:
    """A fresh 0700 directory for Gradio's uploads and outputs, made Gradio's cache (`GRADIO_TEMP_DIR`).

    Set before any component is built: components note the cache directory when created, the server when launched.
    """
    path = Path(tempfile.mkdtemp(prefix="skingpt4-web-", dir=parent)).resolve()  # mkdtemp makes it 0700
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    return path


def take_upload(path: str, root: Path) -> bytes:
    """Read an upload from Gradio's cache and delete it (and its now-empty folder) at once, whatever it holds."""
    file = Path(path)
    if not file.resolve().is_relative_to(root):  # Gradio checks this too; deleting makes it worth checking twice
        raise InputError("the upload was not found; please add the photo again")
    try:
        return file.read_bytes()  # Gradio's max_file_size already bounded it
    except OSError:
        raise InputError("the upload was not found; please add the photo again") from None
    finally:
        file.unlink(missing_ok=True)
        if file.parent != root:
            try:
                file.parent.rmdir()  # Gradio's per-upload folder, named by the bytes' hash
            except OSError:
                pass  # not empty: another upload with the same bytes is still there


def sweep(root: Path, upload_ttl: float, summary_ttl: float, now: float | None = None) -> int:
    """Delete what no handler will delete: uploads whose event never ran (the queue was full, Restart cancelled it,
    the tab closed while it waited) and summaries of sessions Gradio forgot without telling us. Returns the count."""
    now = time.time() if now is None else now
    removed = 0
    for path in list(root.rglob("*")):
        ttl = summary_ttl if path.name == SUMMARY_NAME else upload_ttl
        try:
            if path.is_file() and now - path.stat().st_mtime > ttl:
                path.unlink()
                removed += 1
                if path.parent != root and not any(path.parent.iterdir()):
                    path.parent.rmdir()
        except OSError:  # deleted meanwhile by its handler
            pass
    return removed


class Sweeper:
    """Runs `sweep` every `every` seconds in a daemon thread until `stop()`."""

    def __init__(self, root: Path, every: float, upload_ttl: float, summary_ttl: float):
        self.root, self.every, self.ttls, self.stopped = root, every, (upload_ttl, summary_ttl), threading.Event()
        threading.Thread(target=self._run, daemon=True, name="skingpt4-web-sweeper").start()

    def _run(self) -> None:
        while not self.stopped.wait(self.every):
            sweep(self.root, *self.ttls)

    def stop(self) -> None:
        self.stopped.set()
