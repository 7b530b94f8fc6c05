"""`skingpt4 train --config FILE`: the original's objective on a user's data, resumable, one GPU or many.

Only the projection (`language_projection`, the original's `llama_proj`) trains, as in SkinGPT-4; LoRA on the LLM
(peft, q_proj/v_proj) is an option. Loss: next-token cross-entropy on the caption + `###` only (docs/reference.md
§4.1). AdamW with the original's no-decay groups, linear warmup then cosine over `epochs x iters_per_epoch` steps
(§4.2).

Launch lines (the same code, no change; `accelerate` does device placement, DDP, accumulation, mixed precision):

    skingpt4 train --config configs/train/step1_concepts.yaml                     # one GPU, or the CPU
    accelerate launch --multi_gpu --num_processes 4 -m skingpt4 train --config configs/train/step1_concepts.yaml
    torchrun --nproc_per_node 4 -m skingpt4 train --config configs/train/step1_concepts.yaml
    skingpt4 train --config configs/train/step1_concepts.yaml --resume            # continue after a stop

With N processes one step sees `batch_size x grad_accum x N` samples; the schedule counts steps, so keep the
global batch in mind when changing N. A run writes into `output_dir`:

    config.yaml            the resolved config          log.jsonl     one line per step (+ val_loss when measured)
    checkpoints/step-N/    trainable weights (safetensors), optimizer, scheduler, RNG per process, data position
    trainable.safetensors  the final trained tensors (what `init_from` reads; step 2 starts from step 1's folder)
    skingpt4_proj.pth      {"model": {"llama_proj.weight", "llama_proj.bias"}}: the original code loads it
    model/                 the base model folder with the trained tensors replaced: `load_model` / `--model` take it
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from skingpt4.backends.transformers_llm import load_model
from skingpt4.data.prepare import excluded_hashes
from skingpt4.errors import InputError
from skingpt4.folder.checkpoints import sha256_file
from skingpt4.train.config import TrainConfig, load_config
from skingpt4.train.data import Collate, TrainDataset, TrainOrder, load_prompts, read_records, val_batches
from skingpt4.train.state import (
    Tracker,
    check_resumable,
    export_folder,
    export_pth,
    load_trainable,
    restore_checkpoint,
    save_checkpoint,
    trainable_state,
)

__all__ = ["TrainConfig", "TrainResult", "load_config", "lr_at", "train"]
log = logging.getLogger("skingpt4.train.loop")
WEIGHTS_DTYPE = {"no": "float32", "fp16": "float16", "bf16": "bfloat16"}  # frozen weights; trained ones are fp32


@dataclass
class TrainResult:
    output_dir: Path
    steps: int  # optimizer steps done in total (including those before a resume)
    losses: list[float] = field(default_factory=list)  # training loss of each step run by this call
    val_loss: float | None = None  # the last one measured
    trainable: Path | None = None  # the final trained tensors (None when stopped early by stop_after)
    model_dir: Path | None = None
    pth: Path | None = None
    seconds: float = 0.0


@dataclass
class Run:
    """Everything the loop touches, built and checked before the first step."""

    cfg: TrainConfig
    out: Path
    accelerator: object
    net: torch.nn.Module  # the unwrapped model
    model: torch.nn.Module  # as prepared by accelerate (DDP on several processes)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    train_set: TrainDataset
    val_set: TrainDataset | None
    num_prompts: int
    tracker: Tracker
    base_dir: Path
    image_hashes: list[str]  # SHA-256 of each training image, in record order (the model folder keeps them)


# ---------------------------------------------------------------------------------------------------------------
# The loop


def train(config: TrainConfig, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train as `config` says; every bad input stops with an `InputError` before the first step."""
    began = time.perf_counter()
    run = prepare(config, resume)
    cfg, accelerator = run.cfg, run.accelerator
    step = restore_checkpoint(run, len(run.train_set)) if resume else 0
    run.tracker.start(step)
    end = min(cfg.total_steps, cfg.stop_after or cfg.total_steps)
    result = TrainResult(run.out, step)
    batches = iter(loader(run, train_order(run, step)))
    bar = progress_bar(step, cfg.total_steps, progress and accelerator.is_main_process)
    samples = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    while step < end:
        started = time.perf_counter()
        lr = run.scheduler.get_last_lr()[0]
        loss, waited = train_step(run, batches)
        step += 1
        seconds = time.perf_counter() - started
        record = {
            "step": step,
            "epoch": (step - 1) // cfg.iters_per_epoch,
            "loss": loss,
            "lr": lr,
            "samples_per_s": samples / seconds,
            "seconds": seconds,
            "data_seconds": waited,
        }
        if run.val_set is not None and (step % cfg.val_every == 0 or step == end):
            record["val_loss"] = result.val_loss = validate(run)
        run.tracker.log(record)
        result.losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", samples_s=f"{samples / seconds:.1f}")
        bar.update(1)
        if step % cfg.checkpoint_every == 0 or step == end:
            save_checkpoint(run.out, step, run.net, run.optimizer, run.scheduler, accelerator, cfg, len(run.train_set))
    bar.close()
    result.steps = step
    if step == cfg.total_steps:
        finish(run, result)
    run.tracker.close()
    accelerator.wait_for_everyone()
    result.seconds = time.perf_counter() - began
    return result


