"""``python -m pilot.vmjob``: the same as ``workspace-vmjob``."""

import sys

from pilot.vmjob.cli import main

sys.exit(main())
