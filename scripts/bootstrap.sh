#!/usr/bin/env bash
# Set up everything workspace-pilot needs on a Debian 12 machine, idempotently:
# Debian packages (as root), a virtualenv in .venv, the project installed editable.
# Run first by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
# --test (scripts/test.sh): also the test extras (pytest, hypothesis, matplotlib, build, psycopg) and dpkg-dev
# and rpm, with which the tests build the packages, and Debian's PostgreSQL server (postgresql), which the tests
# run a cluster of their own of (tests/support/postgres.py; when bootstrap installs it, Debian's own cluster is not
# made); the demo needs none.
# --cluster (scripts/test.sh): also the batch system the tests run on, a real Slurm with SchedMD's
# Torque commands (munge slurmctld slurmd slurm-client slurm-wlm-torque), sudo, through which
# job scripts start the pilot, and logrotate (the tests rotate the service's log with the shipped file). The tests start and stop these daemons themselves (tests/support/slurm_cluster.py).
# --vm (scripts/test.sh): also the real VMM the tests boot guests on: libvirtd and QEMU (libvirt-daemon
# libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils, not libvirt-daemon-system: it upgrades
# systemd), tini (the subreaper the demo and the tests start libvirtd under: service_adapter/localvirt.py),
# busybox-static, what lease networks need on a node (iproute2, nftables, dnsmasq-base), the groups and
# user libvirtd wants, a marked block at the end of
# /etc/libvirt/qemu.conf (guests as libvirt-qemu with dynamic ownership, no sVirt, hugetlbfs at /dev/hugepages), and a
# tiny test guest in .cache/test-guest (scripts/build-test-guest.sh). The tests start and stop libvirtd
# themselves (tests/support/libvirt_daemon.py).
# --cloud-image (scripts/test.sh): also a small Debian 12 cloud image (cloud-init, openssh-server) built from
# Debian's packages into .cache/cloud-image (scripts/build-cloud-image.sh; mmdebstrap), once; implies --vm.
# --sge (scripts/test.sh): also Son of Grid Engine, unpacked into .cache/gridengine, not installed (its qsub
# conflicts with slurm-wlm-torque's; scripts/unpack-gridengine.sh), and the library it needs (libjemalloc2).
# The tests run it in namespaces of their own (tests/support/sge_cluster.py).
# --xen (scripts/test.sh): also what a Xen test host is made of, built from Debian's packages into .cache/xen-host
# (scripts/build-xen-host.sh: the Xen 4.17 hypervisor, Debian's kernel as dom0, a dom0 root with the Xen tools and
# python3; nothing of it installed here), once; implies --vm (QEMU boots it). The tests boot it themselves
# (tests/support/xen_host.py).
set -euo pipefail
cluster=no
vm=no
sge=no
cloud_image=no
xen=no
extras=
for arg in "$@"; do
  case "$arg" in
    --cluster) cluster=yes ;;
    --vm) vm=yes ;;
    --sge) sge=yes ;;
    --cloud-image) cloud_image=yes; vm=yes ;;
    --xen) xen=yes; vm=yes ;;
    --test) extras='[test]' ;;
    *) echo "bootstrap: unknown option $arg (known: --cluster, --vm, --cloud-image, --sge, --xen, --test)" >&2; exit 2 ;;
  esac
done

top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

need_pkgs=()
command -v curl >/dev/null 2>&1 || need_pkgs+=(curl)
command -v python3 >/dev/null 2>&1 || need_pkgs+=(python3)
if command -v python3 >/dev/null 2>&1 && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need_pkgs+=(python3-venv)
fi
# libvirt-python (the xen backend) has no wheel: pip builds it against Debian's libvirt.
have_deb() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
pkg-config --exists libvirt 2>/dev/null || have_deb libvirt-dev || need_pkgs+=(libvirt-dev)
have_deb pkg-config || command -v pkg-config >/dev/null 2>&1 || need_pkgs+=(pkg-config)
have_deb gcc || command -v gcc >/dev/null 2>&1 || need_pkgs+=(gcc)
# The tests make a CA and an https certificate with it.
command -v openssl >/dev/null 2>&1 || need_pkgs+=(openssl)
if [ "$cluster" = yes ]; then
  for pkg in sudo logrotate munge slurmctld slurmd slurm-client slurm-wlm-torque; do
    have_deb "$pkg" || need_pkgs+=("$pkg")
  done
fi
if [ -n "$extras" ]; then
  # The packaging test builds the .deb packages (dpkg-deb) and the RPMs (Debian's rpm has rpmbuild).
  for pkg in dpkg-dev rpm postgresql; do
    have_deb "$pkg" || need_pkgs+=("$pkg")
  done
  if ! have_deb postgresql-common && [ "$(id -u)" -eq 0 ]; then
    # The tests start their own server; Debian's would make a cluster and start it on port 5432 as well.
    mkdir -p /etc/postgresql-common/createcluster.d
    echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/50-workspace-pilot-tests.conf
  fi
fi
if [ "$vm" = yes ]; then
  for pkg in libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils tini busybox-static \
             iproute2 nftables dnsmasq-base; do
    have_deb "$pkg" || need_pkgs+=("$pkg")
  done
fi
if [ "$cloud_image" = yes ]; then
  # openssh-client: the owner's ssh into the image's VMs (the tests', the demo's)
  for pkg in mmdebstrap openssh-client; do
    have_deb "$pkg" || need_pkgs+=("$pkg")
  done
