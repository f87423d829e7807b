#!/usr/bin/env bash
# Build the tiny guest the real-VMM tests boot under QEMU/TCG, into .cache/test-guest/ (gitignored):
#   vmlinuz     the kernel of Debian's cloud kernel package (the linux-image-*-cloud-amd64 that
#               linux-image-cloud-amd64 depends on; apt-get download + dpkg-deb -x, never installed:
#               installing it upgrades systemd);
#   initrd.img  a gzip'd newc cpio: busybox-static, the virtio modules the balloon needs (and virtio_blk,
#               isofs for a cloud-init seed, virtio_console for the lease channel), and an /init that prints
#               "workspace-pilot test guest up" to /dev/ttyS0, then each file of an ISO 9660 disk it finds (the
#               seed), framed by "workspace-pilot test guest seed file NAME:" and "... seed end"; then, with a
#               lease channel, "... lease channel open" and each line read from it as "... lease: LINE" (with
#               the guest agent from the seed, the agent reads it, and each new shutdowntime_job of its
#               Machine/Job Features is printed as "... mjf shutdowntime_job N"); with wp_busy=SECONDS on its
#               command line, a workload busy that long, then idle (the agent tells the pilot); then
#               "workspace-pilot test guest alive N"
#               every 2 s, forever. With a virtiofs share tagged "control" (fuse, virtiofs) it runs a batch
#               job instead (the guest contract of workspace-vmjob, docs/vmjobs.md): it writes
#               control/started, executes control/command (a file starting with #!) in the share tagged
#               "workdir", its stdout and stderr into control/stdout and control/stderr, its exit code
#               into control/status (written last), then it reboots, which ends a domain whose on_reboot
#               is destroy. With a NIC (eth0: virtio_net), first of all, it asks DHCP for its address (busybox udhcpc),
#               prints "workspace-pilot test guest address IP HOSTNAME" (or "... no address"), and answers
#               on TCP port 22: a line "workspace-pilot test guest HOSTNAME IP", then it runs the one line
#               the client sends (a shell command) and sends back its output: the stand-in for an SSH
#               login in the lease network tests (a test guest only: no authentication at all);
#   SHA256SUMS  sha256sum's manifest of the two; inputs: what they were built from.
# Idempotent: when the inputs (kernel package and version, busybox-static's version, this script) are
# unchanged and the files match SHA256SUMS, it does nothing. Needs busybox-static (scripts/bootstrap.sh
# --vm installs it) and Debian's package lists.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
. "$top/scripts/lib/cache.sh"
out="$top/.cache/test-guest"
# The order the guest loads them in; without all of them setMemory "succeeds" and nothing changes.
# virtio_blk, cdrom and isofs (which needs cdrom) let the guest read a cloud-init seed (a read-only virtio disk holding an ISO 9660).
# fuse and virtiofs mount the host directories a VM job shares with the guest (virtiofsd on the host).
# virtio_console gives the guest the pilot's lease channel (a virtio-serial port).
# failover, net_failover and virtio_net give it a NIC (a lease network's).
modules=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_balloon virtio_blk cdrom isofs
         fuse virtiofs virtio_console failover net_failover virtio_net)
busybox=/bin/busybox

if [ "$(dpkg-query -W -f='${Status}' busybox-static 2>/dev/null)" != "install ok installed" ]; then
  echo "build-test-guest: busybox-static is not installed (scripts/bootstrap.sh --vm installs it)" >&2
  exit 3
fi

# The kernel the candidate linux-image-cloud-amd64 depends on.
depends=$(kernel_of cloud-amd64)
if [ -z "$depends" ]; then
  echo "build-test-guest: apt knows no linux-image-cloud-amd64 (run apt-get update as root)" >&2
  exit 3
fi
read -r kernel_pkg kernel_ver <<<"$depends"
want="kernel=$kernel_pkg=$kernel_ver busybox-static=$(dpkg-query -W -f='${Version}' busybox-static)"
want="$want script=$(sha256sum "${BASH_SOURCE[0]}" | cut -d' ' -f1)"

if cache_built "$out" "$want"; then
  exit 0  # already built from these inputs
fi

echo "build-test-guest: building $out from $kernel_pkg $kernel_ver" >&2
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$out"

