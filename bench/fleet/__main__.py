"""``python -m bench.fleet``: the same as ``echolm bench fleet`` (same flags)."""

from __future__ import annotations

import sys

from bench.cli import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main(["fleet", *sys.argv[1:]]))
