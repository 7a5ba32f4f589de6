"""`python -m gallery` runs the CLI."""

import sys

from gallery.cli import main

sys.exit(main())
