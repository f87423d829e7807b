"""The packages: a wheel, an sdist, four .deb and four RPMs built from this checkout; the .debs
installed on this machine, a node checked and a lease run from the installed files, then purged."""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import tarfile
import zipfile

import pytest

import workspace_common
from tests.support.pool import pool_pages

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VERSION = workspace_common.__version__
DEBS = ("workspace-pilot-common", "workspace-pilot-node", "workspace-lease-service", "workspace-pilot-doc")
COMMANDS = {"workspace-pilot", "workspace-lease", "workspace-killall", "workspace-node-status", "lease-bench",
            "workspace-vmjob"}


def run(*argv: str, timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, **kwargs)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """packaging/build-packages.sh into a temporary directory (once for this module)."""
    if not (shutil.which("dpkg-deb") and shutil.which("rpmbuild")):
        pytest.skip("dpkg-deb and rpmbuild are needed (scripts/bootstrap.sh --test installs them)")
    out = str(tmp_path_factory.mktemp("packages"))
    done = run(os.path.join(REPO, "packaging", "build-packages.sh"), out, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def deb_files(path: str) -> dict[str, str]:
    """path -> mode string (e.g. '-r--r-----') of every file in a .deb."""
    listing = run("dpkg-deb", "-c", path).stdout
    return {line.split()[-1].lstrip("."): line.split()[0] for line in listing.splitlines()}


def test_the_wheel_and_the_sdist_carry_the_one_version_and_everything(built):
    (wheel,) = glob.glob(os.path.join(built, "dist", "*.whl"))
    (sdist,) = glob.glob(os.path.join(built, "dist", "*.tar.gz"))
    assert os.path.basename(wheel) == f"workspace_pilot-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = archive.read(f"workspace_pilot-{VERSION}.dist-info/entry_points.txt").decode()
        metadata = archive.read(f"workspace_pilot-{VERSION}.dist-info/METADATA").decode()
    assert {"pilot/cli.py", "pilot/firstshot.py", "service_adapter/metrics.py", "admin_tools/nodestatus.py",
            "pilot/vm/guestagent.sh"} <= names  # the guest agent a VM's seed carries
    assert set(re.findall(r"^([a-z-]+) = ", entry_points, re.M)) == COMMANDS
    assert f"\nVersion: {VERSION}\n" in metadata and "Requires-Dist: prometheus_client" in metadata
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    assert {"README.md", "docs/scaling.md", "packaging/workspace-lease.service", "packaging/workspace-pilot.spec",
            "packaging/build-packages.sh", "tests/test_packaging.py", "scripts/bootstrap.sh",
            "pilot/vm/guestagent.sh"} <= names


def test_the_debs_split_node_service_and_docs_with_their_conffiles(built):
    paths = {name: os.path.join(built, f"{name}_{VERSION}_{arch}.deb")
             for name, arch in zip(DEBS, (run("dpkg", "--print-architecture").stdout.strip(), "all", "all", "all"))}
    files = {name: deb_files(path) for name, path in paths.items()}
    assert {"/usr/bin/workspace-lease", "/usr/bin/lease-bench", "/usr/lib/workspace-pilot/make-venv"} <= set(files[DEBS[0]])
    assert any(f.startswith("/usr/share/workspace-pilot/wheels/aiohttp-") for f in files[DEBS[0]])
    assert any(f.startswith("/usr/share/workspace-pilot/wheels/libvirt_python-") for f in files[DEBS[0]])
    node = files["workspace-pilot-node"]
    assert {"/usr/bin/workspace-pilot", "/usr/bin/workspace-killall", "/usr/bin/workspace-node-status",
            "/etc/workspace-pilot/pilot.conf", "/usr/lib/tmpfiles.d/workspace-pilot.conf", "/usr/bin/workspace-vmjob",
            "/etc/workspace-pilot/vmjob-images.conf", "/usr/share/workspace-pilot/slurm/job_submit.lua",
            "/usr/share/workspace-pilot/slurm/epilog", "/usr/share/workspace-pilot/pbs/epilogue"} <= set(node)
    assert node["/etc/sudoers.d/workspace-pilot"] == node["/etc/sudoers.d/workspace-vmjob"] == "-r--r-----"
    assert node["/usr/share/workspace-pilot/slurm/epilog"] == "-rwxr-xr-x"
    service = files["workspace-lease-service"]
    assert {"/lib/systemd/system/workspace-lease.service", "/etc/workspace-pilot/service.conf",
            "/etc/logrotate.d/workspace-lease"} <= set(service)
    docs = "/usr/share/doc/workspace-pilot/docs"
    assert {f"{docs}/scaling.md", f"{docs}/reference/cli.md"} <= set(files["workspace-pilot-doc"])
    conffiles = {name: run("dpkg-deb", "-I", path, "conffiles").stdout.split() for name, path in paths.items()}
    assert conffiles["workspace-pilot-node"] == ["/etc/workspace-pilot/pilot.conf", "/etc/workspace-pilot/vmjob-images.conf",
                                                 "/etc/sudoers.d/workspace-pilot", "/etc/sudoers.d/workspace-vmjob"]
    assert conffiles["workspace-lease-service"] == ["/etc/workspace-pilot/service.conf", "/etc/logrotate.d/workspace-lease"]
    depends = run("dpkg-deb", "-f", paths["workspace-pilot-node"], "Depends").stdout.strip()
    assert depends == f"workspace-pilot-common (= {VERSION}), sudo, iproute2, nftables, dnsmasq-base"


def test_the_rpms_hold_the_same_files_with_config_noreplace(built):
    rpms = {os.path.basename(p): p for p in glob.glob(os.path.join(built, "rpm", "RPMS", "*", "*.rpm"))}
    by_name = {run("rpm", "-qp", "--qf", "%{NAME}", p).stdout: p for p in rpms.values()}
    assert set(by_name) == {"workspace-pilot", "workspace-pilot-node", "workspace-lease-service", "workspace-pilot-doc"}
    node_files = set(run("rpm", "-qlp", by_name["workspace-pilot-node"]).stdout.split())
    assert {"/usr/bin/workspace-pilot", "/etc/sudoers.d/workspace-pilot", "/etc/workspace-pilot/pilot.conf",
            "/usr/bin/workspace-vmjob", "/etc/sudoers.d/workspace-vmjob",
            "/usr/share/workspace-pilot/slurm/job_submit.lua"} <= node_files
    configs = run("rpm", "-qcp", by_name["workspace-lease-service"]).stdout.split()
    assert configs == ["/etc/logrotate.d/workspace-lease", "/etc/workspace-pilot/service.conf"]
    assert run("rpm", "-qp", "--qf", "%{VERSION}", by_name["workspace-pilot"]).stdout == VERSION
    scripts = run("rpm", "-qp", "--scripts", by_name["workspace-pilot"]).stdout
    assert "/usr/lib/workspace-pilot/make-venv" in scripts


def test_the_shipped_unit_sudoers_and_tmpfiles_are_valid_for_their_tools(tmp_path):
    from pilot.evaluate import sudoers_rules

    packaging = os.path.join(REPO, "packaging")
    sudoers = os.path.join(packaging, "workspace-pilot.sudoers")
    assert run("visudo", "-c", "-f", sudoers).returncode == 0
    lines = open(sudoers, encoding="utf-8").read().splitlines()
    rules = [line for line in lines if line and line[0] != "#"]
    # Shipped inactive: the rule itself waits, commented out, for the site to name its account.
    assert rules + ["pilot" + lines[-1][len("#pilot"):]] == sudoers_rules("pilot", "/usr/bin/workspace-pilot")
    vmjob = open(os.path.join(packaging, "workspace-vmjob.sudoers"), encoding="utf-8").read()
    enabled = tmp_path / "workspace-vmjob.sudoers"  # as an admin turns it on
    enabled.write_text(vmjob.replace("#ALL ALL=(root)", "ALL ALL=(root)"))
    assert "\nALL ALL=(root) NOPASSWD: /usr/bin/workspace-vmjob run *\n" in enabled.read_text()
    for path in (os.path.join(packaging, "workspace-vmjob.sudoers"), str(enabled)):
        assert run("visudo", "-c", "-f", path).returncode == 0
    root = tmp_path / "root"
    root.mkdir()
    done = run("systemd-tmpfiles", "--create", f"--root={root}", os.path.join(packaging, "workspace-pilot.tmpfiles"))
    assert done.returncode == 0, done.stderr
    for path, mode in (("var/lib/workspace-pilot", 0o700), ("var/lib/workspace-pilot/image-cache", 0o700),
                       ("var/log/workspace-pilot", 0o755), ("run/workspace-pilot/net", 0o755)):
        assert os.stat(root / path).st_mode & 0o7777 == mode
    unit = open(os.path.join(packaging, "workspace-lease.service"), encoding="utf-8").read()
    for setting in ("User=workspace-lease", "NoNewPrivileges=yes", "ProtectSystem=strict", "LimitNOFILE=",
                    "Restart=on-failure", "StateDirectory=workspace-pilot-service", "LogsDirectory=workspace-lease"):
        assert setting in unit
    here = tmp_path / "workspace-lease.service"  # ExecStart must exist for verify: this checkout's command
    here.write_text(unit.replace("/usr/bin/workspace-lease", os.path.join(REPO, ".venv", "bin", "workspace-lease")))
    verified = run("systemd-analyze", "verify", str(here))
    assert verified.returncode == 0, verified.stderr


@pytest.fixture
def installed(built, hugepages):
    """The four .debs installed (dpkg -i), purged afterwards; skipped where they already are."""
    if run("dpkg-query", "-W", "workspace-pilot-common").returncode == 0:
        pytest.skip("workspace-pilot-common is installed on this machine: not touching it")
    debs = sorted(glob.glob(os.path.join(built, "*.deb")))
    try:
        done = run("dpkg", "-i", *debs, env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
        assert done.returncode == 0, done.stdout + done.stderr
        yield
    finally:
        purged = run("dpkg", "--purge", *DEBS)
        assert purged.returncode == 0, purged.stdout + purged.stderr
    assert not os.path.exists("/opt/workspace-pilot") and not os.path.exists("/usr/bin/workspace-pilot")


def test_installed_the_node_is_evaluated_and_a_lease_runs_from_the_installed_files(installed, tmp_path, hugepages):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTHON"))}
    env["PATH"] = "/usr/sbin:/usr/bin:/sbin:/bin"  # not this checkout's .venv
    assert run("/usr/bin/workspace-pilot", "--version", env=env).stdout.strip() == f"workspace-pilot {VERSION}"
    evaluated = run("/usr/bin/workspace-pilot", "evaluate", "--batch-user", "nobody", env=env, timeout=120)
    assert evaluated.returncode in (0, 12), evaluated.stdout + evaluated.stderr
    assert evaluated.stdout.splitlines()[-1] == "nobody ALL=(root) NOPASSWD: /usr/bin/workspace-pilot reserve *"
    # The packaged pilot runs from /opt/workspace-pilot, not from this checkout.
    where = run("/opt/workspace-pilot/bin/python", "-c", "import pilot; print(pilot.__file__)", env=env, cwd="/").stdout
    assert where.startswith("/opt/workspace-pilot/lib/")
    demo = run("/usr/bin/workspace-lease", "demo", "--nodes", "1", "--memory", "16", "--duration", "5",
               "--workdir", str(tmp_path / "demo"), env=env, cwd="/", timeout=180)
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "unreserved" in demo.stdout
    assert pool_pages() == hugepages
    verified = run("systemd-analyze", "verify", "/lib/systemd/system/workspace-lease.service")
    assert verified.returncode == 0, verified.stderr
    assert run("getent", "passwd", "workspace-lease").returncode == 0
