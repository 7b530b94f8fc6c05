"""The research commands: `prepare-data`, `train`, `eval` and `review`; each calls one library function."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from skingpt4.cli import flags
from skingpt4.errors import InputError


def add_commands(command) -> None:
    """`command(name, run)` makes a subparser (main.py's factory: help and example from `run`'s docstring)."""
    prepare_data_flags(command("prepare-data", cmd_prepare_data))
    tr = command("train", cmd_train)
    tr.add_argument("--config", required=True, help="YAML of settings (configs/train/*.yaml are the recipe's)")
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override one setting")
    tr.add_argument("--resume", action="store_true", help="continue from the output folder's last checkpoint")
    tr.add_argument("--no-progress", action="store_true")
    eval_flags(command("eval", cmd_eval))
    review_flags(command("review", cmd_review))


def prepare_data_flags(data) -> None:
    data.add_argument("format", help="skincon, folder, dermnet, fitzpatrick17k, ddi, ham10000, pad-ufes-20, minigpt4")
    data.add_argument("source", help="the set's metadata CSV, or its folder (folder, dermnet, minigpt4)")
    data.add_argument("--out", required=True, help="manifest.jsonl to write, or a folder with --layout minigpt4")
    data.add_argument("--images", help="where the images are (default: beside the CSV)")
    data.add_argument("--concepts", help="CSV of image -> clinical concepts, prefixed to step-2 captions")
    data.add_argument("--mapping", help="YAML or CSV regrouping classes (e.g. into the paper's 15 groups)")
    data.add_argument("--split", default="0.8,0.1,0.1", help="train,val,test fractions, by patient/lesion")
    data.add_argument("--seed", type=int, default=0)
    data.add_argument("--layout", choices=["manifest", "minigpt4"], default="manifest")
    data.add_argument("--no-image-check", action="store_true", help="do not decode every image (faster)")
    data.add_argument("--drop-duplicates", action="store_true", help="keep one copy of identical images")
    data.add_argument("--overwrite", action="store_true")
    data.add_argument(
        "--stratify",
        action="store_true",
        help="balance classes across splits (default: each image's "
        "split follows from its content and the seed alone, the same in every manifest)",
    )
    data.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="MANIFEST[:SPLIT]",
        help="leave out images found in another manifest (or one of its splits); repeatable",
    )
    data.add_argument(
        "--label-column",
        help="fitzpatrick17k: label (114 classes, default), three_partition_label or nine_partition_label",
    )
    data.add_argument(
        "--skin-type-columns",
        help="fitzpatrick17k: columns tried in order for the skin type "
        "(default fitzpatrick_scale,fitzpatrick_centaur: the scale, else Centaur's estimate)",
    )


def eval_flags(ev) -> None:
    flags.model_flags(ev, several=True)
    ev.add_argument(
        "--data",
        required=True,
        action="append",
        help="manifest (.jsonl/.csv with image, label), folder or image; repeatable",
    )
    ev.add_argument("--out", required=True, help="folder for predictions.jsonl, metrics.json and report.html")
    ev.add_argument(
        "--mode",
        choices=["open", "choice"],
        default="open",
        help="open: match the free answer to a label; choice: rank every label by likelihood",
    )
    ev.add_argument(
        "--protocol",
        choices=["diagnosis", "clinical"],
        default="diagnosis",
        help="clinical: the paper's four prompts per case, transcripts for `skingpt4 review`",
    )
    ev.add_argument(
        "--labels",
        help="comma-separated label set, or paper15, ham10000, fitzpatrick17k(-3/-9), ddi "
        "(default: the manifest's labels)",
    )
    ev.add_argument(
        "--split",
        help="manifest rows to score: train, val, test or all (default: test when the manifest has splits, else all)",
    )
    ev.add_argument("--repeats", type=int, default=1, help="K sampled runs per case: the consistency ratio")
    ev.add_argument("--question", help="the question asked (default: the demo's first question)")
    ev.add_argument("--batch-size", type=int, default=8)
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--max-new-tokens", type=int)
    ev.add_argument("--temperature", type=float, help="sample (default: greedy, or sampling with --repeats)")
    ev.add_argument("--top-p", type=float)
    ev.add_argument("--no-progress", action="store_true")


def review_flags(review) -> None:
    review.add_argument("transcripts", help="transcripts.jsonl from `skingpt4 eval --protocol clinical`, or `summary`")
    review.add_argument("--store", help="ratings database (default: ratings.sqlite beside the transcripts)")
    review.add_argument("--references", help="the clinician's own answers (.csv or .jsonl with case, answer)")
    review.add_argument("--host", default="127.0.0.1", help="interface to bind (default: this machine only)")
    review.add_argument("--port", type=int, default=7870)
    review.add_argument(
        "--raters",
        help="comma-separated names: each gets a link of their own (printed at start); "
        "names cannot then be typed in, nor a cookie edited to rate as another",
    )
    review.add_argument("--out", help="summary: folder for ratings.csv, summary.json and agreement.png")
    review.add_argument("--key", help="summary: blinding-key.json of `eval` with several models: ratings per model")


def cmd_prepare_data(args) -> int:
    """turn a public dermatology set or a class folder into a training manifest

    skingpt4 prepare-data skincon annotations_fitzpatrick17k.csv --images fitzpatrick17k/ \\
          --out data/skincon/manifest.jsonl
      skingpt4 prepare-data dermnet dermnet/ --mapping groups.yaml --out data/dermnet/manifest.jsonl
    """
    from skingpt4.data.prepare import prepare

    try:
        fractions = tuple(float(x) for x in args.split.split(","))
    except ValueError:
        fractions = ()
    if len(fractions) != 3:
        raise InputError("--split takes three fractions, e.g. 0.8,0.1,0.1")
    report = prepare(
        args.format,
        Path(args.source),
        Path(args.out),
        images=flags.optional_path(args.images),
        concepts=flags.optional_path(args.concepts),
        mapping=flags.optional_path(args.mapping),
        fractions=fractions,
        seed=args.seed,
        layout=args.layout,
        check_images=not args.no_image_check,
        drop_duplicates=args.drop_duplicates,
        overwrite=args.overwrite,
        stratify=args.stratify,
        exclude=args.exclude,
        adapter_options=_adapter_options(args),
    )
    print(report.text())
    return 0


def _adapter_options(args) -> dict:
    options = {"label_column": args.label_column} if args.label_column else {}
    if args.skin_type_columns:
        options["skin_type_columns"] = tuple(c.strip() for c in args.skin_type_columns.split(",") if c.strip())
    return options


def cmd_train(args) -> int:
    """the two-step recipe on your data: train the projection (optionally LoRA); resumable

    skingpt4 train --config configs/train/step1_concepts.yaml [--set batch_size=4 --set data=my.jsonl]
      torchrun --nproc_per_node 4 -m skingpt4 train --config configs/train/step2_diagnosis.yaml
    """
    import yaml

    from skingpt4.train.loop import load_config, train

    overrides = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--set takes KEY=VALUE, not {item!r}")
        overrides[key.strip()] = yaml.safe_load(value) if value else None  # "4" -> 4, "true" -> True, text stays
    result = train(load_config(Path(args.config), overrides), resume=args.resume, progress=not args.no_progress)
    last = f"; last loss {result.losses[-1]:.4f}" if result.losses else ""
    val = f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""
    print(f"{result.steps} steps in {result.seconds:.0f} s{last}{val} -> {result.output_dir}")
    if result.model_dir:
        print(f"model folder (use with --model): {result.model_dir}")
    if result.pth:
        print(f"SkinGPT-4 projection checkpoint: {result.pth}")
    return 0


def cmd_eval(args) -> int:
    """measure diagnostic accuracy on a labelled set (by skin type, with intervals); resumable; several models
    head to head

    skingpt4 eval --model ./skingpt4 --data test.jsonl --out results/ --mode choice
      skingpt4 eval --model ./skingpt4 --data test.jsonl --out clinical/ --protocol clinical
      skingpt4 eval --model ./skingpt4 --model ./other --data test.jsonl --out compared/
    """
    from skingpt4.data.manifest import collect
    from skingpt4.evaluate.run import choose_split

    if args.batch_size < 1 or args.repeats < 1:
        raise InputError("--batch-size and --repeats must be at least 1")
    names = model_names(args.model)
    for model in args.model:  # every model-flag conflict (--quantize with --mode choice...) before any work
        flags.check_model_flags(argparse.Namespace(**{**vars(args), "model": model}))
    items, split, warnings = choose_split(collect(args.data), args.split)  # before the model loads: bad input
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if len(names) == 1:
        return _eval_one(argparse.Namespace(**{**vars(args), "model": args.model[0]}), items, split, len(warnings))
    status = 0
    for name, model in zip(names, args.model):
        print(f"model {name}: {model}", file=sys.stderr)
        one = argparse.Namespace(**{**vars(args), "model": model, "out": str(Path(args.out) / name)})
        status = max(status, _eval_one(one, items, split, len(warnings)))
    folders = {name: Path(args.out) / name for name in names}
    if args.protocol == "clinical":
        from skingpt4.evaluate.outputs import blind

        files = blind(folders, Path(args.out), args.seed)
        print(
            f"blinded transcripts for `skingpt4 review`: {files['transcripts']}; which model wrote which: "
            f"{files['key']} (keep it from the raters; `review summary --key` reads it)"
        )
    else:
        from skingpt4.evaluate.compare import head_to_head

        print(head_to_head(folders, Path(args.out), args.bootstrap))
    return status


def model_names(models: list[str]) -> list[str]:
    """Each model's name in a comparison (its folder's name; `tiny`), made unique, and refused if given twice."""
    if len(set(models)) < len(models):
        raise InputError("--model: the same model is given twice")
    names: list[str] = []
    for model in models:
        name = Path(model).name or model
        names.append(name if name not in names else f"{name}-{len(names) + 1}")
    return names


def _eval_one(args, items, split: str, warned: int) -> int:
    """One model's evaluation into `args.out`; its exit status (1 when images failed, as diagnose)."""
    from skingpt4.evaluate.run import run_eval
    from skingpt4.inputs.conversation import DEFAULT_QUESTION

    labels = args.labels
    if labels and "," in labels:
        labels = [label.strip() for label in labels.split(",") if label.strip()]
    engine = flags.engine(args)
    flags.announce(engine)
    try:
        result = run_eval(
            engine,
            items,
            Path(args.out),
            labels=labels,
            mode=args.mode,
            settings=_eval_settings(args),
            seed=args.seed,
            batch_size=args.batch_size,
            repeats=args.repeats,
            protocol=args.protocol,
            question=args.question or DEFAULT_QUESTION,
            n_boot=args.bootstrap,
            progress=not args.no_progress,
            split=split,
        )
    finally:
        engine.close()  # before the next model loads
    for warning in result["warnings"][warned:]:  # found while scoring (training images, by content)
        print(f"warning: {warning}", file=sys.stderr)
    metrics = result.get("metrics") or {}
    accuracy = (metrics.get("accuracy") or {}).get("value")
    line = f"{result['done']} answered, {result['failed']} failed, {result['skipped']} already done"
    print(f"{line} (split: {split}) -> {args.out}" + (f"; accuracy {accuracy:.3f}" if accuracy is not None else ""))
    return 1 if result["errors"] else 0  # as diagnose: any image whose latest record is an error


