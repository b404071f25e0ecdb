"""``python -m sidecar``: the same as the ``sidecar`` console script."""

from .cli import main

raise SystemExit(main())
