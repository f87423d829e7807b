#!/usr/bin/env bash
# The test suite: set up (with the batch system's packages, libvirt, QEMU, the test guest, the cloud image and
# the Xen test host), then run every test (root-only tests skip themselves elsewhere).
# Extra arguments go to pytest.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
"$top/scripts/bootstrap.sh" --cluster --vm --cloud-image --sge --xen --test
cd "$top"
exec .venv/bin/python -m pytest -q -ra "$@"