fi
if [ "$xen" = yes ]; then
  # mmdebstrap builds dom0's root; busybox-static (--vm) packs it.
  for pkg in mmdebstrap; do
    have_deb "$pkg" || need_pkgs+=("$pkg")
  done
fi
if [ "$sge" = yes ]; then
  for pkg in libjemalloc2 iproute2; do
    have_deb "$pkg" || need_pkgs+=("$pkg")
  done
fi
if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing Debian packages ${need_pkgs[*]}; run as root to install them" >&2
    exit 3
  fi
  echo "bootstrap: installing ${need_pkgs[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
fi

python3 -c 'import sys; sys.exit(sys.version_info < (3, 10))' || {
  echo "bootstrap: Python 3.10 or newer is needed, found $(python3 --version)" >&2
  exit 3
}

if [ ! -x .venv/bin/python ]; then
  echo "bootstrap: creating .venv" >&2
  python3 -m venv .venv
fi
stamp=.venv/.workspace-pilot-installed
want=$(sha256sum setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
# The stamp says what was installed from which setup.cfg: "<hash>" or "<hash> [test]" (the extras
# too). An install with the test extras serves the demo as well; one without them does not serve the tests.
have=$(cat "$stamp" 2>/dev/null || true)
if [ "$have" != "$want $extras" ] && [ "$have" != "$want [test]" ]; then
  echo "bootstrap: installing workspace-pilot and its dependencies into .venv" >&2
  # pip's output goes to a log and is shown only if the install fails.
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e ".$extras"; } > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "bootstrap: installing into .venv failed (log above, also in .venv/install.log)" >&2
    exit 3
  fi
  echo "$want $extras" > "$stamp"
fi
# The project's own bytecode, written now: the package is installed editable, and where
# PYTHONDONTWRITEBYTECODE is set (as on our machines) every pilot would otherwise compile its modules
# at each start (issue 17). Only changed files are compiled; quick when nothing changed.
.venv/bin/python -m compileall -q pilot service_adapter admin_tools workspace_common > /dev/null

if [ "$vm" = yes ]; then
  need_root() {
    if [ "$(id -u)" -ne 0 ]; then
      echo "bootstrap: --vm needs root to $1" >&2
      exit 3
    fi
  }
  # The user and groups that libvirtd runs guests as (qemu.conf below).
  for group in kvm libvirt libvirt-qemu; do
    getent group "$group" >/dev/null || { need_root "add group $group"; groupadd -f -r "$group"; }
  done
  if ! getent passwd libvirt-qemu >/dev/null; then
    need_root "add user libvirt-qemu"
    useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin -c "Libvirt Qemu" libvirt-qemu
  fi
  # Our settings live in one marked block at the end of qemu.conf; the rest of the file is kept, except
  # that an active setting of one of our keys elsewhere is commented out: libvirt takes a key's FIRST
  # occurrence. The file is rewritten only when that result differs from it, so a second run changes nothing.
  qemu_conf=/etc/libvirt/qemu.conf
  begin="# BEGIN workspace-pilot (scripts/bootstrap.sh --vm)"
  end="# END workspace-pilot"
  wanted_conf() {
    if [ -f "$qemu_conf" ]; then
      awk -v b="$begin" -v e="$end" '
        $0 == b {skip = 1}
        !skip && /^[ \t]*(user|group|dynamic_ownership|security_driver|hugetlbfs_mount)[ \t]*=/ {
          print "#workspace-pilot# " $0; next
        }
        !skip {print}
        $0 == e {skip = 0}' "$qemu_conf"
    fi
    # Guests run as libvirt-qemu, never root (docs/security.md); libvirt hands each VM's own files to that
    # user while it runs (dynamic_ownership) and the pilot keeps shared images out of its hands. No AppArmor
    # or SELinux runs here to confine them further: security_driver "none" says so instead of failing.
    printf '%s\n' "$begin" 'user = "libvirt-qemu"' 'group = "libvirt-qemu"' 'dynamic_ownership = 1' \
      'security_driver = "none"' 'hugetlbfs_mount = "/dev/hugepages"' "$end"
  }
  if ! wanted_conf | cmp -s - "$qemu_conf"; then
    need_root "write $qemu_conf"
    echo "bootstrap: writing the workspace-pilot block of $qemu_conf" >&2
    install -d -m 0755 /etc/libvirt
    tmp=$(mktemp "$qemu_conf.XXXXXX")
    wanted_conf > "$tmp"
    chmod 0600 "$tmp"
    mv "$tmp" "$qemu_conf"
  fi
  # QEMU runs as libvirt-qemu, of group kvm: /dev/kvm as Debian's udev rule leaves it, root:kvm 0660. Without
  # udev (a container) it stays root's 0600; libvirt then finds it unusable by that user and probes QEMU's
  # capabilities again before every domain start (56 s per start measured here, 0.34 s with this).
  if [ -c /dev/kvm ] && [ "$(stat -c '%G %a' /dev/kvm)" != "kvm 660" ]; then
    need_root "give /dev/kvm to group kvm"
    chgrp kvm /dev/kvm
    chmod 0660 /dev/kvm
  fi
  "$top/scripts/build-test-guest.sh"
fi
if [ "$cloud_image" = yes ]; then
  "$top/scripts/build-cloud-image.sh"
fi
if [ "$sge" = yes ]; then
  "$top/scripts/unpack-gridengine.sh"
fi
if [ "$xen" = yes ]; then
  "$top/scripts/build-xen-host.sh"
fi
