#!/usr/bin/env bash
# The main job: set up, then run one lease on this machine through the local provider
# (real 2 MiB hugepage reservations; needs root). Extra arguments go to `workspace-lease demo`.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$top/scripts/bootstrap.sh"
if [ $# -eq 0 ]; then
  set -- --nodes 2 --memory 64 --duration 20
fi
exec "$top/.venv/bin/workspace-lease" demo "$@"
