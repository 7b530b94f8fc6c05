"""What a training run writes and reads back: checkpoints, the step log, and the two exports.

A checkpoint holds only the trainable tensors (safetensors), the optimizer and scheduler state, each process's
RNG state and the data position; `state.json` is written last and marks the checkpoint complete. Everything is
read back with `weights_only=True`: no pickled code, even from our own files.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from skingpt4.errors import InputError, first_line
from skingpt4.folder.checkpoints import sha256_file
from skingpt4.folder.keymap import map_projection
from skingpt4.folder.meta import TRAINING_IMAGES, ModelMeta

CHECKPOINTS = "checkpoints"
PROJECTION = ("language_projection.weight", "language_projection.bias")


# ---------------------------------------------------------------------------------------------------------------
# Trainable tensors


def trainable_state(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().float().cpu().contiguous() for n, p in net.named_parameters() if p.requires_grad}


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A run's folder (its trainable.safetensors), a checkpoint folder, or a SkinGPT-4 `.pth` (llama_proj.*)."""
    from skingpt4.folder.checkpoints import load_pth, state_dict

    if path.is_dir():
        path = path / "trainable.safetensors"
    if not path.is_file():
        raise InputError(f"no trained weights at {path} (give a training output folder or a SkinGPT-4 .pth)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        return map_projection(state_dict(load_pth(path)))
    except Exception as exc:  # corrupt files, a .pth without llama_proj: one line
        raise InputError(f"cannot read weights from {path}: {first_line(exc)}") from None


def load_trainable(net: torch.nn.Module, path: Path, what: str) -> None:
    """Copy tensors into the model's trainable parameters, checking names and shapes (one line on a mismatch)."""
    weights = read_weights(path)
    params = dict(net.named_parameters())
    for key in PROJECTION:
        if key not in weights:
            raise InputError(f"{what} {path}: has no {key}")
    for key, tensor in weights.items():
        if key not in params or not params[key].requires_grad:
            hint = " (LoRA weights: set lora: true with the same lora_r)" if "lora_" in key else ""
            raise InputError(f"{what} {path}: {key} is not a trainable tensor of this model{hint}")
        if tuple(tensor.shape) != tuple(params[key].shape):
            raise InputError(
                f"{what} {path}: {key} is {list(tensor.shape)} but this model needs {list(params[key].shape)} "
                "(trained for another LLM width or Q-Former)"
            )
    with torch.no_grad():
        for key, tensor in weights.items():
            params[key].copy_(tensor)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def check_resumable(out: Path, resume: bool) -> None:
    have = latest_checkpoint(out) is not None
    if resume and not have:
        raise InputError(f"--resume: no checkpoint in {out / CHECKPOINTS}")
    if not resume and (have or (out / "trainable.safetensors").exists()):
        raise InputError(f"output_dir {out} already holds a run: add --resume, or choose another output_dir")


def latest_checkpoint(out: Path) -> Path | None:
    done = [p for p in (out / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(out, step, net, optimizer, scheduler, accelerator, cfg, num_train: int) -> Path:
    from safetensors.torch import save_file

    folder = out / CHECKPOINTS / f"step-{step:07d}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(trainable_state(net), folder / "trainable.safetensors", metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), folder / "optimizer.pt")
        torch.save(scheduler.state_dict(), folder / "scheduler.pt")
        if accelerator.scaler is not None:  # fp16: the loss scale decides which steps are skipped
            torch.save(accelerator.scaler.state_dict(), folder / "scaler.pt")
    accelerator.wait_for_everyone()
    torch.save(rng_state(), folder / f"rng-{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "micro_batches": step * cfg.grad_accum,
            "num_train": num_train,
            "seed": cfg.seed,
            "batch_size": cfg.batch_size,
            "grad_accum": cfg.grad_accum,
            "processes": accelerator.num_processes,
        }
        (folder / "state.json").write_text(json.dumps(state, indent=2) + "\n")
        old = sorted((out / CHECKPOINTS).glob("step-*"), key=lambda p: int(p.name.split("-")[1]))
        for stale in old[: -cfg.keep_checkpoints]:
            shutil.rmtree(stale, ignore_errors=True)
    accelerator.wait_for_everyone()
    return folder


def restore_checkpoint(run, num_train: int) -> int:
    """Load the newest complete checkpoint into `run`; returns its step. The data order resumes from its position."""
    folder, accelerator = latest_checkpoint(run.out), run.accelerator
    state = json.loads((folder / "state.json").read_text())
    check_same_run(state, run.cfg, num_train)
    rng = folder / f"rng-{accelerator.process_index}.pt"
    if not rng.is_file() or state["processes"] != accelerator.num_processes:
        raise InputError(f"{folder} was written by {state['processes']} processes; resume with the same number")
    load_trainable(run.net, folder, "checkpoint")
    run.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True))
    run.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (folder / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(folder / "scaler.pt", weights_only=True))
    set_rng_state(torch.load(rng, weights_only=True))
    return state["step"]


def check_same_run(state: dict, cfg, num_train: int) -> None:
    """The data order depends on these; resuming with others would not continue the same run."""
    now = {"num_train": num_train, "seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum}
    for key, value in now.items():
        if state[key] != value:
            raise InputError(f"cannot resume: {key} was {state[key]} in the checkpoint, is {value} now")


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------------
# Exports


def export_pth(state: dict[str, torch.Tensor], path: Path) -> Path:
    """The original runner's format, projection only: `{"model": {"llama_proj.weight", "llama_proj.bias"}}`."""
    model = {f"llama_proj.{k.split('.')[-1]}": state[k].clone() for k in PROJECTION}
    torch.save({"model": model}, path)
    return path


def changed_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors training changed, under the model folder's names: the projection, and LoRA merged into W."""
    changed = {k: v.detach().float().cpu() for k, v in net.state_dict().items() if k in PROJECTION}
    for name, module in net.named_modules():
        if hasattr(module, "get_delta_weight") and hasattr(module, "base_layer"):
            base = module.base_layer.weight.detach().float()
            changed[f"{name}.weight"] = (base + module.get_delta_weight("default").float()).cpu()
    return changed


def export_folder(base: Path, out: Path, net: torch.nn.Module, run_name: str, image_hashes=()) -> Path:
    """A full copy of the base folder in which the weight files holding changed tensors are rewritten.

    Every other file (tokenizer, config, generation config) is copied byte for byte; each changed tensor keeps the
    dtype it had in the base folder. skingpt4.json records where the new tensors came from.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    changed = changed_tensors(net)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        for path in sorted(p for p in base.iterdir() if p.is_file()):
            if path.suffix == ".safetensors":
                with safe_open(path, framework="pt") as f:
                    hit = [k for k in f.keys() if k in changed]
                if hit:
                    tensors = load_file(path)
                    for key in hit:
                        tensors[key] = changed.pop(key).to(tensors[key].dtype).contiguous()
                    save_file(tensors, tmp / path.name, metadata={"format": "pt"})
                    continue
            shutil.copy2(path, tmp / path.name)
        if changed:
            raise InputError(f"the base model folder {base} has no safetensors tensor {next(iter(changed))}")
        meta = ModelMeta.load(tmp)
        meta.description = f"{meta.description}; trained by skingpt4 train ({run_name})".strip("; ")
        meta.name = run_name
        trained = out.parent / "trainable.safetensors"
        if trained.is_file():
            meta.sources.append(
                {
                    "role": "trained",
                    "name": trained.name,
                    "sha256": sha256_file(trained),
                    "bytes": trained.stat().st_size,
                }
            )
        meta.save(tmp)
        (tmp / TRAINING_IMAGES).write_text("".join(f"{h}\n" for h in sorted(set(image_hashes))))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------------------------
# The step log


class Tracker:
    """log.jsonl (one line per step) and, optionally, TensorBoard; does nothing on other processes."""

    def __init__(self, out: Path, tensorboard: bool, enabled: bool):
        self.out, self.enabled, self.writer = out, enabled, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise InputError("tensorboard: true needs the tensorboard package: pip install tensorboard") from None
            if enabled:
                self.writer = SummaryWriter(str(out / "tensorboard"))

    def write_config(self, values: dict) -> None:
        import yaml

        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(yaml.safe_dump(values, sort_keys=False))

    def start(self, step: int) -> None:
        """Drop lines after `step` (a run that went on past its last checkpoint before it stopped)."""
        path = self.out / "log.jsonl"
        if self.enabled and path.is_file():
            lines = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in lines))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.out / "log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
