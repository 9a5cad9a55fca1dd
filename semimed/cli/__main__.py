"""`python -m semimed.cli`: the `semimed` command."""

import sys

from semimed.cli import main

sys.exit(main())
