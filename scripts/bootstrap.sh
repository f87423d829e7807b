#!/usr/bin/env bash
# Set up everything workspace-pilot needs on a Debian 12 machine, idempotently:
# Debian packages (as root), a virtualenv in .venv, the project installed editable with its test extras.
# Run first by scripts/demo.sh and scripts/test.sh; safe to run again (it skips what is done).
# --cluster (scripts/test.sh): also the batch system the tests run on, a real Slurm with SchedMD's
# Torque commands (munge slurmctld slurmd slurm-client slurm-wlm-torque), and sudo, through which
# job scripts start the pilot. The tests start and stop these daemons themselves (tests/slurm_cluster.py).
set -euo pipefail
cluster=no
for arg in "$@"; do
  case "$arg" in
    --cluster) cluster=yes ;;
    *) echo "bootstrap: unknown option $arg (known: --cluster)" >&2; exit 2 ;;
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
if [ "$cluster" = yes ]; then
  for pkg in sudo munge slurmctld slurmd slurm-client slurm-wlm-torque; do
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
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "bootstrap: installing workspace-pilot and its dependencies into .venv" >&2
  # pip's output goes to a log and is shown only if the install fails.
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip &&
         .venv/bin/python -m pip install --disable-pip-version-check -e '.[test]'; } > .venv/install.log 2>&1; then
    cat .venv/install.log >&2
    echo "bootstrap: installing into .venv failed (log above, also in .venv/install.log)" >&2
    exit 3
  fi
  echo "$want" > "$stamp"
fi
