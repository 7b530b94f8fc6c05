"""skingpt4.serve.sandbox.Decoder: same result as load_image, in a child that can time out, run out of memory or be
killed without taking the caller down, and that never outlives its parent.

No assertion depends on the machine's speed: waits are hang guards of 60 s that end as soon as the awaited thing
happens, and a timeout under test is made to fire by a child that cannot answer (stopped), not by a slow decode.
"""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from malformed import encode, noise, png_zero, quadrants
from PIL import Image

from skingpt4.inputs.images import ImageRejected, load_image
from skingpt4.serve.sandbox import Decoder, load_image_isolated

posix_only = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")
SMALL = encode(noise((64, 48), seed=3), "PNG")
HANG_GUARD_S = 60.0  # catches a hang, never slowness: waits end as soon as what they wait for has happened


@pytest.fixture(scope="module")
def big() -> bytes:
    """A legal 39.7 Mpx all-zero PNG of 5 KiB (1-bit), near the 40 Mpx cap: ~0.4 s and ~400 MiB to decode."""
    return png_zero(6300, 6300)


@pytest.fixture(scope="module")
def decoder():
    with Decoder() as dec:
        yield dec


class Background:
    """`work(*args)` in a daemon thread. `result()` waits at most HANG_GUARD_S: a hang fails the test, and a hung call
    cannot keep the session from ending (a ThreadPoolExecutor would wait for it on exit)."""

    def __init__(self, work, *args):
        self._box: dict = {}

        def target():
            try:
                self._box["value"] = work(*args)
            except BaseException as exc:  # re-raised in the test's thread by result()
                self._box["error"] = exc

        self._thread = threading.Thread(target=target, daemon=True)
        self._thread.start()

    def result(self, on_hang=None):
        """The call's result or exception; after HANG_GUARD_S, `on_hang()` (to unblock the call, so that cleanup
        such as `Decoder.close` cannot wait for it forever) and a test failure."""
        self._thread.join(HANG_GUARD_S)
        if self._thread.is_alive():
            if on_hang is not None:
                on_hang()
            pytest.fail(f"hang: no result after {HANG_GUARD_S:.0f} s")
        if "error" in self._box:
            raise self._box["error"]
        return self._box["value"]


