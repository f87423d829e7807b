#!/usr/bin/env bash
# The main job: set up, then run one lease on this machine through the local provider
# (real 2 MiB hugepage reservations; needs root). Extra arguments go to `workspace-lease demo`.
# With --vm the lease boots a VM of a real cloud image and logs in to it: set-up then also installs
# libvirt and QEMU and builds the image into .cache/cloud-image (once; about a minute).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vm=no
for arg in "$@"; do
  if [ "$arg" = --vm ]; then vm=yes; fi
done
if [ $vm = yes ]; then
  "$top/scripts/bootstrap.sh" --vm --cloud-image
  set -- --vm-image "$top/.cache/cloud-image" "$@"  # a --vm-image of the caller's comes later and wins
else
  "$top/scripts/bootstrap.sh"
fi
exec "$top/.venv/bin/workspace-lease" demo "$@"