def train_step(run: Run, batches) -> tuple[float, float]:
    """One optimizer step over `grad_accum` micro-batches; returns the mean loss (all processes) and data wait."""
    losses, waited = [], 0.0
    for _ in range(run.cfg.grad_accum):
        started = time.perf_counter()
        batch = to_device(next_batch(batches), run.net)
        waited += time.perf_counter() - started
        with run.accelerator.accumulate(run.model):
            # The stock Blip2 forward: image features scattered into the placeholder positions of the token
            # embeddings (as ChatEngine.embed), the LLM on inputs_embeds, shifted cross-entropy over labels != -100.
            # Called through the prepared wrapper, so DDP syncs gradients and autocast applies.
            loss = run.model(**batch).loss
            run.accelerator.backward(loss)
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
    run.scheduler.step()
    return run.accelerator.reduce(torch.stack(losses).mean(), "mean").item(), waited


def next_batch(batches):
    """The next batch; an unreadable image found by a data worker becomes one line, not the worker's traceback."""
    try:
        return next(batches)
    except InputError as exc:  # a worker's error comes back with its whole traceback as the message
        last = str(exc).strip().splitlines()[-1]
        raise InputError(last.split("InputError: ", 1)[-1]) from None


@torch.no_grad()
def validate(run: Run) -> float:
    """Token-weighted mean loss over the whole val split (fixed crops and prompts), all processes together."""
    acc = run.accelerator
    set_modes(run.net, run.cfg, training=False)
    batches = val_batches(len(run.val_set), run.cfg.batch_size, run.num_prompts, acc.process_index, acc.num_processes)
    total = torch.zeros(2, device=acc.device, dtype=torch.float64)
    for batch in loader(run, batches, val=True):
        batch = to_device(batch, run.net)
        tokens = (batch["labels"][:, 1:] != -100).sum()
        # The unwrapped model (autocast applies to it too): processes may hold different numbers of val batches,
        # and a DDP forward would wait for the others' buffer broadcast.
        total += torch.stack([run.net(**batch).loss.double() * tokens, tokens.double()])
    set_modes(run.net, run.cfg, training=True)
    total = acc.reduce(total, "sum")
    return (total[0] / total[1].clamp(min=1)).item()


