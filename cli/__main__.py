"""`python -m cli` runs the `gallery` command line (what the installed `gallery` script runs)."""

import sys

from cli import main

sys.exit(main())
