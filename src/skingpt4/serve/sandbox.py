"""Decode untrusted images in a child process (docs/reliability.md §0 item 1, §1.1).

Pillow's decoders are the attack surface, and Gradio pins ``pillow<13``, so decoding happens in a persistent
child process that runs :func:`skingpt4.inputs.images.load_image` under limits:

* a wall-clock timeout per image (``conn.poll``); on expiry the child is killed and a fresh one started next call;
* ``RLIMIT_AS``: the child's address space may grow by at most ``memory_mb`` beyond its start-up size (the size
  of the interpreter, NumPy and Pillow varies between machines, so a fixed total would be fragile);
* ``RLIMIT_CPU`` per image as a backstop, and ``RLIMIT_CORE`` 0. Where :mod:`resource` is missing (Windows)
  the rlimits are skipped and only the wall-clock timeout applies.

The child is a plain ``python -c`` subprocess talking over a socket pair (not ``multiprocessing``: its ``spawn``
re-imports the parent's main script, so any script without an ``if __name__ == "__main__":`` guard would break,
and ``fork`` is unsafe in a process with torch threads). It needs only :mod:`skingpt4.inputs.images` (NumPy and Pillow,
not torch). Where there are no socket pairs to hand down (Windows), images are decoded in this process instead,
with the same limits but without the child's isolation.

The child sends back only raw RGB bytes with a small fixed header, never a pickle, so a compromised child cannot
run code in the parent through the reply; the parent checks the reply's size against the limits before trusting it.

A `Decoder` is one child, one image at a time. Servers decode through a `DecoderPool` (`load_image_isolated`): up
to `POOL_SIZE` children (bounded by the cores), so photos sent at once decode in parallel, and a photo that hangs or
crashes its child stalls only its own request, up to the timeout.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import traceback
import weakref
from dataclasses import asdict
from multiprocessing.connection import Connection

from PIL import Image

from skingpt4.inputs import images
from skingpt4.inputs.images import DEFAULT_LIMITS, ImageLimits, ImageRejected

__all__ = ["Decoder", "DecoderPool", "load_image_isolated"]

_STARTUP_TIMEOUT = 60.0  # first import of NumPy/Pillow on a cold disk can be slow; not counted in `timeout`
_TOO_SLOW = "image took too long to decode"
_UNSAFE = "image could not be decoded safely"
_HEADER = struct.Struct(">2sII")  # b"ok", width, height; a rejection is b"no" + UTF-8 message


def _child(fd: int, limits: str, timeout: str, memory_mb: str) -> None:
    """Entry point of the child process (see `_start`): arguments come as strings from its command line."""
    conn = Connection(int(fd))
    _child_main(conn, ImageLimits(**json.loads(limits)), float(timeout), int(memory_mb))


def _child_main(conn, limits: ImageLimits, timeout: float, memory_mb: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl+C reaches the whole process group; the parent decides
    try:
        import resource
    except ImportError:  # Windows: no rlimits, the parent's wall-clock timeout still applies
        resource = None
    if resource is not None:
        start = _address_space()
        if start is not None:  # Linux; macOS does not enforce RLIMIT_AS, so it is not set there
            _set_soft(resource, resource.RLIMIT_AS, start + memory_mb * 2**20)
        _set_soft(resource, resource.RLIMIT_CORE, 0)
    conn.send_bytes(b"ready")
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError, MemoryError):  # the parent went away, or the pipe is out of step: stop
            return
        if resource is not None:  # RLIMIT_CPU counts the whole life of the process, so move it on per image
            usage = resource.getrusage(resource.RUSAGE_SELF)
            _set_soft(resource, resource.RLIMIT_CPU, math.ceil(usage.ru_utime + usage.ru_stime + 2 * timeout) + 1)
        try:
            img = images.load_image(data, limits)
            raw = img.tobytes()
            conn.send_bytes(_HEADER.pack(b"ok", *img.size))
            conn.send_bytes(raw)
        except ImageRejected as exc:
            conn.send_bytes(b"no" + str(exc).encode())
        except MemoryError:
            conn.send_bytes(b"no" + b"image needs too much memory to decode")
        except Exception:  # a bug in load_image: log it here, tell the parent only that the image was refused
            traceback.print_exc()
            conn.send_bytes(b"no" + _UNSAFE.encode())


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


def _set_soft(resource, which: int, soft: int) -> None:
    """Set the soft limit (an unprivileged process may move it anywhere up to the hard limit)."""
    try:
        _, hard = resource.getrlimit(which)
        resource.setrlimit(which, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    except (OSError, ValueError):  # a platform that refuses this limit: the wall-clock timeout still applies
        pass


class _Broken(Exception):
    """The child must be killed; ``str(exc)`` is the rejection message for the caller."""


def _stop(slot: dict) -> None:
    """Kill and reap the child in ``slot`` (also the finaliser, so it must not reference the Decoder)."""
    process, conn = slot.pop("process", None), slot.pop("conn", None)
    if conn is not None:
        conn.close()
    if process is not None:
        process.kill()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            pass


def _start(limits: ImageLimits, timeout: float, memory_mb: int) -> tuple[subprocess.Popen, Connection]:
    """A fresh child: `python -c` running `_child` on its end of a socket pair, stdin closed, stderr shared."""
    ours, theirs = socket.socketpair()
    code = "import sys; from skingpt4.serve.sandbox import _child; _child(*sys.argv[1:])"
    args = [str(theirs.fileno()), json.dumps(asdict(limits)), str(timeout), str(memory_mb)]
    try:
        process = subprocess.Popen(
            [sys.executable, "-c", code, *args],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
        )
    finally:
        theirs.close()
    return process, Connection(ours.detach())


class Decoder:
    """A persistent child process that runs images.load_image under limits; thread-safe (one request at a time)."""

    def __init__(self, limits: ImageLimits = DEFAULT_LIMITS, timeout: float = 5.0, memory_mb: int = 2048):
        self.limits, self.timeout, self.memory_mb = limits, timeout, memory_mb
        self._lock = threading.Lock()
        self._slot: dict = {}  # "process", "conn": shared with the finaliser, which also runs at interpreter exit
        self._closed = False
        self._finalizer = weakref.finalize(self, _stop, self._slot)

    @property
    def pid(self) -> int | None:
        """The current child's process id: None before the first image and after a kill (a new child comes next)."""
        process = self._slot.get("process")
        return process.pid if process is not None else None

    def load(self, data: bytes) -> Image.Image:
        """Decode ``data`` in the child: an RGB image without metadata, or :class:`ImageRejected` (one line)."""
        data = images.read_source(data, self.limits.max_bytes)  # size cap and emptiness checked before any IPC
        with self._lock:
            if self._closed:
                raise RuntimeError("Decoder is closed")
            try:
                try:
                    self._connection().send_bytes(data)
                except OSError:  # the child died while idle (e.g. killed from outside): not this image's fault
                    _stop(self._slot)
                    self._connection().send_bytes(data)
                return self._receive(time.monotonic() + self.timeout)
            except (_Broken, EOFError, OSError, struct.error) as exc:  # EOF: the child died on this image
                _stop(self._slot)
                raise ImageRejected(str(exc) if isinstance(exc, _Broken) else _UNSAFE) from None

    def _connection(self):
        process = self._slot.get("process")
        if process is not None and process.poll() is not None:
            _stop(self._slot)
        if "conn" not in self._slot:
            process, parent = _start(self.limits, self.timeout, self.memory_mb)
            self._slot.update(process=process, conn=parent)
            try:
                ready = parent.poll(_STARTUP_TIMEOUT) and parent.recv_bytes(16) == b"ready"
            except (EOFError, OSError):
                ready = False
            if not ready:
                _stop(self._slot)
                raise RuntimeError("the image decoder process did not start")
        return self._slot["conn"]

    def _receive(self, deadline: float) -> Image.Image:
        conn = self._slot["conn"]
        if not conn.poll(max(deadline - time.monotonic(), 0)):
            raise _Broken(_TOO_SLOW)
        head = conn.recv_bytes(1024)
        if head[:2] == b"no":
            message = " ".join(head[2:].decode("utf-8", "replace").split())[:200]
            raise ImageRejected(message or _UNSAFE)
        tag, width, height = _HEADER.unpack(head)
        limits = self.limits
        if tag != b"ok" or not 0 < width * height <= limits.max_pixels or max(width, height) > limits.max_side:
            raise _Broken(_UNSAFE)  # the reply itself is out of bounds: do not trust this child
        if not conn.poll(max(deadline - time.monotonic(), 1.0)):  # the pixels follow the header at once
            raise _Broken(_TOO_SLOW)
        raw = conn.recv_bytes(width * height * 3)
        if len(raw) != width * height * 3:
            raise _Broken(_UNSAFE)
        return Image.frombytes("RGB", (width, height), raw)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._finalizer()

    def __enter__(self) -> Decoder:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


