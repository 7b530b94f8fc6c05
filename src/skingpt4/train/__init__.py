"""The two-step training recipe: `config` (one YAML, validated), `data` (manifest -> batches in the original's
prompt format), `state` (checkpoints, exact resume, exports) and `loop` (the optimizer steps)."""
