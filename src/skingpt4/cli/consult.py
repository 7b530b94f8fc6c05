"""The consultation commands: `chat`, `demo`, `serve`, `diagnose` and `records`."""

from __future__ import annotations

import sys
from pathlib import Path

from skingpt4.cli import flags
from skingpt4.errors import InputError
from skingpt4.net import check_port, exposure_warning


def add_commands(command) -> None:
    """`command(name, run)` makes a subparser (main.py's factory: help and example from `run`'s docstring)."""
    chat_flags(command("chat", cmd_chat))
    diagnose_flags(command("diagnose", cmd_diagnose))
    demo_flags(command("demo", cmd_demo))
    serve_flags(command("serve", cmd_serve))
    records_flags(command("records", cmd_records))


def chat_flags(chat) -> None:
    flags.model_flags(chat)
    flags.generation_flags(chat)
    chat.add_argument("--image", action="append", default=[], help="photo to start with (repeatable)")
    flags.record_flags(chat)


def diagnose_flags(diag) -> None:
    flags.model_flags(diag)
    flags.generation_flags(diag)
    diag.add_argument("inputs", nargs="+", help="image files, folders, or manifests (.jsonl/.csv with 'image')")
    diag.add_argument("--out", required=True, help="results file: .jsonl or .csv (appended to; reruns skip done)")
    diag.add_argument("--prompt", action="append", help="question to ask (repeatable: asked in order)")
    diag.add_argument("--clinical", action="store_true", help="ask the paper's four clinical prompts in order")
    diag.add_argument("--batch-size", type=int, default=8)
    diag.add_argument("--no-progress", action="store_true")
    flags.record_flags(diag)


def check_image_mb(mb: float) -> float:
    """An upload cap the image loader can honour (it reads 50 MiB at most)."""
    from skingpt4.inputs.images import DEFAULT_LIMITS

    largest = DEFAULT_LIMITS.max_bytes / 2**20
    if not 0 < mb <= largest:
        raise InputError(
            f"--max-image-mb must be in (0, {largest:g}] (the image loader reads {largest:g} MiB at most)"
        )
    return mb


def demo_flags(demo) -> None:
    flags.model_flags(demo, engine="auto")
    flags.generation_flags(demo)
    demo.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    demo.add_argument("--port", type=int, default=7860)
    demo.add_argument("--auth-file", help="file of user:password lines required to open the app (recommended)")
    demo.add_argument("--auth", help="user:password (visible in the process list: prefer --auth-file)")
    demo.add_argument("--max-image-mb", type=float, default=10.0, help="largest photo upload (default 10)")
    flags.queue_flag(demo)
    flags.connection_flags(demo)
    flags.record_flags(demo)


def serve_flags(serve) -> None:
    flags.model_flags(serve, engine="auto")
    serve.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key-file", help="file holding the API key (or set SKINGPT4_API_KEY)")
    serve.add_argument("--max-body-mb", type=float, help="largest request body (default 20)")
    serve.add_argument("--max-image-mb", type=float, help="largest image (default 10)")
    serve.add_argument("--max-tokens", type=int, help="largest max_tokens a request may ask (default 1024)")
    flags.queue_flag(serve)
    serve.add_argument("--allow-remote-images", action="store_true", help="fetch http(s) image URLs (off: SSRF)")
    serve.add_argument("--image-root", help="allow file:// image paths under this folder")
    serve.add_argument(
        "--served-model-name", help="the model id clients see (default: the folder's name and fingerprint)"
    )
    flags.connection_flags(serve)
    flags.record_flags(serve)


def records_flags(records) -> None:
    records.add_argument("action", choices=["list", "export", "delete"])
    records.add_argument("--records", help="records database (default: in the user's data folder)")
    records.add_argument("--id", action="append", default=[], help="consultation id (repeatable)")
    records.add_argument("--all", action="store_true", help="delete: every record")
    records.add_argument("--older-than", type=float, metavar="DAYS", help="delete: records not updated for DAYS")
    records.add_argument("--out", help="export: JSON Lines file (default: standard output)")
    records.add_argument("--yes", action="store_true", help="delete --all: do not ask for confirmation")


