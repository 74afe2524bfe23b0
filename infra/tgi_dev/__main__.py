"""Entry point for ``python -m infra.tgi_dev``."""

import sys

from infra.tgi_dev.cli import main

sys.exit(main())
