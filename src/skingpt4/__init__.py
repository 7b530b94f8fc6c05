"""SkinGPT-4 on stock transformers."""

__version__ = "0.1.0"
