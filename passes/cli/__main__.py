"""`python -m passes.cli`: the `passes` command."""

import sys

from passes.cli._entry import main

sys.exit(main())