def finish(run: Run, result: TrainResult) -> None:
    """Write the final tensors and the exports (main process)."""
    acc = run.accelerator
    acc.wait_for_everyone()
    if not acc.is_main_process:
        return
    from safetensors.torch import save_file

    state = trainable_state(run.net)
    result.trainable = run.out / "trainable.safetensors"
    save_file(state, result.trainable, metadata={"format": "pt"})
    if run.cfg.export_pth and not run.cfg.lora:
        result.pth = export_pth(state, run.out / "skingpt4_proj.pth")
    elif run.cfg.export_pth:
        log.warning("LoRA run: no skingpt4_proj.pth (the original code has no LoRA); use model/ instead")
    if run.cfg.export_folder:
        result.model_dir = export_folder(run.base_dir, run.out / "model", run.net, run.out.name, run.image_hashes)


# ---------------------------------------------------------------------------------------------------------------
# Building the run (every check happens here, before the first step)


def prepare(cfg: TrainConfig, resume: bool) -> Run:
    from accelerate import Accelerator

    gpu = torch.cuda.is_available()
    precision = cfg.mixed_precision if gpu else "no"  # autocast on the CPU is slow and not the original's
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum, mixed_precision=precision, cpu=not gpu)
    out = Path(cfg.output_dir)
    check_resumable(out, resume)
    tracker = Tracker(out, cfg.tensorboard, accelerator.is_main_process)
    seed_everything(cfg.seed + accelerator.process_index)
    prompts = load_prompts(cfg.prompts, cfg.prompt_template)
    records = read_records(cfg.data, cfg.train_split, default_split=True)
    if not records:
        raise InputError(f"{cfg.data}: no training records (split '{cfg.train_split}' or no split)")
    val_records = read_records(cfg.data, cfg.val_split, default_split=False)
    image_hashes = content_hashes(records)
    if cfg.eval_data:
        check_apart(records, image_hashes, cfg.eval_data)
    loaded = load_model(cfg.model, device=str(accelerator.device), dtype=WEIGHTS_DTYPE[precision])
    net = loaded.model
    make_trainable(net, cfg)
    if cfg.init_from:
        load_trainable(net, Path(cfg.init_from), "init_from")
    common = (loaded.tokenizer, loaded.image_token_id, cfg.end_sym, cfg.max_txt_len, loaded.info.meta.pixels, cfg.seed)
    train_set = TrainDataset(records, prompts, *common, train=True)
    val_set = TrainDataset(val_records, prompts, *common, train=False) if val_records else None
    optimizer = torch.optim.AdamW(param_groups(net, cfg.weight_decay), lr=cfg.init_lr, betas=(0.9, cfg.beta2))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.init_lr)
    model, optimizer = accelerator.prepare(net, optimizer)
    if accelerator.is_main_process:
        tracker.write_config(cfg.to_dict())
    return Run(
        cfg,
        out,
        accelerator,
        net,
        model,
        optimizer,
        scheduler,
        train_set,
        val_set,
        len(prompts),
        tracker,
        loaded.info.path,
        image_hashes,
    )


def content_hashes(records) -> list[str]:
    """SHA-256 of each training image's bytes (how an image is recognised in any manifest, whatever its name)."""
    return [sha256_file(record.image) for record in records]


def check_apart(records, hashes: list[str], eval_data: str) -> None:
    """Refuse, with one line, training images that are in the evaluation manifest's val or test split."""
    held_out = excluded_hashes(f"{eval_data}:test") | excluded_hashes(f"{eval_data}:val")
    shared = [record.image for record, digest in zip(records, hashes) if digest in held_out]
    if shared:
        raise InputError(
            f"{len(shared)} training images are in the test or val split of {eval_data} (first: {shared[0].name}); "
            f"leave them out, e.g. prepare-data ... --exclude {eval_data}:test --exclude {eval_data}:val"
        )


