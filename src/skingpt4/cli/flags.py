"""Flags and set-up that several commands share: the model, generation settings, records, the start-up notice."""

from __future__ import annotations

import argparse
import sys
import threading
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

from skingpt4.errors import InputError
from skingpt4.generation import MAX_BATCH, GenerationSettings

GENERATION_FLAGS = ("max_new_tokens", "temperature", "top_p", "num_beams", "repetition_penalty", "seed")


def model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder from `skingpt4 convert`, or `tiny`")
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
    parser.add_argument(
        "--max-batch",
        type=int,
        default=MAX_BATCH,
        help=f"answers decoded together (continuous batching; default {MAX_BATCH}); 1 answers one at a time",
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


def engine(args):
    """Load the model named by the model flags into a `ChatEngine`."""
    from skingpt4.chat import ChatEngine
    from skingpt4.model import load_model

    check_model_flags(args)
    loaded = load_model(
        args.model, args.device, args.dtype, args.device_map, args.load_in_8bit, args.load_in_4bit, args.quantize
    )
    return ChatEngine(loaded, args.template, max_batch=args.max_batch)


def check_model_flags(args) -> None:
    """What can be checked of the model flags without loading anything (no torch import): the folder, the template."""
    from skingpt4.conversation import get_template
    from skingpt4.folder import model_folder

    model_folder(args.model)
    if args.max_batch < 1:
        raise InputError("--max-batch must be at least 1")
    if args.template:
        try:
            get_template(args.template)
        except ValueError as exc:
            raise InputError(str(exc)) from None


def engine_loading(args) -> Future:
    """`engine(args)` in a background thread, after the quick checks: a command can show its prompt while the
    model loads (most of that time is importing torch and transformers), and wait for it when it is needed.

    A device, precision or quantization flag needs torch to be checked: then the model loads here, first, so that
    a wrong flag is reported before the prompt.
    """
    check_model_flags(args)
    future: Future = Future()
    eager = args.dtype or args.device_map or args.load_in_8bit or args.load_in_4bit or args.quantize
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
    """The intended-use notice, and the model's own warning (an untrained model), on stderr."""
    from skingpt4.serve.safety import INTENDED_USE

    print(INTENDED_USE, file=sys.stderr)
    if engine.loaded.warning:
        print(f"WARNING: {engine.loaded.warning}", file=sys.stderr)


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

    if engine.loaded.path:
        print("hashing the model's weight files for the records (once per start)...", file=sys.stderr)
        model_sha256(str(engine.loaded.path))
    with RecordStore(args.records, keep_images=args.keep_images) as store:
        yield store


def optional_path(value: str | None) -> Path | None:
    return Path(value) if value else None
