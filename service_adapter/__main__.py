"""``python -m service_adapter`` runs ``workspace-lease``."""

import sys

from service_adapter.cli import main

sys.exit(main())
