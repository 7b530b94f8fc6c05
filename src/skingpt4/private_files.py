"""Write a file whole or not at all, readable by its owner only: a temporary 0600 file, fsynced, then os.replace.

Exports, manifests and summaries can hold clinical text; nobody should ever see one half-written or world-readable.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from skingpt4.errors import InputError, first_line


def write_private(target: Path, write: Callable, binary: bool = False):
    """Call `write(file)` on a temporary file beside `target` (0600, as mkstemp makes it), then put it in place.
    Returns what `write` returned; on any failure the target is left as it was."""
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    except OSError as exc:
        raise InputError(f"cannot write {target}: {first_line(exc)}") from exc
    try:
        with os.fdopen(fd, "wb" if binary else "w", **({} if binary else {"encoding": "utf-8", "newline": ""})) as f:
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return result