def cmd_chat(args) -> int:
    """chat in the terminal about skin photos

    skingpt4 chat --model ./skingpt4 --image lesion.jpg      (or --model tiny to try it offline)
    """
    from skingpt4.inputs.images import load_image
    from skingpt4.serve.terminal import run_chat

    settings = flags.settings(args)
    for path in args.image:  # a bad photo at start is bad input: say so before the model loads, and stop
        load_image(Path(path))
    # Photos given at start and records (their model hash) need the model first; otherwise the prompt shows
    # at once and the first question waits for the model.
    engine = flags.engine(args) if args.image or args.record else flags.engine_loading(args)
    with flags.records_store(args, engine) as store:
        return run_chat(engine, settings, args.image, store=store)


def cmd_demo(args) -> int:
    """the local web app (binds to 127.0.0.1 unless --host is given)

    skingpt4 demo --model ./skingpt4      (then open http://127.0.0.1:7860; --model tiny to try it)
    """
    from skingpt4.serve.web_launch import WebConfig, launch, parse_auth, read_auth_file

    auth = [parse_auth(args.auth)] if args.auth else []
    auth += read_auth_file(args.auth_file) if args.auth_file else []
    config = WebConfig(
        host=args.host,
        port=args.port,
        auth=auth or None,
        settings=flags.settings(args),
        **{k: getattr(args, k) for k in ("request_timeout_s", "max_connections") if getattr(args, k) is not None},
        max_image_mb=check_image_mb(args.max_image_mb),
    )
    check_port(config.host, config.port)  # before the model loads
    engine = flags.engine(args)
    flags.announce(engine)
    with flags.records_store(args, engine) as store:
        launch(engine, config, store)  # prints the address; blocks until Ctrl+C or SIGTERM
    return 0


def cmd_serve(args) -> int:
    """an OpenAI-compatible HTTP API (binds to 127.0.0.1 unless --host is given)

    SKINGPT4_API_KEY=secret skingpt4 serve --model ./skingpt4 --port 8000
      then: OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='secret').chat.completions.create(...)
    """
    import os

    from skingpt4.serve.api import ServeConfig, serve

    key = os.environ.get("SKINGPT4_API_KEY")
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise InputError(f"{args.api_key_file} is empty")
    names = ("max_body_mb", "max_image_mb", "max_tokens", "request_timeout_s", "max_connections", "served_model_name")
    options = {name: getattr(args, name) for name in names}
    config = ServeConfig(
        host=args.host,
        port=args.port,
        api_key=key or None,
        allow_remote_images=args.allow_remote_images,
        image_root=args.image_root,
        **{k: v for k, v in options.items() if v is not None},
    )
    check_port(config.host, config.port)  # before the model loads
    engine = flags.engine(args, max_images=config.max_images)
    flags.announce(engine)
    if warning := exposure_warning(config.host, "" if config.api_key else "an API key", "use the model"):
        print(warning, file=sys.stderr)
    try:
        with flags.records_store(args, engine) as store:
            print(f"serving {engine.info.model_id} on http://{config.host}:{config.port}/v1", file=sys.stderr)
            serve(engine, config, store)
    finally:
        engine.close()
    return 0


def cmd_records(args) -> int:
    """list, export or delete consultation records

    skingpt4 records list
      skingpt4 records export --out all.jsonl
      skingpt4 records delete --older-than 30
    """
    from skingpt4.serve.records import RecordStore, default_records_path

    path = Path(args.records) if args.records else default_records_path()
    if not path.is_file():  # never create an empty database here: "deleted 0" would look like an erasure
        raise InputError(f"no records database at {path} (records are kept with --record)")
    with RecordStore(path) as store:
        known = {row["id"] for row in store.list()}
        if missing := [i for i in args.id if i not in known]:  # an id that names nothing is a mistake, not a no-op
            raise InputError(f"no record with id {missing[0]} in {path} (`skingpt4 records list` shows them)")
        if args.action == "list":
            _list(store, path, set(args.id))
        elif args.action == "export":
            count = store.export(args.out or sys.stdout, args.id or None)
            print(f"exported {count} records" + (f" to {args.out}" if args.out else ""), file=sys.stderr)
        else:
            print(f"deleted {_delete(store, args)} records")
    return 0


