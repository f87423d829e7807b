#!/usr/bin/env bash
# Build what a Xen test host needs, from Debian's packages, into .cache/xen-host/ (gitignored), once:
#   xen         the Xen 4.17 hypervisor (xen-hypervisor-4.17-amd64), uncompressed: QEMU's -kernel boots a
#               multiboot image only uncompressed;
#   vmlinuz     Debian's own kernel (the linux-image-*-amd64 that linux-image-amd64 depends on: XEN_PV_DOM0,
#               XEN_BALLOON), Xen's dom0;
#   dom0.cpio   dom0's root file system, an uncompressed newc cpio (under emulation it unpacks twice as fast
#               as a gzipped one): Debian bookworm's essential set with the Xen tools (xl, xenstored,
#               xenconsoled), python3, busybox, kmod, procps, libvirtd with its Xen driver only (libxl.conf:
#               autoballoon = 0), virsh and python3-libvirt; the kernel's Xen and virtio-net modules; an
#               /init that mounts what dom0 needs, starts xenstored, xen-init-dom0 and xenconsoled (logging guest
#               consoles to /var/log/xen/console; libvirtd is left to the tests), brings
#               up eth0 (QEMU's user network: 10.0.2.15, the host at 10.0.2.2), prints
#               "workspace-pilot xen dom0 up" and runs /opt/workspace-pilot/dom0agent.py on the console
#               (hvc0), if the initramfs holds it (tests/support/xen_host.py appends this project and that
#               agent as a second cpio at each boot, so the cached root does not change with the code);
#               dom0's /srv/xen-guest holds a PV guest for the tests: vmlinuz again and initrd.img (a gzip'd
#               cpio: busybox-static and an /init that prints "workspace-pilot xen guest up" and then
#               "... alive N" every 2 s on its Xen console);
#   SHA256SUMS  sha256sum's manifest of the three; inputs: what they were built from.
# Nothing is installed on this machine (apt-get download + dpkg-deb -x; mmdebstrap into a directory).
# Idempotent: when the inputs (the packages' candidate versions and this script) are unchanged and the files
# match SHA256SUMS, it does nothing. About a minute and 300 MB; needs root, mmdebstrap and busybox-static
# (scripts/bootstrap.sh --xen installs them) and a Debian mirror. docs/xen.md says how the tests use it.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$top/scripts/lib/cache.sh"
out="$top/.cache/xen-host"
mirror=${WORKSPACE_PILOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
hypervisor_pkg=xen-hypervisor-4.17-amd64
# libvirtd with its Xen (libxl) driver, virsh and libvirt's Python binding for dom0's python3: the pilot's xen
# backend and its VM hosting speak libvirt.
root_packages=(xen-utils-4.17 xen-utils-common xenstore-utils kmod busybox procps python3
               libvirt-daemon libvirt-daemon-driver-xen libvirt-clients python3-libvirt)
# xenfs, the event channel, grant and privcmd devices xl needs; virtio's PCI transport and virtio_net (with
# failover) for eth0.
modules=(xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd virtio_ring virtio virtio_pci_legacy_dev
         virtio_pci_modern_dev virtio_pci failover net_failover virtio_net)

if [ "$(id -u)" -ne 0 ]; then
  echo "build-xen-host: needs root (mmdebstrap --mode=root)" >&2
  exit 3
fi
command -v mmdebstrap >/dev/null 2>&1 || { echo "build-xen-host: mmdebstrap is missing (scripts/bootstrap.sh --xen)" >&2; exit 3; }
if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" != "install ok installed" ]; then
  echo "build-xen-host: busybox-static is not installed (scripts/bootstrap.sh --xen installs it)" >&2
  exit 3
fi

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

# libvirtd loads every driver it finds; its QEMU driver dies here (no libvirt-qemu user, no QEMU): Xen's only.
find "$root/usr/lib" -name 'libvirt_driver_qemu.so' -delete
# libvirt must not balloon dom0 to make room for a guest: the pilot does that, and journals it first.
printf '# workspace-pilot Xen test host: the pilot balloons dom0, libvirt never does.\nautoballoon = 0\n' \
  > "$root/etc/libvirt/libxl.conf"

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
# xenconsoled gives each guest's console a pty: without devpts libxl times out waiting for it.
/bin/busybox mkdir -p /dev/pts
/bin/busybox mount -t devpts devpts /dev/pts
/bin/busybox mount -t tmpfs tmpfs /run
# libxl's lock files (domid-history.lock): without the directory a failed create cannot destroy its domain.
/bin/busybox mkdir -p /run/xen
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
# Guests' consoles are logged (/var/log/xen/console/guest-NAME.log): how the tests see a guest boot.
/bin/busybox mkdir -p /var/log/xen/console
/usr/lib/xen-4.17/bin/xenconsoled --pid-file /run/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console
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
# A PV guest for the tests, in dom0's /srv/xen-guest: dom0's own kernel (Debian's has XEN_PV) and an initramfs
# (busybox-static and an /init that says it is up, then that it is alive, on its Xen console, which xenconsoled
# logs in dom0).
guest="$tmp/guest"
mkdir -p "$guest/bin" "$root/srv/xen-guest"
cp "$tmp/vmlinuz" "$root/srv/xen-guest/vmlinuz"
cp "$(dpkg -L busybox-static | grep -m1 '/busybox$')" "$guest/bin/busybox"
cat > "$guest/init" <<'EOF'
#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs devtmpfs /dev
exec >/dev/hvc0 2>&1
echo "workspace-pilot xen guest up: $(/bin/busybox head -n 1 /proc/meminfo)"
n=0
while :; do
  n=$((n + 1))
  echo "workspace-pilot xen guest alive $n"
  /bin/busybox sleep 2
done
EOF
chmod 0755 "$guest/init"
(cd "$guest" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null | gzip -9n) > "$root/srv/xen-guest/initrd.img"
(cd "$root" && find . | LC_ALL=C sort | busybox cpio -o -H newc 2>/dev/null) > "$tmp/dom0.cpio"

cache_install "$out" "$want" "$tmp" xen vmlinuz dom0.cpio
echo "build-xen-host: built $out ($(du -sh "$out" | cut -f1); modules: ${loaded[*]})" >&2
