"""`python -m skingpt4 ...` is the same as `skingpt4 ...`."""

from .cli import main

raise SystemExit(main())