POOL_SIZE = max(1, min(4, os.cpu_count() or 1))  # decoder children at most: one per core, four at most


class DecoderPool:
    """Up to `size` decoders, each one child decoding one image at a time; thread-safe. A request takes the most
    recently used idle decoder (so a second child starts only when two photos arrive at once) and waits only when
    all are busy."""

    def __init__(self, size: int = POOL_SIZE, limits: ImageLimits = DEFAULT_LIMITS, timeout: float = 5.0, **kw):
        self.decoders = [Decoder(limits, timeout, **kw) for _ in range(size)]
        self.idle: queue.LifoQueue[Decoder] = queue.LifoQueue()
        for decoder in reversed(self.decoders):
            self.idle.put(decoder)

    @property
    def pids(self) -> list[int]:
        """The running children's process ids."""
        return [d.pid for d in self.decoders if d.pid is not None]

    def load(self, data: bytes) -> Image.Image:
        """`Decoder.load` on an idle decoder."""
        decoder = self.idle.get()
        try:
            return decoder.load(data)
        finally:
            self.idle.put(decoder)

    def close(self) -> None:
        for decoder in self.decoders:
            decoder.close()

    def __enter__(self) -> DecoderPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_shared: DecoderPool | None = None
_shared_lock = threading.Lock()


def load_image_isolated(data: bytes) -> Image.Image:
    """:func:`skingpt4.inputs.images.load_image` with the default limits, in a shared pool of child processes started
    on first use."""
    global _shared
    if not hasattr(socket, "AF_UNIX"):  # Windows: no socket pair to hand down; same limits, in this process
        return images.load_image(data)
    with _shared_lock:
        if _shared is None:
            _shared = DecoderPool()
    return _shared.load(data)