def _eval_settings(args):
    """Greedy unless sampling is asked for (`--temperature`, `--top-p`, `--repeats`); None: run_eval's defaults."""
    from skingpt4.engine.settings import GenerationSettings

    given = {n: getattr(args, n) for n in ("max_new_tokens", "temperature", "top_p") if getattr(args, n) is not None}
    if not given:
        return None
    return GenerationSettings(do_sample="temperature" in given or "top_p" in given or args.repeats > 1, **given)


def cmd_review(args) -> int:
    """rate clinical transcripts as a dermatologist (local web page), or summarise ratings

    skingpt4 review results/transcripts.jsonl --store ratings.sqlite      (then open http://127.0.0.1:7870)
      skingpt4 review summary --store ratings.sqlite --out review-summary/
    """
    if args.transcripts == "summary":
        from skingpt4.review.stats import format_summary, summary

        if not args.store:
            raise InputError("review summary needs --store (the ratings database)")
        key = flags.optional_path(args.key)
        print(format_summary(summary(Path(args.store), flags.optional_path(args.out), key)))
        return 0
    from skingpt4.net import check_port
    from skingpt4.review.page import serve_review

    check_port(args.host, args.port)  # before the transcripts and the store are read
    raters = [name.strip() for name in args.raters.split(",") if name.strip()] if args.raters else None
    transcripts = Path(args.transcripts)
    store = Path(args.store) if args.store else transcripts.parent / "ratings.sqlite"
    try:
        references = flags.optional_path(args.references)
        serve_review(transcripts, store, host=args.host, port=args.port, references=references, raters=raters)
    except KeyboardInterrupt:  # the server stops on Ctrl+C or SIGTERM; the ratings are already saved
        pass
    print(f"ratings are in {store}", file=sys.stderr)
    return 0
