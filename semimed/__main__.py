"""`python -m semimed`: the `semimed` command (the same as `python -m semimed.cli`)."""

import sys

from semimed.cli import main

sys.exit(main())
