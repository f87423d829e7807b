#!/usr/bin/env bash
# Build what a Xen test host needs, from Debian's packages, into .cache/xen-host/ (gitignored), once:
#   xen         the Xen 4.17 hypervisor (xen-hypervisor-4.17-amd64), uncompressed: QEMU's -kernel boots a
#               multiboot image only uncompressed;
#   vmlinuz     Debian's own kernel (the linux-image-*-amd64 that linux-image-amd64 depends on: XEN_PV_DOM0,
#               XEN_BALLOON), Xen's dom0;
#   dom0.cpio   dom0's root file system, an uncompressed newc cpio (under emulation it unpacks twice as fast
#               as a gzipped one): Debian bookworm's essential set with the Xen tools (xl, xenstored,
#               xenconsoled), python3, busybox, kmod and procps; the kernel's Xen and virtio-net modules; an
#               /init that mounts what dom0 needs, starts xenstored, xen-init-dom0 and xenconsoled, brings
#               up eth0 (QEMU's user network: 10.0.2.15, the host at 10.0.2.2), prints
#               "workspace-pilot xen dom0 up" and runs /opt/workspace-pilot/dom0agent.py on the console
#               (hvc0), if the initramfs holds it (tests/support/xen_host.py appends this project and that
#               agent as a second cpio at each boot, so the cached root does not change with the code);
#   SHA256SUMS  sha256sum's manifest of the three; inputs: what they were built from.
# Nothing is installed on this machine (apt-get download + dpkg-deb -x; mmdebstrap into a directory).
# Idempotent: when the inputs (the packages' candidate versions and this script) are unchanged and the files
# match SHA256SUMS, it does nothing. About a minute and 300 MB; needs root, mmdebstrap and busybox
# (scripts/bootstrap.sh --xen installs them) and a Debian mirror. docs/xen.md says how the tests use it.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$top/scripts/lib/cache.sh"
out="$top/.cache/xen-host"
mirror=${WORKSPACE_PILOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
hypervisor_pkg=xen-hypervisor-4.17-amd64
root_packages=(xen-utils-4.17 xen-utils-common xenstore-utils kmod busybox procps python3)
# xenfs, the event channel, grant and privcmd devices xl needs; virtio's PCI transport and virtio_net (with
# failover) for eth0.
modules=(xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd virtio_ring virtio virtio_pci_legacy_dev
         virtio_pci_modern_dev virtio_pci failover net_failover virtio_net)

if [ "$(id -u)" -ne 0 ]; then
  echo "build-xen-host: needs root (mmdebstrap --mode=root)" >&2
  exit 3
fi
for tool in mmdebstrap busybox; do
  command -v "$tool" >/dev/null 2>&1 || { echo "build-xen-host: $tool is missing (scripts/bootstrap.sh --xen)" >&2; exit 3; }
done

candidates() {
  apt-cache policy "$hypervisor_pkg" "${root_packages[@]}" 2>/dev/null | awk '/^[^ ]/ {p=$1} /Candidate:/ {print p $2}' |
    tr '\n' ' '
}
depends=$(kernel_of amd64)  # the kernel the candidate linux-image-amd64 depends on
if [ -z "$depends" ]; then
  echo "build-xen-host: apt knows no linux-image-amd64 (check the machine's apt sources)" >&2
  exit 3
fi
read -r kernel_pkg kernel_ver <<<"$depends"
want="kernel=$kernel_pkg=$kernel_ver $(candidates) script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"
if cache_built "$out" "$want"; then
  exit 0  # already built from these inputs
fi

echo "build-xen-host: building $out (Xen 4.17, $kernel_pkg, a bookworm dom0 root)" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
download=(apt-get download -qq -o APT::Sandbox::User=root)  # _apt cannot write the temp dir
(cd "$tmp" && "${download[@]}" "$kernel_pkg=$kernel_ver" "$hypervisor_pkg")
dpkg-deb -x "$tmp"/"$kernel_pkg"_*.deb "$tmp/kernel"
dpkg-deb -x "$tmp"/"$hypervisor_pkg"_*.deb "$tmp/hypervisor"
release=${kernel_pkg#linux-image-}
cp "$tmp/kernel/boot/vmlinuz-$release" "$tmp/vmlinuz"
gunzip -c "$(ls "$tmp"/hypervisor/boot/xen-4.17*-amd64.gz | head -n 1)" > "$tmp/xen"

root="$tmp/root"
include=$(IFS=,; echo "${root_packages[*]}")
if ! mmdebstrap --mode=root --variant=essential --format=directory --include="$include" \
       --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
       --dpkgopt='path-exclude=/usr/share/locale/*' \
       bookworm "$root" "$mirror" > "$tmp/mmdebstrap.log" 2>&1; then
  tail -20 "$tmp/mmdebstrap.log" >&2
  echo "build-xen-host: mmdebstrap failed" >&2
  exit 3
fi

# The modules dom0 loads, decompressed (busybox's and kmod's insmod both read plain .ko), and depmod's index.
moddir="$root/lib/modules/$release"
mkdir -p "$moddir/extra"
loaded=()
for name in "${modules[@]}"; do
  found=$(find "$tmp/kernel/lib/modules/$release" \( -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" \) \
          -print -quit)
  [ -n "$found" ] || continue  # built into the kernel
  case "$found" in
    *.ko.xz) xz -dc "$found" > "$moddir/extra/$name.ko" ;;
    *.ko.zst) zstd -qdc "$found" > "$moddir/extra/$name.ko" ;;
    *) cp "$found" "$moddir/extra/$name.ko" ;;
  esac
  loaded+=("$name")
done
cp "$tmp/kernel/lib/modules/$release"/modules.builtin* "$tmp/kernel/lib/modules/$release/modules.order" "$moddir/"
chroot "$root" /sbin/depmod "$release"  # dom0's own kmod: the host needs none

cat > "$root/init" <<EOF
#!/bin/busybox sh
# dom0 of the workspace-pilot Xen test host (built by scripts/build-xen-host.sh).
/bin/busybox mkdir -p /proc /sys /dev /run /tmp /usr/local/bin /var/run/xenstored /var/lib/xenstored /var/log/xen
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev
/bin/busybox mount -t tmpfs tmpfs /run
/bin/busybox mount -t tmpfs tmpfs /tmp
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
exec </dev/hvc0 >/dev/hvc0 2>&1
for module in ${loaded[*]}; do
  modprobe "\$module" || echo "workspace-pilot xen dom0: modprobe \$module failed"
done
# busybox's applets for the commands the root lacks (ip, wget, ...).
for applet in \$(/bin/busybox --list); do
  for dir in /usr/local/bin /usr/sbin /usr/bin /sbin /bin; do
    [ -e "\$dir/\$applet" ] && continue 2
  done
  /bin/busybox ln -s /bin/busybox "/usr/local/bin/\$applet"
done
/bin/busybox mount -t xenfs xenfs /proc/xen
/usr/lib/xen-4.17/bin/xenstored --pid-file /run/xenstored.pid
/usr/lib/xen-4.17/bin/xen-init-dom0
/usr/lib/xen-4.17/bin/xenconsoled --pid-file /run/xenconsoled.pid
/bin/busybox ip link set lo up
if [ -e /sys/class/net/eth0 ]; then
  /bin/busybox ip link set eth0 up
  /bin/busybox ip addr add 10.0.2.15/24 dev eth0
  /bin/busybox ip route add default via 10.0.2.2
fi
/bin/busybox hostname xen-dom0
echo "workspace-pilot xen dom0 up"
if [ -f /opt/workspace-pilot/dom0agent.py ]; then
  exec /usr/bin/python3 /opt/workspace-pilot/dom0agent.py
fi
exec /bin/busybox sh
EOF
chmod 0755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) > "$tmp/dom0.cpio"

cache_install "$out" "$want" "$tmp" xen vmlinuz dom0.cpio
echo "build-xen-host: built $out ($(du -sh "$out" | cut -f1); modules: ${loaded[*]})" >&2
