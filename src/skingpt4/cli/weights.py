"""The model-folder commands: `create-tiny-model` and `convert`."""

from __future__ import annotations

from pathlib import Path

from skingpt4.errors import InputError


def add_commands(command) -> None:
    """`command(name, run)` makes a subparser (main.py's factory: help and example from `run`'s docstring)."""
    tiny = command("create-tiny-model", cmd_create_tiny)
    tiny.add_argument("out", nargs="?", help="folder to create")
    tiny.add_argument("--out", dest="out_option", metavar="OUT", help="the same, as an option")
    tiny.add_argument("--seed", type=int, default=0)

    conv = command("convert", cmd_convert)
    conv.add_argument("--out", help="folder to create (required, unless --upgrade)")
    conv.add_argument("--llm", help="Llama-family model folder or hub id (Llama-2-13b-chat, Vicuna); required")
    conv.add_argument("--projection", help="SkinGPT-4 / MiniGPT-4 .pth with llama_proj.*; required")
    conv.add_argument(
        "--upgrade", metavar="FOLDER", help="instead: add to a folder made before what vLLM and AutoProcessor need"
    )
    conv.add_argument("--vit", help="LAVIS eva_vit_g.pth")
    conv.add_argument("--qformer", help="LAVIS blip2_pretrained_flant5xxl.pth")
    conv.add_argument("--blip2", help="instead of --vit/--qformer: HF folder or id like Salesforce/blip2-flan-t5-xxl")
    conv.add_argument("--vit-heads", type=int, help="attention heads of the ViT (EVA ViT-g: 16)")
    conv.add_argument("--qformer-heads", type=int, help="attention heads of the Q-Former (BERT-base: 12)")
    conv.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast weights (default: keep)")
    conv.add_argument("--shard-size-gb", type=float, help="largest output shard (default 2 GB)")
    conv.add_argument("--template", help="prompt template recorded in the folder (default skingpt4)")


def cmd_create_tiny(args) -> int:
    """write a random, UNTRAINED tiny model folder (for trying the software)

    skingpt4 create-tiny-model ./tiny
    """
    from skingpt4.folder.tiny import create_tiny_model

    if bool(args.out) == bool(args.out_option):
        raise InputError("give the folder to create once: skingpt4 create-tiny-model ./tiny")
    out = create_tiny_model(args.out or args.out_option, seed=args.seed)
    print(f"wrote an UNTRAINED tiny random model to {out} (for trying the software; its answers are noise)")
    return 0


def cmd_convert(args) -> int:
    """convert the original checkpoints into one model folder

    skingpt4 convert --vit eva_vit_g.pth --qformer blip2_pretrained_flant5xxl.pth \\
        --llm ./Llama-2-13b-chat-hf --projection skingpt4_llama2_13bchat_base_pretrain_stage2.pth \\
        --out ./skingpt4
    """
    from skingpt4.folder.convert import ConvertOptions, convert

    if args.upgrade:
        return _upgrade(args)
    missing = [f"--{name}" for name in ("out", "llm", "projection") if not getattr(args, name)]
    if missing:
        raise InputError(f"convert needs {', '.join(missing)} (or --upgrade FOLDER alone)")
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


def _upgrade(args) -> int:
    from skingpt4.folder.meta import model_folder
    from skingpt4.folder.serving import write_serving_files
    from skingpt4.folder.tiny import tiny_model_dir

    if any(getattr(args, name) for name in ("out", "llm", "projection", "vit", "qformer", "blip2")):
        raise InputError("--upgrade FOLDER takes no other source or output: it adds files to FOLDER in place")
    folder = model_folder(args.upgrade) or tiny_model_dir()  # `tiny`: the cached tiny model
    written = write_serving_files(folder)
    print(f"upgraded {folder}: wrote {', '.join(written)} (weights untouched)")
    return 0
