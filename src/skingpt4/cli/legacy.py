"""The original launch line keeps working: `python demo.py --cfg-path eval_configs/skingpt4_eval.yaml --gpu-id 0`.

The YAML's `model:` section names either a converted folder (`converted: DIR`) or the original assets
(`ckpt`, `llm_model` / `llama_model`, `vit_model`, `q_former_model`); those are converted once, on first use, into
the cache ($SKINGPT4_HOME/converted/). Relative paths are read from the current folder, as the original did.
It starts the web app on the original's port 5905, but on this machine only (127.0.0.1) and with no public share
link: the original's `share=True, server_name="0.0.0.0"` sent patients' photos through a public relay.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from pathlib import Path

from skingpt4.errors import InputError, SkinGPT4Error, first_line
from skingpt4.inputs.images import ImageRejected


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="demo.py", description="SkinGPT-4 demo (original launch line)")
    parser.add_argument("--cfg-path", required=True, help="path to the evaluation YAML")
    parser.add_argument("--gpu-id", type=int, default=0, help="GPU to use when one is present")
    parser.add_argument("--options", nargs="+", help="ignored (kept so old scripts still parse)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    parser.add_argument("--port", type=int, default=5905, help="the original demo's port")
    args = parser.parse_args(argv)
    try:
        return launch(Path(args.cfg_path), args.gpu_id, args.host, args.port)
    except (SkinGPT4Error, ImageRejected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def launch(cfg_path: Path, gpu_id: int, host: str = "127.0.0.1", port: int = 5905) -> int:
    import torch

    from skingpt4.engine.factory import EngineOptions, open_engine
    from skingpt4.serve import web_launch
    from skingpt4.serve.safety import INTENDED_USE

    section = read_model_section(cfg_path)
    folder = model_folder(section)
    device = f"cuda:{gpu_id}" if torch.cuda.is_available() else "cpu"
    low_resource = bool(section.get("low_resource")) and device != "cpu"
    engine = open_engine(EngineOptions(str(folder), device=device, load_in_8bit=low_resource))
    print(INTENDED_USE, file=sys.stderr)
    if engine.info.warning:
        print(f"WARNING: {engine.info.warning}", file=sys.stderr)
    web_launch.launch(engine, web_launch.WebConfig(host=host, port=port))  # until Ctrl+C / SIGTERM
    return 0


def read_model_section(cfg_path: Path) -> dict:
    import yaml

    if not cfg_path.is_file():
        raise InputError(f"config not found: {cfg_path}")
    try:
        data = yaml.safe_load(cfg_path.read_text())
    except yaml.YAMLError as exc:
        raise InputError(f"{cfg_path.name} is not valid YAML ({first_line(exc)})") from None
    section = (data or {}).get("model") if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise InputError(f"{cfg_path.name} has no 'model:' section")
    return section


def model_folder(section: dict) -> Path:
    """The converted folder the YAML names, converting the original assets into the cache if needed."""
    from skingpt4.folder.convert import ConvertOptions, convert
    from skingpt4.folder.meta import home_dir

    if section.get("converted"):
        return Path(section["converted"]).expanduser()
    sources = {
        "projection": section.get("ckpt"),
        "llm": section.get("llm_model") or section.get("llama_model"),
        "vit": section.get("vit_model"),
        "qformer": section.get("q_former_model"),
    }
    missing = [name for name, value in sources.items() if not value]
    if missing:
        raise InputError(
            "the YAML's model section needs `converted: DIR`, or ckpt, llm_model, vit_model and q_former_model "
            f"(missing: {', '.join(missing)})"
        )
    for name in ("projection", "vit", "qformer"):
        if str(sources[name]).startswith(("http://", "https://")):
            raise InputError(f"{name} is a URL ({sources[name]}); download it once and give the file path")
    _check_sources(sources)
    target = home_dir() / "converted" / _fingerprint(sources)
    if not (target / "config.json").is_file():
        print(f"(converting the original checkpoints once into {target})", file=sys.stderr)
        options = ConvertOptions(
            llm=str(sources["llm"]),
            projection=Path(sources["projection"]),
            vit=Path(sources["vit"]),
            qformer=Path(sources["qformer"]),
            **{key: int(section[key]) for key in ("vit_heads", "qformer_heads") if key in section},
        )
        convert(options, target)
    return target


YAML_KEYS = {"projection": "ckpt", "llm": "llm_model", "vit": "vit_model", "qformer": "q_former_model"}


def _check_sources(sources: dict) -> None:
    """Every named file is there before anything is said or written (the LLM may be a hub id in the local cache)."""
    for name, value in sources.items():
        path = Path(value).expanduser()
        hub_id = name == "llm" and re.fullmatch(r"[\w.-]+/[\w.-]+", str(value)) and not path.exists()
        if not hub_id and not (path.is_dir() if name == "llm" else path.is_file()):
            raise InputError(f"{YAML_KEYS[name]} not found: {path}")


def _fingerprint(sources: dict) -> str:
    """Names, sizes and modification times: a changed file gets a fresh conversion."""
    facts = {}
    for name, value in sources.items():
        path = Path(value).expanduser()
        stat = path.stat() if path.exists() else None
        facts[name] = [str(path.resolve()), stat.st_size if stat else None, stat.st_mtime_ns if stat else None]
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
