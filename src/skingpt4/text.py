"""Text from outside (request bodies, file names, manifests, CSV cells, form fields), made safe at the edge.

Python strings can hold what no file, terminal or JSON writer can encode: lone surrogates (U+D800-U+DFFF). They
arrive two ways: a file name that is not UTF-8 (Python keeps its bytes as surrogates, "surrogateescape"), and a
JSON `\\ud800` escape. The rule, applied where text enters:

* a request's own text with a lone surrogate is refused with one line (`check_text`): it is not text;
* a file name stays as it is for opening the file, and is shown and recorded as `readable(name)`: its bytes, the
  ones that are not UTF-8 written as `\\xff` (lossless: `os.fsencode` of the name gives the bytes back);
* any other value read from a file (a manifest field, a CSV cell) goes through `readable` too.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from skingpt4.errors import InputError

_SURROGATE = re.compile("[\ud800-\udfff]")


def has_surrogate(text: str) -> bool:
    return bool(_SURROGATE.search(text))


def readable(text: str) -> str:
    """`text` with every lone surrogate written out: a file name's undecodable bytes as `\\xNN`, any other
    surrogate as `\\udNNN`. Text without surrogates is returned as it is."""
    if not has_surrogate(text):
        return text
    try:
        return os.fsencode(text).decode("utf-8", "backslashreplace")  # a file name: its bytes, readably
    except UnicodeEncodeError:  # a surrogate that is no escaped byte (a JSON "\ud800")
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def readable_values(value):
    """`readable` applied to every string in a JSON-like value (keys included)."""
    if isinstance(value, str):
        return readable(value)
    if isinstance(value, dict):
        return {readable_values(k): readable_values(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable_values(v) for v in value]
    return value


def check_text(text: str, where: str) -> str:
    """`text`, or a one-line error naming `where` when it holds a lone surrogate."""
    if has_surrogate(text):
        raise InputError(f"{where} holds a lone surrogate (U+D800-U+DFFF), which is not text; send UTF-8 text")
    return text


def user_path(name: str) -> Path:
    """A path as a person or a file wrote it, `~` expanded where it names a home; a name such as `~x/a.png` whose
    `~x` is no user on this machine is taken literally (pathlib would raise)."""
    try:
        return Path(name).expanduser()
    except RuntimeError:
        return Path(name)
