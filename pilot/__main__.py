"""``python -m pilot`` runs ``workspace-pilot``."""

import sys

from pilot.cli import main

sys.exit(main())
