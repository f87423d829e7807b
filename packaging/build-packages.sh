#!/usr/bin/env bash
# Build workspace-pilot's distributions and system packages from this checkout:
#
#   packaging/build-packages.sh OUTDIR
#
# OUTDIR/dist    the wheel and the sdist (python -m build)
# OUTDIR/wheels  the wheel and every dependency's wheel (what the packages install from, offline)
# OUTDIR/*.deb   workspace-pilot-common  the Python runtime: the wheels; its postinst makes the virtualenv
#                                        /opt/workspace-pilot from them (no network, no compiler);
#                                        workspace-lease and lease-bench in /usr/bin
#                workspace-pilot-node    a node's pilot, workspace-vmjob (with its Slurm job submit
#                                        filter and epilog, PBS epilogue), workspace-killall,
#                                        workspace-node-status, the sudoers rules, tmpfiles.d for the
#                                        journal and image cache, /etc/workspace-pilot/pilot.conf and
#                                        vmjob-images.conf (conffiles)
#                workspace-lease-service the service's systemd unit and user, service.conf (a conffile),
#                                        logrotate
#                workspace-pilot-doc     README, BENCHMARKS, docs/, the Grafana dashboard
# OUTDIR/rpm/... the same four as RPMs (rpmbuild, packaging/workspace-pilot.spec)
#
# The version comes from workspace_common/__init__.py (its one place). Run with the project's .venv (it needs
# the `build` module) from the repository root; needs dpkg-deb and rpmbuild (Debian's rpm package).
set -euo pipefail
out=$(realpath -m "${1:?usage: packaging/build-packages.sh OUTDIR}")
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"
python=${PYTHON:-$top/.venv/bin/python}
version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' workspace_common/__init__.py)
[ -n "$version" ] || { echo "build-packages: no __version__ in workspace_common/__init__.py" >&2; exit 3; }
mkdir -p "$out/dist" "$out/wheels"

"$python" -m build --sdist --wheel --outdir "$out/dist" . > "$out/build.log" 2>&1 ||
  { cat "$out/build.log" >&2; echo "build-packages: python -m build failed" >&2; exit 3; }
wheel="$out/dist/workspace_pilot-$version-py3-none-any.whl"
"$python" -m pip wheel --disable-pip-version-check --quiet --wheel-dir "$out/wheels" "$wheel" >> "$out/build.log" 2>&1 ||
  { cat "$out/build.log" >&2; echo "build-packages: pip wheel failed" >&2; exit 3; }

stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

# A /usr/bin command: the console script of the virtualenv the common package makes.
command_script() {  # PATH MODULE FUNCTION
  install -d "$(dirname "$1")"
  printf '#!/opt/workspace-pilot/bin/python\nimport sys\nfrom %s import %s\nsys.exit(%s())\n' "$2" "$3" "$3" > "$1"
  chmod 0755 "$1"
}

# -- the trees, shared by the .deb and .rpm builds ------------------------------------------------------
common=$stage/common
install -d "$common/usr/share/workspace-pilot/wheels"
cp "$out/wheels/"*.whl "$common/usr/share/workspace-pilot/wheels/"
install -D -m 0755 packaging/make-venv.sh "$common/usr/lib/workspace-pilot/make-venv"
sed -i "s/@VERSION@/$version/" "$common/usr/lib/workspace-pilot/make-venv"
command_script "$common/usr/bin/workspace-lease" service_adapter.cli main
command_script "$common/usr/bin/lease-bench" admin_tools.leasebench.cli main

node=$stage/node
command_script "$node/usr/bin/workspace-pilot" pilot.cli main
command_script "$node/usr/bin/workspace-killall" admin_tools.killall main
command_script "$node/usr/bin/workspace-node-status" admin_tools.nodestatus main
command_script "$node/usr/bin/workspace-vmjob" pilot.vmjob.cli main
install -D -m 0640 packaging/pilot.conf.example "$node/etc/workspace-pilot/pilot.conf"
install -D -m 0644 packaging/vmjob-images.conf.example "$node/etc/workspace-pilot/vmjob-images.conf"
install -D -m 0440 packaging/workspace-pilot.sudoers "$node/etc/sudoers.d/workspace-pilot"
install -D -m 0440 packaging/workspace-vmjob.sudoers "$node/etc/sudoers.d/workspace-vmjob"
install -D -m 0644 packaging/slurm/job_submit.lua "$node/usr/share/workspace-pilot/slurm/job_submit.lua"
install -D -m 0755 packaging/slurm/epilog "$node/usr/share/workspace-pilot/slurm/epilog"
install -D -m 0755 packaging/pbs/epilogue "$node/usr/share/workspace-pilot/pbs/epilogue"
install -D -m 0644 packaging/workspace-pilot.tmpfiles "$node/usr/lib/tmpfiles.d/workspace-pilot.conf"

