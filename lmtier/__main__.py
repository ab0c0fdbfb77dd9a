"""``python -m lmtier``: the same command line as the ``lmtier`` console script."""

from __future__ import annotations

from lmtier.cli import main

raise SystemExit(main())
