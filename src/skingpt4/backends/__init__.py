"""Language-model back ends behind the engine's `LanguageModel` protocol (`engine/protocol.py`): transformers
(`transformers_llm`) and llama.cpp (`llamacpp`, its GGUF files in `gguf`); and the model class vLLM runs
(`vllm_model`, registered by `vllm_plugin`)."""
