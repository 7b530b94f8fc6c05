"""`skingpt4 ...`: a thin command line over the library. Each command parses flags and calls one function."""

from __future__ import annotations

import argparse
import sys
from contextlib import contextmanager
from pathlib import Path

from skingpt4.cli import research as cli_research
from skingpt4.errors import InputError, SkinGPT4Error
from skingpt4.images import ImageRejected
from skingpt4.net import is_loopback

EXAMPLES = {
    "create-tiny-model": "skingpt4 create-tiny-model ./tiny",
    "convert": (
        "skingpt4 convert --vit eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \\\n"
        "    --llm ./Llama-2-13b-chat-hf --projection skingpt4_llama2_13bchat_base_pretrain_stage2.pth \\\n"
        "    --out ./skingpt4"
    ),
    "chat": "skingpt4 chat --model ./skingpt4 --image lesion.jpg      (or --model tiny to try it offline)",
    "diagnose": "skingpt4 diagnose --model ./skingpt4 photos/ manifest.jsonl --out results.jsonl --greedy",
    "demo": "skingpt4 demo --model ./skingpt4      (then open http://127.0.0.1:7860; --model tiny to try it)",
    "serve": (
        "SKINGPT4_API_KEY=secret skingpt4 serve --model ./skingpt4 --port 8000\n"
        "  then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret').chat.completions.create(...)"
    ),
    "records": "skingpt4 records list | skingpt4 records export --out all.jsonl | skingpt4 records delete --all",
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        if getattr(args, "record", True) is False and (args.records or args.keep_images):
            raise InputError("--records and --keep-images take effect with --record")
        return args.run(args) or 0
    except (SkinGPT4Error, ImageRejected) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # a path that cannot be created, read or written
        where = f": {exc.filename}" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skingpt4", description="SkinGPT-4 dermatology assistant (research use)")
    commands = parser.add_subparsers(title="commands")

    def command(name: str, help: str, run, example: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help, description=help, epilog=f"example:\n  {example or EXAMPLES[name]}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )  # fmt: skip
        sub.set_defaults(run=run)
        return sub

    tiny = command("create-tiny-model", "write a random, UNTRAINED tiny model folder (for trying the software)",
                   cmd_create_tiny)  # fmt: skip
    tiny.add_argument("out", help="folder to create")
    tiny.add_argument("--seed", type=int, default=0)

    conv = command("convert", "convert the original checkpoints into one model folder", cmd_convert)
    conv.add_argument("--out", required=True, help="folder to create")
    conv.add_argument("--llm", required=True, help="Llama-family model folder or hub id (Llama-2-13b-chat, Vicuna)")
    conv.add_argument("--projection", required=True, help="SkinGPT-4 / MiniGPT-4 .pth with llama_proj.*")
    conv.add_argument("--vit", help="LAVIS eva_vit_g.pth")
    conv.add_argument("--qformer", help="LAVIS blip2_pretrained_flant5xxl.pth")
    conv.add_argument("--blip2", help="instead of --vit/--qformer: HF folder or id like Salesforce/blip2-flan-t5-xxl")
    conv.add_argument("--vit-heads", type=int, help="attention heads of the ViT (EVA ViT-g: 16)")
    conv.add_argument("--qformer-heads", type=int, help="attention heads of the Q-Former (BERT-base: 12)")
    conv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast weights (default: keep)")
    conv.add_argument("--shard-size-gb", type=float, help="largest output shard (default 2 GB)")
    conv.add_argument("--template", help="prompt template recorded in the folder (default skingpt4)")

    chat = command("chat", "chat in the terminal about skin photos", cmd_chat)
    _model_flags(chat)
    _generation_flags(chat)
    chat.add_argument("--image", action="append", default=[], help="photo to start with (repeatable)")
    _record_flags(chat)

    diag = command("diagnose", "diagnose images in bulk: one record per image, resumable", cmd_diagnose)
    _model_flags(diag)
    _generation_flags(diag)
    diag.add_argument("inputs", nargs="+", help="image files, folders, or manifests (.jsonl/.csv with 'image')")
    diag.add_argument("--out", required=True, help="results file: .jsonl or .csv (appended to; reruns skip done)")
    diag.add_argument("--prompt", action="append", help="question to ask (repeatable: asked in order)")
    diag.add_argument("--clinical", action="store_true", help="ask the paper's four clinical prompts in order")
    diag.add_argument("--batch-size", type=int, default=8)
    diag.add_argument("--no-progress", action="store_true")
    _record_flags(diag)

    demo = command("demo", "the local web app (binds to 127.0.0.1 unless --host is given)", cmd_demo)
    _model_flags(demo)
    _generation_flags(demo)
    demo.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--auth-file", help="file of user:password lines required to open the app (recommended)")
    demo.add_argument("--auth", help="user:password (visible in the process list: prefer --auth-file)")
    demo.add_argument("--queue-size", type=int, default=16, help="requests that may wait for the model")
    _record_flags(demo)

    serve = command("serve", "an OpenAI-compatible HTTP API (binds to 127.0.0.1 unless --host is given)", cmd_serve)
    _model_flags(serve)
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-file", help="file holding the API key (or set SKINGPT4_API_KEY)")
    serve.add_argument("--max-body-mb", type=float, help="largest request body (default 20)")
    serve.add_argument("--max-image-mb", type=float, help="largest image (default 10)")
    serve.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default 1024)")
    serve.add_argument("--queue-size", type=int, help="requests that may wait; more get 503 (default 8)")
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: SSRF)")
    serve.add_argument("--image-root", help="allow file:// image paths under this folder")
    _record_flags(serve)

    records = command("records", "list, export or delete consultation records", cmd_records)
    records.add_argument("action", choices=["list", "export", "delete"])
    records.add_argument("--records", help="records database (default: in the user's data folder)")
    records.add_argument("--id", action="append", default=[], help="consultation id (repeatable)")
    records.add_argument("--all", action="store_true", help="delete: every record")
    records.add_argument("--older-than", type=float, metavar="DAYS", help="delete: records not updated for DAYS")
    records.add_argument("--out", help="export: JSON Lines file (default: standard output)")
    cli_research.add_commands(command)
    return parser


