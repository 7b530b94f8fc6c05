"""Measuring the model on labelled images: `run` (answer a manifest, resumable), `labels` (label sets and finding a
diagnosis in free text), `scoring` (each label's likelihood, for choice mode), `metrics` (with bootstrap intervals
and skin-type groups) and `report` (HTML / Markdown with plots)."""
