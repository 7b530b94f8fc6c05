"""`python demo.py --cfg-path eval_configs/skingpt4_eval.yaml --gpu-id 0` keeps working."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from skingpt4.cli.legacy import main, model_folder, read_model_section
from skingpt4.folder.meta import home_dir
from skingpt4.serve import web_launch

ROOT = Path(__file__).resolve().parents[1]


def test_committed_yaml_parses_and_names_the_original_assets():
    section = read_model_section(ROOT / "eval_configs" / "skingpt4_eval.yaml")
    assert section["ckpt"].endswith(".pth") and section["prompt_template"] == "###Human: {} ###Assistant: "
    assert not any(str(v).startswith("/") for v in section.values())  # no machine paths


def test_original_assets_are_converted_once_then_reused(tmp_path, lavis_files, llm_dir, dims, monkeypatch):
    section = {
        "ckpt": str(lavis_files["proj"]),
        "llm_model": str(llm_dir),
        "vit_model": str(lavis_files["vit"]),
        "q_former_model": str(lavis_files["qformer"]),
        "vit_heads": dims.vit_heads,
        "qformer_heads": dims.qformer_heads,
    }
    first = model_folder(section)
    assert first.parent == home_dir() / "converted" and (first / "config.json").is_file()
    stamp = (first / "config.json").stat().st_mtime_ns
    assert model_folder(section) == first and (first / "config.json").stat().st_mtime_ns == stamp

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"model": section}))
    served = []
    monkeypatch.setattr(web_launch, "launch", lambda engine, config: served.append((engine, config)))
    assert main(["--cfg-path", str(cfg), "--gpu-id", "0"]) == 0
    engine, config = served[0]
    assert engine.info.path == first and (config.host, config.port, config.auth) == ("127.0.0.1", 5905, None)


def test_clear_errors(tmp_path, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text("model:\n  ckpt: weights/x.pth\n")
    assert main(["--cfg-path", str(cfg)]) == 2
    assert "missing: llm, vit, qformer" in capsys.readouterr().err
    cfg.write_text("model:\n  ckpt: a.pth\n  llm_model: l\n  vit_model: v\n  q_former_model: https://x/y.pth\n")
    assert main(["--cfg-path", str(cfg)]) == 2
    assert "qformer is a URL" in capsys.readouterr().err
    assert main(["--cfg-path", str(tmp_path / "none.yaml")]) == 2


def test_missing_weights_are_named_before_any_conversion_starts(tmp_path, lavis_files, llm_dir, capsys):
    section = {"ckpt": str(lavis_files["proj"]), "llm_model": str(llm_dir), "vit_model": str(tmp_path / "no.pth")}
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"model": {**section, "q_former_model": str(lavis_files["qformer"])}}))
    cache = home_dir() / "converted"
    before = sorted(cache.iterdir()) if cache.exists() else []
    assert main(["--cfg-path", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: vit_model not found: {tmp_path / 'no.pth'}\n"  # one line; nothing said about converting
    assert (sorted(cache.iterdir()) if cache.exists() else []) == before


def test_demo_py_at_the_repo_root_serves_the_web_app(tiny_dir, tmp_path):
    import signal
    import socket
    import threading
    import time

    import httpx

    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"converted": str(tiny_dir)}}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "demo.py", "--cfg-path", str(cfg), "--gpu-id", "0", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        page, deadline = "", time.monotonic() + 120
        while (
            time.monotonic() < deadline
            and proc.poll() is None
            and not (page and any("web app at" in x for x in lines))
        ):
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/")
                page = response.text if response.status_code == 200 else ""  # still starting: ask again
            except httpx.TransportError:
                page = ""
            if not page:
                time.sleep(0.3)
        if "UNTRAINED" not in page:
            proc.kill()
            reader.join(30)
            pytest.fail(f"no web app page with the banner; demo.py said: {''.join(lines)[-2000:]}")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(30)
        output = "".join(lines)
    finally:
        proc.kill()
    assert proc.returncode == 0, output
    assert "127.0.0.1" in output and "research and education tool" in output
