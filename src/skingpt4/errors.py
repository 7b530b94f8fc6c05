"""Errors a user can act on. Each carries one human-readable line; the CLI prints it and exits non-zero."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (or its type's name), for one-line reports."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


class SkinGPT4Error(Exception):
    """Base class: a message meant for the person at the keyboard, not a traceback."""


class ModelLoadError(SkinGPT4Error):
    """A model folder, tokenizer or device/precision request that cannot be honoured."""


class ConversionError(SkinGPT4Error):
    """An original checkpoint that cannot be converted exactly (wrong shapes, unknown keys, bad files)."""


class InputError(SkinGPT4Error):
    """Bad user input: a missing file, a malformed manifest, an option out of range."""


class Cancelled(SkinGPT4Error):
    """Generation stopped on request (the client went away); the question was withdrawn."""


# What the quantized back end cannot do, said where a flag is checked (before loading) and where it is refused.
NO_BEAMS = "beam search needs the unquantized model; --quantize answers greedy or sampled"
NEEDS_TRANSFORMERS = "reads the LLM's hidden states: run it without --quantize (open mode works)"
