"""python -m mhc_lm.diagnostics PATH: see `cli.py`."""

from .cli import main

raise SystemExit(main())