def _list(store, path: Path, ids: set[str]) -> None:
    rows = [row for row in store.list() if not ids or row["id"] in ids]
    for row in rows:
        print(
            f"{row['id']}  {row['updated']}  {row['surface']:<8} {row['model_id']}  "
            f"{row['images']} images, {row['turns']} turns"
        )
    if not rows:
        print(f"no records in {path}", file=sys.stderr)


def _delete(store, args) -> int:
    chosen = [bool(args.id), args.all, args.older_than is not None]
    if sum(chosen) != 1:
        raise InputError("delete needs exactly one of --id, --all or --older-than DAYS")
    if args.all:
        count = len(store.list())
        if count and not args.yes and not _confirm(f"delete all {count} records in {store.path}? [y/N] "):
            raise InputError("nothing deleted (--yes deletes without asking)")
        return store.delete_all()
    if args.older_than is not None:
        return store.purge_older_than(args.older_than)
    return store.delete(args.id)


MAX_LISTED = 10  # failing images named on the terminal; the records hold every one


def _confirm(question: str) -> bool:
    """A yes from the person at the terminal; with no terminal to ask (a script), no."""
    if not sys.stdin.isatty():
        return False
    return input(question).strip().lower() in ("y", "yes")


def cmd_diagnose(args) -> int:
    """diagnose images in bulk: one record per image, resumable

    skingpt4 diagnose --model ./skingpt4 photos/ manifest.jsonl --out results.jsonl --greedy
    """
    from skingpt4.data.manifest import IMAGE_TYPES, collect
    from skingpt4.inputs.conversation import CLINICAL_PROMPTS
    from skingpt4.serve.diagnose import diagnose, results_file

    if args.batch_size < 1:
        raise InputError("--batch-size must be at least 1")
    if args.clinical and args.prompt:
        raise InputError("use either --clinical or --prompt, not both")
    if any(not prompt.strip() for prompt in args.prompt or []):
        raise InputError("--prompt is empty: give the question to ask")
    if not Path(args.out).expanduser().parent.is_dir():  # a typo must not make folders
        raise InputError(f"--out: no such folder {Path(args.out).expanduser().parent} (create it first)")
    settings = flags.settings(args)
    others: list[Path] = []
    items = collect(args.inputs, others)
    if others:
        print(f"skipped {len(others)} files in the folders that are not images ({IMAGE_TYPES})", file=sys.stderr)
    out = results_file(args.out)
    engine = flags.engine(args)
    flags.announce(engine)
    prompts = list(CLINICAL_PROMPTS) if args.clinical else args.prompt
    with flags.records_store(args, engine) as store:
        summary = diagnose(engine, items, out, prompts, settings, args.batch_size, not args.no_progress, store)
    print(f"{summary.done} diagnosed, {summary.failed} failed, {summary.skipped} already done -> {args.out}")
    failed = out.failures({item.key for item in items})  # earlier runs' failures count too
    for key, error in list(failed.items())[:MAX_LISTED]:
        print(f"failed: {key}: {error}", file=sys.stderr)
    if len(failed) > MAX_LISTED:
        print(
            f"... and {len(failed) - MAX_LISTED} more (the 'error' field of their records says why)", file=sys.stderr
        )
    if len(failed) > summary.failed:
        earlier = len(failed) - summary.failed
        print(f"{earlier} of them failed on an earlier run (a rejected image stays rejected)", file=sys.stderr)
    if summary.stale:
        print(
            f"note: {summary.stale} of the images already done were answered by another model or other prompts; "
            "they were kept as they are (write to a new --out to redo them)",
            file=sys.stderr,
        )
    return 1 if failed else 0
