"""`skingpt4 ...`: the command line, a thin layer over the library. `main` parses and dispatches; `flags` holds
the flags several commands share; `research` the data, training, evaluation and review commands; `legacy` the
original's `demo.py --cfg-path ...` launch line."""
