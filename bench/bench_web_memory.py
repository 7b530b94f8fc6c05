"""The web app's memory under use: `skingpt4 demo --model tiny` in its own process, its resident set size (RSS)
before, at the peak of, and after 50 page loads and 20 large photo uploads (each added to a consultation and the
consultation restarted, as a clinic would over a morning).

Prints a table of RSS with ratios to the idle process measured at the start of the same run.

    python bench/bench_web_memory.py [--loads 50] [--uploads 20] [--side 3000]
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from gradio_client import Client, handle_file
from PIL import Image


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def large_photo(side: int, seed: int) -> bytes:
    """A noisy JPEG of side x side pixels (noise does not compress: a few MB, under the 10 MB cap)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=85)
    return buf.getvalue()


class Peak:
    """Samples a process's RSS every 50 ms in a thread; `peak` is the largest seen."""

    def __init__(self, pid: int):
        self.pid, self.peak, self.done = pid, 0.0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.done.wait(0.05):
            self.peak = max(self.peak, rss_mb(self.pid))

    def stop(self) -> float:
        self.done.set()
        self.thread.join()
        return self.peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loads", type=int, default=50)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--side", type=int, default=3000, help="photo side in pixels")
    parser.add_argument(
        "--settle",
        type=float,
        default=150,
        help="seconds to wait before the last reading (the "
        "in-memory copies of uploads go after 120 s, swept every 15 s)",
    )
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    home = tempfile.mkdtemp(prefix="skingpt4-bench-")
    env = {**os.environ, "SKINGPT4_HOME": home}
    cmd = [sys.executable, "-m", "skingpt4", "demo", "--model", "tiny", "--port", str(port)]
    demo = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(url).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        time.sleep(2)
        idle = rss_mb(demo.pid)
        peak = Peak(demo.pid)
        for _ in range(args.loads):
            httpx.get(url).raise_for_status()
        after_loads = rss_mb(demo.pid)
        photo_dir = Path(tempfile.mkdtemp(prefix="skingpt4-photos-"))
        client = Client(url, verbose=False, download_files=False)
        sizes = []
        for i in range(args.uploads):
            data = large_photo(args.side, i)
            sizes.append(len(data))
            path = photo_dir / f"photo{i}.jpg"
            path.write_bytes(data)
            _, status, _ = client.predict([handle_file(str(path))], api_name="/add_photos")
            assert "1 photo(s)" in status, status
            client.predict(api_name="/restart")
        client.close()
        high = peak.stop()
        time.sleep(5)
        soon = rss_mb(demo.pid)
        time.sleep(max(0.0, args.settle - 5))
        after = rss_mb(demo.pid)
    finally:
        demo.terminate()
        demo.wait(timeout=60)
    rows = [
        ("idle, after start-up", idle),
        (f"after {args.loads} page loads", after_loads),
        (f"peak during {args.uploads} uploads of {np.mean(sizes) / 2**20:.1f} MB", high),
        ("5 s after the last upload", soon),
        (f"{args.settle:.0f} s after the last upload", after),
    ]
    print(f"web app RSS (skingpt4 demo --model tiny), {args.side} x {args.side} px photos")
    print(f"{'moment':<42}{'RSS MB':>10}{'vs idle':>10}")
    for name, value in rows:
        print(f"{name:<42}{value:>10.0f}{value / idle:>9.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