# The kernel package: downloaded into the temp dir, unpacked there, never installed.
download=(apt-get download -qq)
[ "$(id -u)" -eq 0 ] && download+=(-o APT::Sandbox::User=root)  # _apt cannot write the temp dir
(cd "$tmp" && "${download[@]}" "$kernel_pkg=$kernel_ver")
dpkg-deb -x "$tmp"/"$kernel_pkg"_*.deb "$tmp/kernel"
release=${kernel_pkg#linux-image-}
cp "$tmp/kernel/boot/vmlinuz-$release" "$tmp/vmlinuz"

# The initramfs tree.
root="$tmp/root"
mkdir -p "$root/bin" "$root/dev" "$root/proc" "$root/sys" "$root/lib/modules" "$root/seed"
cp "$busybox" "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
loaded=()
for name in "${modules[@]}"; do
  found=$(find "$tmp/kernel/lib/modules/$release" \( -name "$name.ko" -o -name "$name.ko.xz" -o -name "$name.ko.zst" \) \
          -print -quit)
  [ -n "$found" ] || continue  # built into the kernel, nothing to load
  # Decompressed here: busybox's insmod may not read compressed modules.
  case "$found" in
    *.ko.xz) xz -dc "$found" > "$root/lib/modules/$name.ko" ;;
    *.ko.zst) zstd -qdc "$found" > "$root/lib/modules/$name.ko" ;;
    *) cp "$found" "$root/lib/modules/$name.ko" ;;
  esac
  loaded+=("$name")
done
cat > "$root/init" <<EOF
#!/bin/sh
# workspace-pilot test guest (built by scripts/build-test-guest.sh). Never exits: the kernel would panic.
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
for module in ${loaded[*]}; do
  insmod /lib/modules/\$module.ko || echo "insmod \$module failed"
done
echo "workspace-pilot test guest up" > /dev/ttyS0
# A cloud-init seed, if the VM has one: the ISO 9660 disk labelled cidata. Print each file, framed.
# virtio_blk probes its disks asynchronously: give them 2 s to appear, if the VM has a virtio disk at all (device
# id 2 on the virtio bus, there as soon as the modules are in).
i=0
grep -qx 0x0002 /sys/bus/virtio/devices/*/device 2>/dev/null || i=20
while [ \$i -lt 20 ] && ! ls /dev/vd? >/dev/null 2>&1; do usleep 100000; i=\$((i + 1)); done
for dev in /dev/vd?; do
  [ -b "\$dev" ] || continue
  if mount -t iso9660 -o ro "\$dev" /seed 2>/dev/null; then
    for file in /seed/*; do
      echo "workspace-pilot test guest seed file \$(basename "\$file"):" > /dev/ttyS0
      cat "\$file" > /dev/ttyS0
      echo "workspace-pilot test guest seed end" > /dev/ttyS0
    done
    # The guest agent and the features the VM started with, kept for after the seed is unmounted.
    if [ -f /seed/workspace-pilot-agent ]; then
      mkdir -p /run/wp
      cp /seed/workspace-pilot-agent /seed/features /run/wp/
    fi
    umount /seed
  fi
done
# The lease channel, if the VM has one (docs/leases.md): every line the pilot writes on the virtio-serial port
# named org.workspace-pilot.lease.0 goes to the console, as "workspace-pilot test guest lease: LINE". With a
# seed that carries the guest agent, the agent holds the port (it prints what it reads; it writes the Machine/Job
# Features into /run/machinefeatures and /run/jobfeatures, and each new shutdowntime_job goes to the console as
# "workspace-pilot test guest mjf shutdowntime_job N"); else a plain reader does. Its port appears once the host
# side has answered: give it 2 s.
i=0
while [ \$i -lt 20 ] && ! ls /sys/class/virtio-ports/* >/dev/null 2>&1; do usleep 100000; i=\$((i + 1)); done
if [ -f /run/wp/workspace-pilot-agent ]; then
  (sh /run/wp/workspace-pilot-agent /run/wp/features 2>&1 | while read -r line; do
     echo "workspace-pilot test guest lease: \$line" > /dev/ttyS0
   done) &
  (last=''
   while :; do
     now=\$(cat /run/jobfeatures/shutdowntime_job 2>/dev/null)
     [ "\$now" != "\$last" ] && echo "workspace-pilot test guest mjf shutdowntime_job \$now" > /dev/ttyS0 && last=\$now
     sleep 1
   done) &
fi
for port in /sys/class/virtio-ports/*; do
  [ -f /run/wp/workspace-pilot-agent ] && break
  [ "\$(cat "\$port/name" 2>/dev/null)" = org.workspace-pilot.lease.0 ] || continue
  # A read while no pilot is connected is end-of-file: open the port again a second later.
  (while :; do
     while read -r line; do echo "workspace-pilot test guest lease: \$line" > /dev/ttyS0; done < /dev/\${port##*/}
     sleep 1
   done) &
  echo "workspace-pilot test guest lease channel open" > /dev/ttyS0