def make_trainable(net: torch.nn.Module, cfg: TrainConfig) -> None:
    """Freeze everything, then train the projection (float32, as the original) and, optionally, LoRA adapters."""
    net.requires_grad_(False)
    if cfg.lora:
        add_lora(net, cfg)
    if cfg.gradient_checkpointing:
        lm = net.language_model  # transformers 5.23 renamed gradient_checkpointing_enable
        enable = getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable
        enable({"use_reentrant": False})
    net.language_projection.float().requires_grad_(True)
    for name, param in net.named_parameters():
        if "lora_" in name:
            param.data = param.data.float()
            param.requires_grad_(True)
    set_modes(net, cfg, training=True)


def add_lora(net: torch.nn.Module, cfg: TrainConfig) -> None:
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise InputError("lora: true needs peft: pip install 'skingpt4[train]'") from None
    config = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.lora_targets),
        bias="none",
    )
    try:
        inject_adapter_in_model(config, net.language_model)
    except ValueError as exc:  # peft: "Target modules ... not found in the base model"
        raise InputError(f"lora_targets {cfg.lora_targets}: {str(exc).splitlines()[0]}") from None


def set_modes(net: torch.nn.Module, cfg: TrainConfig, training: bool) -> None:
    """Frozen towers stay in eval mode, as the original's `disabled_train` (the Q-Former's dropout stays off).

    Exceptions while training: LoRA dropout, and the LLM when checkpointing (transformers checkpoints only in
    training mode; Llama has no dropout, so its outputs do not change).
    """
    net.eval()
    if not training:
        return
    if cfg.gradient_checkpointing:
        net.language_model.train()
    for name, module in net.named_modules():
        if name.endswith("lora_dropout"):
            module.train()


def param_groups(net: torch.nn.Module, weight_decay: float) -> list[dict]:
    """The original's two groups: no decay for 1-D tensors and names with `bias`, `ln` or `bn`."""
    decay, no_decay = [], []
    for name, param in net.named_parameters():
        if param.requires_grad:
            plain = param.ndim < 2 or "bias" in name or "ln" in name or "bn" in name
            (no_decay if plain else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, cfg: TrainConfig) -> float:
    """MiniGPT-4's `LinearWarmupCosineLRScheduler` at 0-based step `step`: warmup while the total step is below
    `warmup_steps`, its value from the step *within the epoch* (so it restarts each epoch when warmup is longer
    than an epoch, as the original's does); then cosine over all steps."""
    if step < cfg.warmup_steps:
        within = step % cfg.iters_per_epoch
        return min(cfg.init_lr, cfg.warmup_lr + (cfg.init_lr - cfg.warmup_lr) * within / max(cfg.warmup_steps, 1))
    return (cfg.init_lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * step / cfg.total_steps)) + cfg.min_lr


# ---------------------------------------------------------------------------------------------------------------
# Small helpers


def loader(run: Run, batches, val: bool = False) -> torch.utils.data.DataLoader:
    """Its own generator: a DataLoader draws a seed on every `iter()`, which must not move the global RNG (LoRA
    dropout draws from it), or a resumed run would differ from an uninterrupted one."""
    dataset = run.val_set if val else run.train_set
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=run.cfg.num_workers,
        collate_fn=Collate(dataset.tokenizer.pad_token_id),
        pin_memory=run.accelerator.device.type == "cuda",
        generator=torch.Generator().manual_seed(run.cfg.seed),
    )


def train_order(run: Run, step: int) -> TrainOrder:
    acc, cfg = run.accelerator, run.cfg
    start = step * cfg.grad_accum  # micro-batches already consumed
    return TrainOrder(
        len(run.train_set), cfg.batch_size, run.num_prompts, cfg.seed, start, acc.process_index, acc.num_processes
    )


def to_device(batch: dict, net: torch.nn.Module) -> dict:
    vision = net.vision_model.embeddings.patch_embedding.weight
    batch = {k: v.to(vision.device, non_blocking=True) for k, v in batch.items()}
    batch["pixel_values"] = batch["pixel_values"].to(vision.dtype)
    return batch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_bar(step: int, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=step, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)
