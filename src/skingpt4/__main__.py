"""`python -m skingpt4 ...` is the same as `skingpt4 ...`."""

from skingpt4.cli.main import main

raise SystemExit(main())