def wait_gone(pid: int, timeout: float = HANG_GUARD_S) -> bool:
    """True once every thread of ``pid`` has exited (it may stay a zombie until reaped), without reaping it.

    A killed multi-threaded process (NumPy's BLAS threads) shows its main thread as a zombie while the others are
    still exiting; only then does its pipe close and ``waitpid`` see it, so all threads must be gone."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state in ("Z", "X") and len(os.listdir(f"/proc/{pid}/task")) <= 1:
                return True
        except FileNotFoundError:
            return True
        except OSError:  # no /proc: fall back to signal 0
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return True
        time.sleep(0.02)
    return False


def test_same_pixels_as_load_image(decoder, big):
    images = [
        SMALL,
        encode(noise((40, 30), seed=4), "JPEG", quality=90),
        encode(Image.new("RGBA", (20, 20), (255, 0, 0, 0)), "WEBP", lossless=True),
        encode(Image.new("I;16", (16, 16), 30000), "TIFF"),
        encode(quadrants(), "JPEG", exif=_orientation(6)),
        big,
    ]
    for data in images:
        got, want = decoder.load(data), load_image(data)
        assert got.mode == "RGB" and got.info == {} and got.size == want.size
        assert np.array_equal(np.asarray(got), np.asarray(want))


def _orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.mark.parametrize("data", [b"<html></html>", b"", encode(Image.new("RGB", (1, 1)), "PNG"), SMALL[:300]])
def test_same_rejection_message_as_load_image(decoder, data):
    with pytest.raises(ImageRejected) as in_process:
        load_image(data)
    with pytest.raises(ImageRejected) as isolated:
        decoder.load(data)
    assert str(isolated.value) == str(in_process.value)


def test_child_is_persistent(decoder):
    decoder.load(SMALL)
    pid = decoder.pid
    pids = set()
    for _ in range(20):
        decoder.load(SMALL)
        pids.add(decoder.pid)
    assert pid is not None and pids == {pid}  # no process start per image: the same child answered every one


def test_timeout_kills_the_child_and_the_next_call_works(big):
    with Decoder(timeout=0.001) as dec:
        with pytest.raises(ImageRejected, match="^image took too long to decode$"):
            dec.load(big)
        assert dec.pid is None  # killed, not left running
        dec.timeout = HANG_GUARD_S
        assert np.array_equal(np.asarray(dec.load(SMALL)), np.asarray(load_image(SMALL)))


@posix_only
def test_stuck_child_times_out_deterministically():
    with Decoder(timeout=HANG_GUARD_S) as dec:  # generous while the child is healthy: slowness is not under test
        dec.load(SMALL)
        pid = dec.pid
        os.kill(pid, signal.SIGSTOP)  # the child can neither decode nor answer
        dec.timeout = 0.3
        stuck = Background(dec.load, SMALL)  # the timeout must fire: a load that never returns fails at the guard
        with pytest.raises(ImageRejected, match="^image took too long to decode$"):
            stuck.result(on_hang=lambda: os.kill(pid, signal.SIGKILL))  # no timeout fired: the child is still there
        assert wait_gone(pid)
        dec.timeout = HANG_GUARD_S
        assert dec.load(SMALL).size == (64, 48) and dec.pid != pid


@posix_only
def test_child_killed_while_idle_is_replaced(decoder):
    decoder.load(SMALL)
    pid = decoder.pid
    os.kill(pid, signal.SIGKILL)
    assert wait_gone(pid)
    assert decoder.load(SMALL).size == (64, 48)
    assert decoder.pid != pid


@posix_only
def test_child_dying_during_a_decode_is_a_rejection_then_replaced():
    with Decoder(timeout=HANG_GUARD_S / 2) as dec:  # ends a wait for the dead child that EOF should have ended
        dec.load(SMALL)
        pid = dec.pid
        os.kill(pid, signal.SIGSTOP)  # the request is queued in the pipe, then the child dies before answering
        conn, sent = dec._slot["conn"], threading.Event()
        send_bytes = conn.send_bytes

        def send_and_tell(data):  # kill only once the request really is in the pipe (not after a guessed sleep)
            send_bytes(data)
            sent.set()

        conn.send_bytes = send_and_tell
        future = Background(dec.load, SMALL)
        assert sent.wait(HANG_GUARD_S)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(ImageRejected, match="^image could not be decoded safely$"):
            future.result()
        assert dec.load(SMALL).size == (64, 48) and dec.pid != pid


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="RLIMIT_AS is set only on Linux")
def test_memory_limit_is_a_rejection_not_a_crash(big):
    with Decoder(memory_mb=100) as dec:  # decoding the 39.7 Mpx image needs several 120 MiB buffers
        with pytest.raises(ImageRejected) as info:
            dec.load(big)
        assert str(info.value) in ("image needs too much memory to decode", "image could not be decoded safely")
        assert dec.load(SMALL).size == (64, 48)  # same child or a fresh one, either way it works


def test_eight_threads_get_their_own_results(decoder):
    inputs = [encode(noise((32 + i, 24 + i), seed=i), "PNG") for i in range(32)]
    expected = [np.asarray(load_image(d)) for d in inputs]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(decoder.load, inputs))
    assert all(np.array_equal(np.asarray(r), e) for r, e in zip(results, expected))


@posix_only
def test_close_leaves_no_child():
    dec = Decoder()
    dec.load(SMALL)
    pid = dec.pid
    dec.close()
    assert wait_gone(pid)
    with pytest.raises(RuntimeError, match="closed"):
        dec.load(SMALL)
    dec.close()  # idempotent


@posix_only
def test_garbage_collected_decoder_stops_its_child():
    dec = Decoder()
    dec.load(SMALL)
    pid = dec.pid
    del dec
    gc.collect()
    assert wait_gone(pid)


@posix_only
@pytest.mark.parametrize("ending", ["normal-exit", "parent-killed"])
def test_no_child_outlives_the_parent(ending):
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        from skingpt4.serve import sandbox
        sandbox.load_image_isolated({SMALL!r})
        print(*sandbox._shared.pids, flush=True)
        if {ending == "parent-killed"!r}:
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=HANG_GUARD_S)
    child = int(proc.stdout.split()[0])
    assert wait_gone(child), f"decoder child {child} outlived its parent ({ending})"


def test_photos_one_after_another_reuse_one_child():
    from skingpt4.serve.sandbox import DecoderPool

    assert np.array_equal(np.asarray(load_image_isolated(SMALL)), np.asarray(load_image(SMALL)))  # the shared pool
    with DecoderPool(size=3) as pool:
        for _ in range(5):
            pool.load(SMALL)
        assert len(pool.pids) == 1  # a second child starts only when two photos are decoded at once


@posix_only
def test_a_photo_that_hangs_its_decoder_stalls_only_its_own_request():
    """In a pool, a hostile photo (here: a child that cannot answer) holds one child until its timeout; the next
    photo is decoded by another child meanwhile, at once."""
    from skingpt4.serve.sandbox import DecoderPool

    with DecoderPool(size=2, timeout=HANG_GUARD_S) as pool:
        pool.load(SMALL)
        (stuck_pid,) = pool.pids
        os.kill(stuck_pid, signal.SIGSTOP)  # the next photo goes to this child (the most recently used)
        stuck = Background(pool.load, SMALL)
        deadline = time.monotonic() + HANG_GUARD_S
        while pool.idle.qsize() > 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        other = pool.load(encode(noise((40, 30), seed=8), "PNG"))  # while the first is still stuck
        assert other.size == (40, 30) and time.monotonic() - started < HANG_GUARD_S / 2
        assert stuck_pid in pool.pids and len(pool.pids) == 2  # two children: the stuck one is still waited on
        os.kill(stuck_pid, signal.SIGKILL)
        with pytest.raises(ImageRejected):
            stuck.result()


def test_importing_the_sandbox_does_not_import_torch():
    code = (
        "import sys, skingpt4.serve.sandbox; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux RLIMIT_AS")
def test_load_image_turns_memory_error_into_rejection():
    """In process, under a 300 MiB address-space allowance, the 39.7 Mpx image decodes but its final copy cannot be
    made: load_image must still say ImageRejected, not raise MemoryError (the child process relies on this too)."""
    code = textwrap.dedent(
        """
        import resource, sys
        sys.path.insert(0, "tests")
        from malformed import png_zero
        from skingpt4.inputs.images import ImageRejected, load_image
        big = png_zero(6300, 6300)
        start = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
        resource.setrlimit(resource.RLIMIT_AS, (start + 300 * 2**20, resource.RLIM_INFINITY))
        try:
            load_image(big)
            print("accepted")
        except ImageRejected as exc:
            print("rejected:", exc)
        except MemoryError:
            print("MemoryError")
        """
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=root)
    assert out.stdout.strip() in ("accepted", "rejected: image needs too much memory to decode"), out.stdout


def test_a_script_without_a_main_guard_can_use_the_sandbox(tmp_path):
    """The child is a plain subprocess: nothing re-imports the caller's script (multiprocessing's spawn would)."""
    script = tmp_path / "plain_script.py"
    script.write_text(
        "import io\nfrom PIL import Image\nfrom skingpt4.serve.sandbox import load_image_isolated\n"
        "buf = io.BytesIO()\nImage.new('RGB', (40, 30), (1, 2, 3)).save(buf, 'PNG')\n"
        "print('decoded', load_image_isolated(buf.getvalue()).size)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("decoded") == 1 and "(40, 30)" in out.stdout
