"""`python -m edgeserve` runs the CLI."""

import sys

from edgeserve.cli import main

sys.exit(main())
