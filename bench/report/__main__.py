"""``python -m bench.report``: the same as ``echolm bench report`` (same flags)."""

from __future__ import annotations

import sys

from bench.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