done
# A workload, if the kernel command line has wp_busy=SECONDS: busy that long (the agent tells the pilot), then idle.
case " \$(cat /proc/cmdline) " in
  *" wp_busy="*)
    seconds=\$(sed -n 's/.* wp_busy=\([0-9]*\).*/\1/p' /proc/cmdline)
    (mkdir -p /run/workspace-pilot
     echo busy > /run/workspace-pilot/usage
     echo "workspace-pilot test guest busy for \$seconds s" > /dev/ttyS0
     sleep "\$seconds"
     echo idle > /run/workspace-pilot/usage
     echo "workspace-pilot test guest idle" > /dev/ttyS0) & ;;
esac
# A NIC, if the VM has one: its address by DHCP (from its node's DHCP server), then the login stand-in on port 22.
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up
  ip link set eth0 up
  cat > /bin/wp-dhcp <<'SCRIPT'
#!/bin/sh
if [ "\$1" = bound ]; then
  ip addr add "\$ip/\$mask" dev "\$interface"
  [ -n "\$mtu" ] && ip link set "\$interface" mtu "\$mtu"
  [ -n "\$hostname" ] && hostname "\$hostname"
  echo "nameserver \$dns" > /etc/resolv.conf
  echo "search \$domain" >> /etc/resolv.conf
  echo "\$ip" > /run-address
fi
exit 0
SCRIPT
  cat > /bin/wp-login <<'SCRIPT'
#!/bin/sh
echo "workspace-pilot test guest \$(hostname) \$(cat /run-address 2>/dev/null)"
read -r line
eval "\$line" 2>&1
SCRIPT
  chmod 0755 /bin/wp-dhcp /bin/wp-login
  mkdir -p /etc
  if udhcpc -i eth0 -n -q -t 10 -T 1 -O mtu -s /bin/wp-dhcp >/dev/null 2>&1; then
    echo "workspace-pilot test guest address \$(cat /run-address) \$(hostname)" > /dev/ttyS0
  else
    echo "workspace-pilot test guest no address" > /dev/ttyS0
  fi
  nc -ll -p 22 -e /bin/wp-login &
fi
# A batch job, if the VM has one: virtiofs shares "control" (command in; stdout, stderr, status out) and
# "workdir" (the job's working directory). The status is written under another name and renamed, so a
# host that sees control/status sees all of it.
mkdir -p /control /workdir
if mount -t virtiofs control /control 2>/dev/null; then
  mount -t virtiofs workdir /workdir 2>/dev/null || echo "workspace-pilot test guest: no workdir share" > /dev/ttyS0
  echo "workspace-pilot test guest job started" > /dev/ttyS0
  : > /control/started
  (cd /workdir && /control/command > /control/stdout 2> /control/stderr)
  echo \$? > /control/status.part && mv /control/status.part /control/status
  sync
  echo "workspace-pilot test guest job done \$(cat /control/status)" > /dev/ttyS0
  reboot -f
fi
# A disk to fill, if the kernel command line has wp_fill: random bytes to /dev/vda's end (where a guest that
# wants the node's disk would write), then its size in 512-byte sectors.
case " \$(cat /proc/cmdline) " in
  *" wp_fill "*)
    dd if=/dev/urandom of=/dev/vda bs=1M 2>/dev/null
    sync
    echo "workspace-pilot test guest filled \$(cat /sys/block/vda/size)" > /dev/ttyS0 ;;
esac
n=0
while true; do
  sleep 2
  n=\$((n + 1))
  echo "workspace-pilot test guest alive \$n" > /dev/ttyS0
done
EOF
chmod 0755 "$root/init"
(cd "$root" && find . | LC_ALL=C sort | "$busybox" cpio -o -H newc 2>/dev/null) | gzip -9 -n > "$tmp/initrd.img"

cache_install "$out" "$want" "$tmp" vmlinuz initrd.img
echo "build-test-guest: built $out (modules: ${loaded[*]:-none})" >&2