def _record_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true", help="keep consultation records (off by default)")
    parser.add_argument("--records", help="records database (default: in the user's data folder)")
    parser.add_argument("--keep-images", action="store_true", help="records keep the photos' pixels too")


def _model_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="model folder from `skingpt4 convert`, or `tiny`")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--dtype", help="float32, float16 or bfloat16 (default: float16 on GPU, float32 on CPU)")
    parser.add_argument("--device-map", help="`auto` to spread the model over several GPUs")
    parser.add_argument("--load-in-8bit", action="store_true", help="LLM in 8-bit (CUDA + bitsandbytes)")
    parser.add_argument("--load-in-4bit", action="store_true", help="LLM in 4-bit NF4 (CUDA + bitsandbytes)")
    parser.add_argument("--template", help="prompt template: skingpt4 (default) or llama2")


def _generation_flags(parser: argparse.ArgumentParser) -> None:
    """Defaults live in `GenerationSettings` (the released demo's); a flag left out keeps them."""
    parser.add_argument("--greedy", action="store_true", help="greedy decoding (default: sample, as the original)")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--max-new-tokens", type=int, help="new tokens per answer")
    parser.add_argument("--temperature", type=float)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--num-beams", type=int)
    parser.add_argument("--repetition-penalty", type=float)


GENERATION_FLAGS = ("max_new_tokens", "temperature", "top_p", "num_beams", "repetition_penalty", "seed")


def _settings(args):
    from skingpt4.chat import GenerationSettings

    given = {name: getattr(args, name) for name in GENERATION_FLAGS if getattr(args, name) is not None}
    return GenerationSettings(do_sample=not args.greedy, **given)


def _engine(args):
    from skingpt4.chat import ChatEngine
    from skingpt4.conversation import get_template
    from skingpt4.model import load_model

    if args.template:
        try:
            get_template(args.template)
        except ValueError as exc:
            raise InputError(str(exc)) from None
    loaded = load_model(args.model, args.device, args.dtype, args.device_map, args.load_in_8bit, args.load_in_4bit)
    return ChatEngine(loaded, args.template)


def cmd_create_tiny(args) -> int:
    from skingpt4.model import create_tiny_model

    out = create_tiny_model(args.out, seed=args.seed)
    print(f"wrote an UNTRAINED tiny random model to {out} (for trying the software; its answers are noise)")
    return 0


def cmd_convert(args) -> int:
    from skingpt4.convert import ConvertOptions, convert

    optional = {name: getattr(args, name) for name in ("vit_heads", "qformer_heads", "dtype", "template")}
    if args.shard_size_gb is not None:
        optional["max_shard_bytes"] = int(args.shard_size_gb * 2**30)
    options = ConvertOptions(
        llm=args.llm,
        projection=Path(args.projection),
        vit=Path(args.vit) if args.vit else None,
        qformer=Path(args.qformer) if args.qformer else None,
        blip2=args.blip2,
        **{name: value for name, value in optional.items() if value is not None},
    )
    print(f"converted into {convert(options, args.out)}")
    return 0


