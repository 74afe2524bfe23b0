"""Entry point for ``python -m devstack.tgi_dev``."""

import sys

from devstack.tgi_dev.cli import main

sys.exit(main())
