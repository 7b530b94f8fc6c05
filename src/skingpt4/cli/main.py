"""`skingpt4 ...`: parse, dispatch, and turn every expected failure into one line on stderr and a non-zero exit.

The commands live in one module per family (`weights`, `consult`, `research`); each registers its subcommands
through the `command` factory below and calls one library function per command.
"""

from __future__ import annotations

import argparse
import inspect
import sys

from skingpt4.cli import consult, research, weights
from skingpt4.errors import InputError, SkinGPT4Error
from skingpt4.inputs.images import ImageRejected
from skingpt4.text import readable

RESUMABLE = {"diagnose", "eval", "train"}  # their output records what is done; a rerun skips it


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
        print(f"error: {readable(str(exc))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`records export | head`): stop quietly, as `cat` does
        _quiet_stdout()
        return 141  # 128 + SIGPIPE
    except OSError as exc:  # a path that cannot be created, read or written
        where = f": {exc.filename}" if exc.filename else ""
        print(readable(f"error: {exc.strerror or exc}{where}"), file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " (run the same command again to resume where it stopped)" if args.command in RESUMABLE else ""
        print(f"interrupted{resume}", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skingpt4", description="SkinGPT-4 dermatology assistant (research use)")
    commands = parser.add_subparsers(title="commands")

    def command(name: str, run) -> argparse.ArgumentParser:
        help, _, example = inspect.cleandoc(run.__doc__).partition("\n\n")
        sub = commands.add_parser(
            name,
            help=help,
            description=help,
            epilog=f"example:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        sub.set_defaults(run=run, command=name)
        return sub

    for family in (weights, consult, research):
        family.add_commands(command)
    return parser


def _quiet_stdout() -> None:
    """Point standard output at /dev/null, so that flushing it at exit does not raise again."""
    import os

    try:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except (OSError, ValueError):  # a stdout without a file descriptor (a test's capture): nothing to flush there
        pass


def _quiet_libraries() -> None:
    """Keep library progress bars and advice out of the user's terminal; our own messages say what matters.

    Environment variables, read when transformers is imported: importing it here would cost a second before any
    command could start (the chat shows its prompt while the model still loads).
    """
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (an embedding program, the tests): tell it directly
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
