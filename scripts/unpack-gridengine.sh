#!/usr/bin/env bash
# Son of Grid Engine 8.1.9 from Debian 12's packages, unpacked into .cache/gridengine/root (gitignored), never
# installed: its /usr/bin/qsub conflicts with slurm-wlm-torque's, which the Slurm tests use. tests/support/sge_cluster.py
# runs it from there: the unpacked /usr over the real one (overlayfs, in a mount namespace of its own), so both
# batch systems stay real on one machine (docs/gridengine.md). Idempotent: does nothing when the unpacked
# versions are the ones apt offers. Needs Debian's package lists (scripts/bootstrap.sh --sge runs it).
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out="$top/.cache/gridengine"
pkgs=(gridengine-common gridengine-client gridengine-master gridengine-exec)
want=$(for pkg in "${pkgs[@]}"; do
  echo "$pkg=$(apt-cache show --no-all-versions "$pkg" 2>/dev/null | sed -n 's/^Version: //p')"
done)
if grep -q '=$' <<<"$want"; then
  echo "unpack-gridengine: apt knows no candidate for some of ${pkgs[*]} (apt-get update?)" >&2
  exit 3
fi
if [ -f "$out/inputs" ] && [ "$(cat "$out/inputs")" = "$want" ] && [ -x "$out/root/usr/lib/gridengine/sge_qmaster" ]; then
  exit 0
fi
download=$(mktemp -d)
trap 'rm -rf "$download" "$out.new"' EXIT
chmod 0755 "$download"  # apt-get download drops to the _apt user where it can
(cd "$download" && apt-get download -qq "${pkgs[@]}" 2>/dev/null)
rm -rf "$out.new"
mkdir -p "$out.new/root"
for deb in "$download"/*.deb; do
  dpkg-deb -x "$deb" "$out.new/root"
done
echo "$want" > "$out.new/inputs"
rm -rf "$out"
mv "$out.new" "$out"
echo "unpack-gridengine: unpacked $(echo $want) into $out" >&2
