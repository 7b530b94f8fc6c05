"""Files of images and records: manifests in and out, the public data sets' adapters, splits, result files.

`manifest` is the one reader and writer of manifests (what `diagnose`, `eval` and `train` take as input);
`adapters` turns each data set's own files into records; `prepare` checks, splits and writes them; `results`
appends records crash-safely to JSON Lines or CSV, so that bulk runs can resume.
"""
