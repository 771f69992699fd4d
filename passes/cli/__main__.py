"""`python -m passes.cli`: the `passes` command."""

import sys

from passes.cli.main import main

sys.exit(main())
