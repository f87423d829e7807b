#!/bin/sh
# Make (or remake) workspace-pilot's virtualenv /opt/workspace-pilot from the wheels the package
# ships, offline: no network and no compiler on the node. It uses the system's /usr/bin/python3:
# the wheels are for its Python version, so build the packages on the distribution they are for.
# Run by the common package's postinst (Debian) or %post (RPM); safe to run again (after an upgrade
# of python3, say).
set -eu
venv=/opt/workspace-pilot
wheels=/usr/share/workspace-pilot/wheels
rm -rf "$venv.new"
/usr/bin/python3 -m venv "$venv.new"
"$venv.new/bin/python" -m pip install --quiet --disable-pip-version-check --no-index --find-links "$wheels" \
  "workspace-pilot==@VERSION@"
# The console scripts in /usr/bin name /opt/workspace-pilot/bin/python: fix the new tree's own
# scripts to the final path, then swap it in whole.
sed -i "1s|^#!$venv.new/bin/|#!$venv/bin/|" "$venv.new"/bin/* 2>/dev/null || true
sed -i "s|$venv.new|$venv|g" "$venv.new/pyvenv.cfg" "$venv.new/bin/activate" 2>/dev/null || true
/usr/bin/python3 -m compileall -q "$venv.new/lib" > /dev/null 2>&1 || true
rm -rf "$venv.old"
[ ! -e "$venv" ] || mv "$venv" "$venv.old"
mv "$venv.new" "$venv"
rm -rf "$venv.old"
