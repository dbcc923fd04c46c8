"""``python -m neuroscan``: the ``neuroscan`` command."""

import sys

from cluster.cli import main

sys.exit(main())
