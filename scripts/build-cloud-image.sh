#!/usr/bin/env bash
# Build a small Debian 12 cloud image from Debian's packages into .cache/cloud-image/ (gitignored), once:
#   disk.qcow2  an ext4 root file system (no partition table: the kernel boots with root=/dev/vda) holding
#               Debian bookworm with cloud-init (NoCloud only: it reads the pilot's seed and never probes a
#               cloud's metadata service), openssh-server, ifupdown (what cloud-init renders network-config
#               to on Debian) with resolvconf (which applies its name servers), sudo, ping and the cloud
#               kernel; its default user is "debian";
#   vmlinuz, initrd.img  that kernel and its initramfs (initramfs-tools, MODULES=most), for direct boot;
#   SHA256SUMS  sha256sum's manifest of the three; inputs: what they were built from.
# Made with mmdebstrap (as root, into a directory), mke2fs -d (no loop device) and qemu-img. Idempotent: when
# the inputs (the candidate versions of the main packages and this script) are unchanged and the files match
# SHA256SUMS, it does nothing. About a minute and 500 MB; needs mmdebstrap (scripts/bootstrap.sh --cloud-image
# installs it) and a Debian mirror.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$top/scripts/lib/cache.sh"
out="$top/.cache/cloud-image"
mirror=${WORKSPACE_PILOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
# e2fsprogs: cloud-init's resizefs (resize2fs) and fsck at boot; not part of --variant=apt.
packages=(linux-image-cloud-amd64 cloud-init openssh-server systemd-sysv udev ifupdown resolvconf netbase iproute2
          iputils-ping sudo ca-certificates dbus e2fsprogs)

if [ "$(id -u)" -ne 0 ]; then
  echo "build-cloud-image: needs root (mmdebstrap --mode=root)" >&2
  exit 3
fi
for tool in mmdebstrap mke2fs qemu-img; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-cloud-image: $tool is missing (scripts/bootstrap.sh --cloud-image)" >&2; exit 3; }
done

versions=$(apt-cache policy "${packages[@]}" 2>/dev/null | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p $2}' | tr '\n' ' ')
if [ -z "${versions// /}" ]; then
  apt-get update -qq
  versions=$(apt-cache policy "${packages[@]}" 2>/dev/null | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p $2}' | tr '\n' ' ')
fi
want="$versions script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if cache_built "$out" "$want"; then
  exit 0  # already built from these inputs
fi

echo "build-cloud-image: building $out (Debian bookworm, cloud-init, openssh-server)" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
root="$tmp/root"
include=$(IFS=,; echo "${packages[*]}")
# cloud-init's settings for this image: the NoCloud seed is the only datasource (no wait on a metadata service
# that is not there); the locale is C.UTF-8, the only one the image has (cloud-init's default en_US.UTF-8 would
# fail its locale module); host keys ed25519 and ecdsa only (an RSA key takes about 8 s under emulation).
cat > "$tmp/90-workspace-pilot.cfg" <<'CFG'
datasource_list: [ NoCloud, None ]
locale: C.UTF-8
ssh_genkeytypes: [ ed25519, ecdsa ]
CFG
hook="cp '$tmp/90-workspace-pilot.cfg' \"\$1/etc/cloud/cloud.cfg.d/\";"
hook+=' echo "LABEL=root / ext4 defaults 0 1" > "$1/etc/fstab"'
if ! mmdebstrap --mode=root --variant=apt --format=directory --include="$include" --customize-hook="$hook" \
       bookworm "$root" "$mirror" > "$tmp/mmdebstrap.log" 2>&1; then
  tail -20 "$tmp/mmdebstrap.log" >&2
  echo "build-cloud-image: mmdebstrap failed" >&2
  exit 3
fi
cp "$root"/boot/vmlinuz-* "$tmp/vmlinuz"
cp "$root"/boot/initrd.img-* "$tmp/initrd.img"
mke2fs -q -t ext4 -L root -d "$root" -E root_owner=0:0 "$tmp/disk.raw" 1200M > /dev/null  # it says "Creating regular file" even with -q
qemu-img convert -O qcow2 "$tmp/disk.raw" "$tmp/disk.qcow2"

cache_install "$out" "$want" "$tmp" disk.qcow2 vmlinuz initrd.img
echo "build-cloud-image: built $out ($(du -sh "$out" | cut -f1))" >&2
