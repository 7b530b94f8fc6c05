"""Errors a user can act on. Each carries one human-readable line; the CLI prints it and exits non-zero."""


class SkinGPT4Error(Exception):
    """Base class: a message meant for the person at the keyboard, not a traceback."""


class ModelLoadError(SkinGPT4Error):
    """A model folder, tokenizer or device/precision request that cannot be honoured."""


class ConversionError(SkinGPT4Error):
    """An original checkpoint that cannot be converted exactly (wrong shapes, unknown keys, bad files)."""


class InputError(SkinGPT4Error):
    """Bad user input: a missing file, a malformed manifest, an option out of range."""
