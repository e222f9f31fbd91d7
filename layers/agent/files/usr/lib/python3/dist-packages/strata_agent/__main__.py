"""python3 -m strata_agent runs the daemon."""

import sys

from .daemon import main

sys.exit(main())
