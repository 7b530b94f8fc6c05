"""The one place that chooses and opens an engine from the model flags (`--engine`, `--quantize`, the device and
precision flags, `--max-batch`, `--cached-sessions`, `--queue-size`).

`EngineOptions.check` refuses every conflict among them in one line before anything loads (it imports no torch,
so a command can say so at once); `open_engine` then loads the model on transformers (`folder/load.py`), on
llama.cpp (`backends/llamacpp.py`), or starts vLLM (`vllm.py`), and returns a `protocol.Engine`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from skingpt4.engine.settings import MAX_CONTEXT, EngineSettings
from skingpt4.errors import NEEDS_TRANSFORMERS, NO_BEAMS, InputError
from skingpt4.folder.serving import ARCHITECTURE


@dataclass
class VllmOptions:
    """What `serve --engine vllm` passes to vLLM's engine arguments (one home for each default)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    dtype: str = "auto"  # vLLM's choice: the folder's dtype (float16 from `convert`)
    max_model_len: int = MAX_CONTEXT
    max_images: int = 4  # per prompt (vLLM reserves encoder memory for this many)
    extra: dict = field(default_factory=dict)  # any other `AsyncEngineArgs` field (--vllm-arg KEY=VALUE)

    def __post_init__(self):
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise InputError("--tensor-parallel-size and --pipeline-parallel-size must be at least 1")
        if taken := sorted(set(self.extra) & set(self.engine_args(Path(), 1))):
            raise InputError(f"--vllm-arg {taken[0]}: set by skingpt4 (use its own flag where it has one)")

    def engine_args(self, folder: Path, max_batch: int) -> dict:
        return dict(
            model=str(folder),
            tokenizer=str(folder),
            hf_overrides={"architectures": [ARCHITECTURE]},  # folders made before the plugin existed too
            tensor_parallel_size=self.tensor_parallel_size,
            pipeline_parallel_size=self.pipeline_parallel_size,
            dtype=self.dtype,
            max_model_len=self.max_model_len,
            limit_mm_per_prompt={"image": self.max_images},
            max_num_seqs=max_batch,  # rows decoded together, as in our engine
        )


@dataclass
class EngineOptions:
    """The model and how to run it."""

    model: str
    engine: str = "skingpt4"  # or "vllm"
    device: str = "auto"
    dtype: str | None = None
    device_map: str | None = None
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    quantize: str | None = None  # int8, int4: the LLM on llama.cpp
    template: str | None = None
    settings: EngineSettings = field(default_factory=EngineSettings)
    vllm: VllmOptions = field(default_factory=VllmOptions)

    def check(self, beams: bool = False, scoring: bool = False) -> None:
        """Every conflict among the options, and with what the command will ask (`beams`: beam search;
        `scoring`: choice-mode evaluation), in one line, before anything loads."""
        from skingpt4.folder.meta import model_folder
        from skingpt4.inputs.conversation import get_template

        model_folder(self.model)
        if self.template:
            try:
                get_template(self.template)
            except ValueError as exc:
                raise InputError(str(exc)) from None
        for refused, message in self._conflicts(beams, scoring):
            if refused:
                raise InputError(message)

    def _conflicts(self, beams: bool, scoring: bool) -> list[tuple[bool, str]]:
        ours = {"--device": self.device != "auto", "--device-map": self.device_map}
        ours.update({"--load-in-8bit": self.load_in_8bit, "--load-in-4bit": self.load_in_4bit})
        ours["--quantize"] = self.quantize
        given = [flag for flag, value in ours.items() if value]
        vllm, quantized = self.engine == "vllm", self.quantize is not None
        cpu_only = self.device not in ("auto", "cpu") or self.device_map or self.load_in_8bit or self.load_in_4bit
        return [
            (self.engine not in ("skingpt4", "vllm"), f"--engine {self.engine}: expected skingpt4 or vllm"),
            (vllm and bool(given), f"{', '.join(given)}: not with --engine vllm (vLLM places and loads the model)"),
            (self.load_in_8bit and self.load_in_4bit, "choose one of --load-in-8bit and --load-in-4bit"),
            (quantized and bool(cpu_only), "--quantize runs the LLM on the CPU (llama.cpp): use it with --device cpu"),
            (quantized and beams, f"--num-beams: {NO_BEAMS}"),
            (quantized and scoring, f"--mode choice {NEEDS_TRANSFORMERS}"),
            (vllm and scoring, "--mode choice reads the model's logits: run it on our engine, not --engine vllm"),
        ]


def open_engine(options: EngineOptions, beams: bool = False, scoring: bool = False):
    """Check the options against what will be asked (`EngineOptions.check`), load the model, and return the engine
    that runs it (a `protocol.Engine`)."""
    options.check(beams, scoring)
    if options.engine == "vllm":
        return open_vllm(options)
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
    """vLLM's async engine on a model folder, or `tiny` (needs `pip install "skingpt4[vllm]"` and GPUs)."""
    from skingpt4.engine.vllm import VllmEngine
    from skingpt4.folder.load import resolve_model_path

    folder = resolve_model_path(options.model)
    try:
        from vllm import AsyncEngineArgs, SamplingParams
        from vllm.v1.engine.async_llm import AsyncLLM
    except ImportError as exc:
        raise InputError(f'--engine vllm needs vLLM: pip install "skingpt4[vllm]" ({exc})') from None
    args = AsyncEngineArgs(**options.vllm.engine_args(folder, options.settings.max_batch), **options.vllm.extra)
    client = AsyncLLM.from_engine_args(args)
    return VllmEngine(client, folder, SamplingParams, options.settings, options.template)