@contextmanager
def _records(args, engine):
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


def _announce(engine) -> None:
    from skingpt4.serve.safety import INTENDED_USE

    print(INTENDED_USE, file=sys.stderr)
    if engine.loaded.warning:
        print(f"WARNING: {engine.loaded.warning}", file=sys.stderr)


def cmd_chat(args) -> int:
    from skingpt4.serve.terminal import run_chat

    settings, engine = _settings(args), _engine(args)
    with _records(args, engine) as store:
        return run_chat(engine, settings, args.image, store=store)


def cmd_demo(args) -> int:
    from skingpt4.serve.web_launch import WebConfig, launch, parse_auth, read_auth_file

    auth = [parse_auth(args.auth)] if args.auth else []
    auth += read_auth_file(args.auth_file) if args.auth_file else []
    config = WebConfig(host=args.host, port=args.port, auth=auth or None, queue_size=args.queue_size,
                       settings=_settings(args))  # fmt: skip
    engine = _engine(args)
    _announce(engine)
    with _records(args, engine) as store:
        launch(engine, config, store)  # prints the address; blocks until Ctrl+C or SIGTERM
    return 0


def cmd_serve(args) -> int:
    import os

    from skingpt4.serve.api import ServeConfig, serve

    key = os.environ.get("SKINGPT4_API_KEY")
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise InputError(f"{args.api_key_file} is empty")
    options = {name: getattr(args, name) for name in ("max_body_mb", "max_image_mb", "max_tokens", "queue_size")}
    config = ServeConfig(
        host=args.host, port=args.port, api_key=key or None, allow_remote_images=args.allow_remote_images,
        image_root=args.image_root, **{k: v for k, v in options.items() if v is not None},
    )  # fmt: skip
    engine = _engine(args)
    _announce(engine)
    if not is_loopback(config.host) and not config.api_key:
        print(f"WARNING: serving on {config.host} without an API key: anyone who can reach it can use it",
              file=sys.stderr)  # fmt: skip
    with _records(args, engine) as store:
        print(f"serving {engine.loaded.model_id} on http://{config.host}:{config.port}/v1", file=sys.stderr)
        serve(engine, config, store)
    return 0


def cmd_records(args) -> int:
    from skingpt4.serve.records import RecordStore, default_records_path

    path = Path(args.records) if args.records else default_records_path()
    if not path.is_file():  # never create an empty database here: "deleted 0" would look like an erasure
        raise InputError(f"no records database at {path} (records are kept with --record)")
    with RecordStore(path) as store:
        if args.action == "list":
            for row in store.list():
                print(f"{row['id']}  {row['updated']}  {row['surface']:<8} {row['model_id']}  "
                      f"{row['images']} images, {row['turns']} turns")  # fmt: skip
        elif args.action == "export":
            count = store.export(args.out or sys.stdout, args.id or None)
            print(f"exported {count} records" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
        else:
            print(f"deleted {_delete(store, args)} records")
    return 0


def _delete(store, args) -> int:
    chosen = [bool(args.id), args.all, args.older_than is not None]
    if sum(chosen) != 1:
        raise InputError("delete needs exactly one of --id, --all or --older-than DAYS")
    if args.all:
        return store.delete_all()
    if args.older_than is not None:
        return store.purge_older_than(args.older_than)
    return store.delete(args.id)


def cmd_diagnose(args) -> int:
    from skingpt4.conversation import CLINICAL_PROMPTS
    from skingpt4.serve.diagnose import RecordFile, collect, diagnose

    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.clinical and args.prompt:
        raise InputError("use either --clinical or --prompt, not both")
    settings = _settings(args)
    items = collect(args.inputs)
    out = RecordFile(args.out)
    engine = _engine(args)
    _announce(engine)
    prompts = list(CLINICAL_PROMPTS) if args.clinical else args.prompt
    with _records(args, engine) as store:
        summary = diagnose(engine, items, out, prompts, settings, args.batch_size, not args.no_progress, store)
    print(f"{summary.done} diagnosed, {summary.failed} failed, {summary.skipped} already done -> {args.out}")
    if summary.stale:
        print(f"note: {summary.stale} of the images already done were answered by another model or other prompts; "
              "they were kept as they are (write to a new --out to redo them)", file=sys.stderr)  # fmt: skip
    return 1 if out.failures({item.key for item in items}) else 0  # earlier runs' failures count too


def _quiet_libraries() -> None:
    """Keep library progress bars and advice out of the user's terminal; our own messages say what matters."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
