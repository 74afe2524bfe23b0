"""``python -m bench.overhead``: see ``bench.overhead``."""

from __future__ import annotations

import sys

from bench.overhead.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
