"""The skingpt4 plugin for vLLM: with `pip install "skingpt4[vllm]"`, vLLM serves SkinGPT-4 folders correctly.

vLLM finds `register` through the `vllm.general_plugins` entry point (pyproject.toml) in every process it starts,
and may call it more than once. It names the model class by its module path, so vLLM imports it (and CUDA with it)
only where a model is built. The class, `vllm_model.SkinGPT4ForConditionalGeneration`, is vLLM's BLIP-2 with what
SkinGPT-4 needs (README, "Serving on vLLM"): each `<image>` in the prompt becomes its photo's 32 slots in place,
several photos per prompt, the `<image>` id never generated, and the original's `ln_vision` eps. Folders from
`convert` name this class in `config.json`, so a vLLM without the plugin refuses them instead of placing the photos
wrongly.
"""

from __future__ import annotations

from skingpt4.folder.serving import ARCHITECTURE


def register() -> None:
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "skingpt4.backends.vllm_model:SkinGPT4ForConditionalGeneration")