service=$stage/service
install -D -m 0644 packaging/workspace-lease.service "$service/lib/systemd/system/workspace-lease.service"
install -D -m 0640 packaging/service.conf.example "$service/etc/workspace-pilot/service.conf"
install -D -m 0644 packaging/workspace-lease.logrotate "$service/etc/logrotate.d/workspace-lease"

doc=$stage/doc
install -d "$doc/usr/share/doc/workspace-pilot/docs/reference"
install -m 0644 README.md BENCHMARKS.md packaging/grafana-dashboard.json "$doc/usr/share/doc/workspace-pilot/"
install -m 0644 docs/*.md "$doc/usr/share/doc/workspace-pilot/docs/"
install -m 0644 docs/reference/*.md "$doc/usr/share/doc/workspace-pilot/docs/reference/"

# -- .deb -----------------------------------------------------------------------------------------------
deb() {  # NAME TREE ARCH DEPENDS DESCRIPTION [CONFFILE...]
  local name=$1 tree=$2 arch=$3 depends=$4 description=$5
  shift 5
  install -d "$tree/DEBIAN"
  {
    echo "Package: $name"
    echo "Version: $version"
    echo "Architecture: $arch"
    echo "Maintainer: workspace-pilot developers <root@localhost>"
    echo "Section: admin"
    echo "Priority: optional"
    [ -n "$depends" ] && echo "Depends: $depends"
    echo "Description: $description"
  } > "$tree/DEBIAN/control"
  for conffile in "$@"; do echo "$conffile"; done > "$tree/DEBIAN/conffiles"
  [ -s "$tree/DEBIAN/conffiles" ] || rm "$tree/DEBIAN/conffiles"
  for script in postinst prerm postrm; do
    if [ -f "packaging/debian/$name.$script" ]; then
      install -m 0755 "packaging/debian/$name.$script" "$tree/DEBIAN/$script"
    fi
  done
  dpkg-deb --root-owner-group --build "$tree" "$out/${name}_${version}_${arch}.deb" > /dev/null
}
arch=$(dpkg --print-architecture)
deb workspace-pilot-common "$common" "$arch" "python3 (>= 3.10), python3-venv, libvirt0" \
  "workspace-pilot's Python runtime (a virtualenv built from the shipped wheels at install)"
deb workspace-pilot-node "$node" all "workspace-pilot-common (= $version), sudo, iproute2, nftables, dnsmasq-base" \
  "workspace-pilot on a batch node: the pilot, workspace-vmjob, workspace-killall, workspace-node-status" \
  /etc/workspace-pilot/pilot.conf /etc/workspace-pilot/vmjob-images.conf /etc/sudoers.d/workspace-pilot \
  /etc/sudoers.d/workspace-vmjob
deb workspace-lease-service "$service" all "workspace-pilot-common (= $version), adduser" \
  "the workspace service (workspace-lease serve) as a systemd unit" \
  /etc/workspace-pilot/service.conf /etc/logrotate.d/workspace-lease
deb workspace-pilot-doc "$doc" all "" "workspace-pilot's documentation and Grafana dashboard"

# -- .rpm -----------------------------------------------------------------------------------------------
if command -v rpmbuild > /dev/null; then
  rpmbuild -bb --quiet --define "_topdir $out/rpm" --define "wp_version $version" --define "wp_stage $stage" \
    --define "_build_id_links none" packaging/workspace-pilot.spec >> "$out/build.log" 2>&1 ||
    { tail -30 "$out/build.log" >&2; echo "build-packages: rpmbuild failed" >&2; exit 3; }
fi
echo "build-packages: workspace-pilot $version in $out"
