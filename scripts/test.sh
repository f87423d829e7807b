#!/usr/bin/env bash
# The test suite: set up, then run every test (root-only tests skip themselves elsewhere).
# Extra arguments go to pytest.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$top/scripts/bootstrap.sh"
cd "$top"
exec .venv/bin/python -m pytest -q -ra "$@"
