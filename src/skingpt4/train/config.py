"""`TrainConfig`: every training setting with its one default, loaded from a small YAML file of overrides.

Defaults are MiniGPT-4's released stage-2 fine-tuning config (docs/reference.md §4.3), the closest released recipe to
SkinGPT-4's unreleased skin steps; `configs/train/*.yaml` set the paper's numbers (docs/reference.md §4.4). Paths in a
YAML file are relative to the folder training is started from, so shipped configs hold no machine paths.
"""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePath

from skingpt4.errors import InputError

MIXED_PRECISION = ("no", "fp16", "bf16")
# Names other trainers use, so that a misspelt or foreign key still gets a useful suggestion.
ALIASES = {
    "learning_rate": "init_lr",
    "lr": "init_lr",
    "warmup_start_lr": "warmup_lr",
    "max_steps": "stop_after",
    "max_epoch": "epochs",
    "accum_grad_iters": "grad_accum",
    "gradient_accumulation_steps": "grad_accum",
    "output": "output_dir",
    "prompt_path": "prompts",
    "ckpt": "init_from",
    "amp": "mixed_precision",
}


@dataclass
class TrainConfig:
    """One training run. Steps are optimizer steps; one step sees `batch_size x grad_accum x processes` samples."""

    # What to train on
    model: str = "tiny"  # base model folder (made by `skingpt4 convert`) or "tiny"
    data: str = "data/manifest.jsonl"  # JSON Lines/CSV manifest (image, caption, split) or a MiniGPT-4 folder
    output_dir: str = "runs/train"
    eval_data: str | None = None  # the evaluation manifest: no training image may be in its val or test split
    init_from: str | None = None  # a previous run's output folder (step 1 for step 2), or a SkinGPT-4 .pth
    train_split: str = "train"  # records of this split, and records without a split, train
    val_split: str = "val"
    # The objective (docs/reference.md §3.2-3.4, 4.1)
    prompts: str = "alignment_skin"  # a packaged prompt list (skingpt4/prompts/<name>.txt) or a .txt path
    prompt_template: str = "###Human: {} ###Assistant: "
    end_sym: str = "###"
    max_txt_len: int = 160
    # Optimizer and schedule (docs/reference.md §4.2): AdamW, linear warmup then cosine over epochs x iters_per_epoch
    batch_size: int = 12  # per process
    grad_accum: int = 1
    epochs: int = 5
    iters_per_epoch: int = 200
    stop_after: int | None = None  # end the run (with a checkpoint) after this many steps; --resume continues
    init_lr: float = 3e-5
    min_lr: float = 1e-5
    warmup_lr: float = 1e-6
    warmup_steps: int = 200
    weight_decay: float = 0.05
    beta2: float = 0.999
    # What trains: the projection always; LoRA on the LLM optionally (peft)
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    # Machine
    mixed_precision: str = "bf16"  # no | fp16 | bf16, on a GPU only (the CPU always trains in float32)
    gradient_checkpointing: bool = False
    num_workers: int = 2
    seed: int = 42
    # Checkpoints, logs, validation, exports
    checkpoint_every: int = 500
    keep_checkpoints: int = 2  # the newest N step checkpoints are kept
    val_every: int = 500
    tensorboard: bool = False
    export_folder: bool = True  # a model folder for `load_model`: the base folder with the trained tensors replaced
    export_pth: bool = True  # skingpt4_proj.pth in the original's format (projection-only runs)

    def __post_init__(self):
        for f in fields(self):
            setattr(self, f.name, _typed(f.name, f.type, getattr(self, f.name)))
        positive = (
            "max_txt_len",
            "batch_size",
            "grad_accum",
            "epochs",
            "iters_per_epoch",
            "lora_r",
            "lora_alpha",
            "checkpoint_every",
            "val_every",
            "keep_checkpoints",
        )
        for name in positive:
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise InputError(f"config {name} must be a positive integer, got {getattr(self, name)!r}")
        checks = [
            (self.init_lr > 0 and self.min_lr >= 0 and self.warmup_lr >= 0, "learning rates must be >= 0 (init > 0)"),
            (self.warmup_steps >= 0 and self.num_workers >= 0, "warmup_steps and num_workers must be >= 0"),
            (0 <= self.weight_decay < 1 and 0 < self.beta2 < 1, "weight_decay must be in [0, 1), beta2 in (0, 1)"),
            (0 <= self.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
            (self.mixed_precision in MIXED_PRECISION, f"mixed_precision must be one of {', '.join(MIXED_PRECISION)}"),
            (self.prompt_template.count("{}") == 1, "prompt_template must contain {} once (where the prompt goes)"),
            (self.stop_after is None or self.stop_after >= 1, "stop_after must be a positive integer or null"),
        ]
        for ok, message in checks:
            if not ok:
                raise InputError(f"config: {message}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.iters_per_epoch

    def to_dict(self) -> dict:
        return asdict(self)


def _typed(name: str, kind: str, value):
    """The value as its field's type; YAML 1.1 reads `1e-4` as a string, so numbers in strings are accepted."""
    if value is None and kind.endswith("| None"):
        return None
    base = kind.split(" |")[0]
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool) and float(value) == int(float(value)):
            return int(float(value))
        if base == "bool" and isinstance(value, bool):
            return value
        if base == "str" and isinstance(value, (str, PurePath)):  # paths from Python callers are fine
            return str(value)
        if base == "list[str]" and isinstance(value, list) and all(isinstance(v, str) for v in value):
            return list(value)
    except (TypeError, ValueError):
        pass
    raise InputError(f"config {name} must be {kind.replace('list[str]', 'a list of strings')}, got {value!r}")


def load_config(path: Path | str | None, overrides: dict | None = None) -> TrainConfig:
    """A YAML file of overrides (or None for the defaults), then `overrides` on top; unknown keys are errors."""
    import yaml

    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise InputError(f"config file not found: {path}")
        try:
            values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise InputError(f"{path.name} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise InputError(f"{path.name} must be a mapping of config keys to values")
    values = {**values, **(overrides or {})}
    check_keys(values)
    return TrainConfig(**values)


def check_keys(values: dict) -> None:
    known = [f.name for f in fields(TrainConfig)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known + list(ALIASES), n=1)
            hint = f" (did you mean '{ALIASES.get(close[0], close[0])}'?)" if close else ""
            raise InputError(f"unknown config key '{key}'{hint}")
