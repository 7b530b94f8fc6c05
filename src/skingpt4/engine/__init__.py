"""The engine: the interface every surface calls (`protocol`), our engine (`chat`, `session`, `scheduler`, `sampler`,
`decoding`, `sharing`), vLLM's (`vllm`), and the factory that picks one (`factory`)."""
