"""The GPU check's dry run: the same script, tiny model, on the CPU (float32: every equality must hold exactly)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py"


def test_gpu_check_dry_run_on_the_cpu():
    done = subprocess.run([sys.executable, str(SCRIPT), "--size", "tiny"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split("  ")[0]: line for line in done.stdout.splitlines()[2:]}
    assert "100.0%" in rows["float32 prefix reuse = recompute (tokens)"]
    assert "100.0%" in rows["float32 batch of 8 = one at a time (tokens)"]
    assert "finite  ok" in rows["training step, projection"] and "loss" in rows["training step, projection + LoRA"]
    for check in ("decode tokens/s, batch 1", "prefill tokens/s (1024)", "vision tower + Q-Former, ms per image (8)"):
        assert check in rows
