"""``workspace-pilot evaluate``: real configs, a real receiver, libvirt's test driver, the real hugepage pool (read only).

Path checks FAIL below /tmp (world-writable, sticky: see pilot/evaluate.py),
so the cases that need every path to be safe use a private tree created
under /root (0700) and removed afterwards: those need root.
"""

from __future__ import annotations

import io
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import pytest

from pilot.config import load_config
from pilot.evaluate import Check, check_journal, check_path, check_privilege, evaluate, resolve_chain
from pilot.exitcodes import ExitCode
from pilot.node.journal import Entry, Journal, MemoryRecord
from pilot.node.owner import Owner
from tests.support.pool import NR_HUGEPAGES, needs_root, pool_pages
from tests.support.ports import free_port
from tests.support.service import Service
from tests.support.owners import dead_owner

EXECUTABLE = os.path.realpath(os.path.join(os.path.dirname(sys.executable), "workspace-pilot"))


def _under_a_shared_directory(path: str) -> bool:
    """Whether some directory above ``path`` (or above a link to it) is world-writable: a checkout in /tmp."""
    path = os.path.dirname(os.path.abspath(path))
    while True:
        if os.stat(path).st_mode & stat.S_IWOTH:
            return True
        if path == "/":
            return False
        path = os.path.dirname(path)


#: The install's own paths that evaluate must FAIL when this checkout lives below a shared
#: directory such as /tmp (CI may clone anywhere): the "good node" cases expect exactly these.
INSTALL_FAILS = sorted(
    name for name, path in (
        ("workspace-pilot", EXECUTABLE),
        ("python", sys.executable),
        ("pilot package", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "pilot", "x")),
    ) if _under_a_shared_directory(path)
)


def check_good_node(code: int, lines: list[str]) -> None:
    """Ready, except for the install's own paths when the checkout is below a shared directory."""
    fails = sorted(text.split(":", 1)[0].removeprefix("FAIL path ") for text in lines if text.startswith("FAIL"))
    assert fails == INSTALL_FAILS, "\n".join(lines)
    assert code == (ExitCode.NOT_READY if INSTALL_FAILS else ExitCode.OK), "\n".join(lines)


@pytest.fixture
def private(tmp_path):
    """A directory only root can reach (not below /tmp), removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (a root-owned private tree for the path checks)")
    top = tempfile.mkdtemp(prefix="workspace-pilot-evaluate.", dir="/root")
    try:
        yield top
    finally:
        shutil.rmtree(top)


def write_config(directory, *, backend: str = "none", uri: str = "test:///default", node_key: bool = True,
                 mode: int = 0o600, service: str = "", memory: str = "") -> str:
    """A pilot config in ``directory`` whose journal and log dirs are ``<directory>/journal`` and ``/logs``.

    ``node_key``: write a node key at ``<directory>/node.key`` (0600) and name it. ``service`` and
    ``memory`` are extra option lines for those sections.
    """
    path = os.path.join(directory, "pilot.conf")
    key_file = os.path.join(directory, "node.key")
    if node_key:
        fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as handle:
            handle.write("7" * 64 + "\n")
    secret_line = f"node_key_file = {key_file}\n"
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(
            f"[service]\n{secret_line}{service}[memory]\nbackend = {backend}\n{memory}"
            f"[journal]\ndir = {directory}/journal\n[logging]\ndir = {directory}/logs\n"
            f"[libvirt]\nuri = {uri}\n[vms]\nimage_dir = {directory}/images\nconsole_dir = {directory}/consoles\n"
        )
    os.makedirs(os.path.join(directory, "images"), mode=0o755, exist_ok=True)
    os.chmod(path, mode)
    return path


def run(config: str, contact: str | None = None, batch_user: str | None = "nobody") -> tuple[int, list[str]]:
    """evaluate() in this process; its exit code and printed lines."""
    out = io.StringIO()
    code = evaluate(config, contact, batch_user, out=out)
    return code, out.getvalue().splitlines()


def line(lines: list[str], prefix: str) -> str:
    """The one printed line starting with ``prefix`` (a check's status and name)."""
    found = [text for text in lines if text.startswith(prefix)]
    assert len(found) == 1, f"expected one line starting {prefix!r} in:\n" + "\n".join(lines)
    return found[0]


def snapshot(top: str) -> dict[str, tuple]:
    """Every path below ``top`` with its type, mode, owner, size and mtime."""
    seen = {}
    for directory, dirs, files in os.walk(top):
        for name in [".", *dirs, *files]:
            path = os.path.normpath(os.path.join(directory, name))
            info = os.lstat(path)
            seen[path] = (info.st_mode, info.st_uid, info.st_size, info.st_mtime_ns)
    return seen


# -- the whole command -------------------------------------------------------


def test_a_good_node_is_ready_and_the_last_line_is_the_sudoers_rule(private, tmp_path):
    os.mkdir(os.path.join(private, "journal"), 0o700)
    os.mkdir(os.path.join(private, "logs"), 0o755)
    config = write_config(private, backend="hugepages")
    service = Service(str(tmp_path))
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pilot", "evaluate", "--config", config, "--contact", service.url,
             "--batch-user", "nobody"],
            capture_output=True, text=True, timeout=30,
        )
    finally:
        service.close()
    lines = done.stdout.splitlines()
    check_good_node(done.returncode, lines)
    assert done.stderr == ""
    assert line(lines, "ok   privilege").endswith("running as root (uid 0)")
    for name in ("workspace-pilot", "python", "pilot package", "config", "journal dir", "log dir"):
        if name not in INSTALL_FAILS:
            assert line(lines, f"ok   path {name}:")
    if "workspace-pilot" not in INSTALL_FAILS:
        assert line(lines, "ok   path workspace-pilot:").startswith(f"ok   path workspace-pilot: {EXECUTABLE}:")
    assert "hugepages (page_kb=2048): level " in line(lines, "ok   memory backend:")
    assert line(lines, "ok   journal ") == f"ok   journal {private}/journal: no entries"
    assert line(lines, "ok   libvirt test:///default:")
    assert line(lines, f"ok   service contact {service.url}:").endswith("with a SHA-256 digest challenge")
    assert line(lines, "ok   batch user:").startswith("ok   batch user: nobody (uid ")
    assert lines[-8].startswith("NOT READY: " if INSTALL_FAILS else "ready: ") and lines[-7] == ""
    assert lines[-6].startswith("# install with visudo -f /etc/sudoers.d/workspace-pilot")
    # root's PATH is fixed, and the batch systems' config locations (SLURM_CONF, SGE_*) do not cross sudo
    assert lines[-3] == f'Defaults!{EXECUTABLE} secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"'
    assert lines[-2] == (
        f'Defaults!{EXECUTABLE} env_keep += "SLURM_JOB_ID SLURM_JOB_END_TIME SLURMD_NODENAME PBS_JOBID PBS_WALLTIME JOB_ID WORKSPACE_PILOT_SLOT_SECRET"'
    )
    assert lines[-1] == f"nobody ALL=(root) NOPASSWD: {EXECUTABLE} reserve *"
    assert os.path.isabs(EXECUTABLE)


def test_evaluate_changes_nothing(private, tmp_path):
    config = write_config(private, backend="hugepages")
    pool = pool_pages()
    before = snapshot(private)
    service = Service(str(tmp_path))
    try:
        stored = service.store.snapshot()
        code, lines = run(config, contact=service.url)
        assert service.store.snapshot() == stored  # the probe was refused before anything was stored
    finally:
        service.close()
    check_good_node(code, lines)
    assert "does not exist; the first pilot creates it (mode 0700)" in line(lines, "warn path journal dir:")
    assert "does not exist; the first pilot creates it (mode 0755)" in line(lines, "warn path log dir:")
    assert line(lines, "ok   path image dir:")
    assert "does not exist; the first pilot creates it (mode 0700)" in line(lines, "warn path console dir:")
    assert not os.path.lexists(os.path.join(private, "journal"))
    assert not os.path.lexists(os.path.join(private, "logs"))
    assert snapshot(private) == before
    assert pool_pages() == pool
    with open(NR_HUGEPAGES, encoding="ascii") as handle:
        assert int(handle.read()) == pool


def test_a_bad_config_is_exit_3_with_one_line_per_problem(tmp_path):
    config = tmp_path / "pilot.conf"
    config.write_text("[memory]\nbackend = magic\nminmem = lots\n[nosuch]\n")
    done = subprocess.run(
        [sys.executable, "-m", "pilot", "evaluate", "--config", str(config)],
        capture_output=True, text=True, timeout=30,
    )
    assert done.returncode == ExitCode.CONFIG
    assert done.stdout == ""
    problems = done.stderr.splitlines()
    assert len(problems) == 3, done.stderr
    assert all(text.startswith(f"workspace-pilot: config error: {config}: ") for text in problems)
    assert "backend = 'magic'" in done.stderr and "minmem = 'lots'" in done.stderr and "[nosuch]" in done.stderr


def test_a_missing_config_file_is_exit_3(tmp_path):
    code, lines = run(str(tmp_path / "absent.conf"))
    assert code == ExitCode.CONFIG and lines == []


# -- paths -------------------------------------------------------------------


def test_a_group_writable_journal_dir_fails_naming_it(private):
    journal = os.path.join(private, "journal")
    os.mkdir(journal)
    os.chmod(journal, 0o770)
    code, lines = run(write_config(private))
    assert code == ExitCode.NOT_READY
    assert line(lines, "FAIL path journal dir:") == (
        f"FAIL path journal dir: {journal} is writable by group (owner uid 0, mode 0770): chmod go-w {journal}"
    )
    assert "writable by group" in line(lines, f"FAIL journal {journal}:")
    assert lines[-1].startswith("nobody ALL=(root) NOPASSWD: ")  # printed whatever failed


def test_a_config_others_can_read_is_fine_it_holds_no_secret(private):
    config = write_config(private, mode=0o644)
    code, lines = run(config)
    assert line(lines, "ok   path config:")
    assert line(lines, "ok   node key:")


def test_a_node_key_readable_by_others_fails(private):
    config = write_config(private)
    key = os.path.join(private, "node.key")
    os.chmod(key, 0o640)
    code, lines = run(config)
    assert code == ExitCode.NOT_READY
    assert line(lines, "FAIL path node key:") == (
        f"FAIL path node key: {key} is readable by group or others (mode 0640) and holds a secret: chmod 0600 {key}"
    )
    assert "is open to group or others (mode 0640): chmod 600 it" in line(lines, "FAIL node key:")


def test_files_below_sticky_tmp_fail(tmp_path):
    # tmp_path lives below /tmp (1777): anyone may create the missing journal dir there before root does.
    config = write_config(str(tmp_path))
    code, lines = run(config)
    assert code == ExitCode.NOT_READY
    failed = line(lines, "FAIL path config:")
    assert "/tmp is a shared directory (owner uid 0, mode 1777" in failed
    assert "/tmp is a shared directory" in line(lines, "FAIL path journal dir:")


def test_a_symlink_is_followed_and_its_target_checked(private):
    target = os.path.join(private, "real")
    os.mkdir(target)
    os.chmod(target, 0o775)
    os.symlink("real", os.path.join(private, "link"))
    chain, exists = resolve_chain(os.path.join(private, "link", "journal"))
    assert not exists and chain[-2:] == [private, target]
    check = check_path("path journal dir", os.path.join(private, "link", "journal"), create_mode=0o700)
    assert check == Check("FAIL", "path journal dir", f"{target} is writable by group (owner uid 0, mode 0775): "
                                                      f"chmod go-w {target}")
    os.chmod(target, 0o755)
    os.mkdir(os.path.join(target, "journal"), 0o700)
    check = check_path("path journal dir", os.path.join(private, "link", "journal"))
    assert check.status == "ok" and f"-> {target}/journal" in check.detail


def test_a_path_owned_by_another_user_fails(private):
    os.mkdir(os.path.join(private, "logs"), 0o755)
    os.chown(os.path.join(private, "logs"), 65534, 65534)
    code, lines = run(write_config(private))
    assert code == ExitCode.NOT_READY
    assert line(lines, "FAIL path log dir:").endswith(f"belongs to uid 65534 (mode 0755), not root: chown root {private}/logs")


# -- journal -------------------------------------------------------------------


def test_a_dead_pilots_entry_fails_run_workspace_killall(private):
    journal = Journal(os.path.join(private, "journal"))
    journal.prepare()
    gone = dead_owner()
    journal.write(Entry("slot-dead", "node1", gone, memory=MemoryRecord("none", {}, "held", 64, 64)))
    config = write_config(private)
    before = snapshot(private)
    code, lines = run(config)
    assert code == ExitCode.NOT_READY
    failed = line(lines, f"FAIL journal {journal.directory}:")
    assert f"slot slot-dead on node1, pid {gone.pid}" in failed and failed.endswith("run workspace-killall")
    assert snapshot(private) == before  # no lock file, nothing replayed


def test_a_live_pilots_entry_warns_and_an_unreadable_one_fails(private):
    journal = Journal(os.path.join(private, "journal"))
    journal.prepare()
    journal.write(Entry("slot-live", "node1", Owner.current()))
    code, lines = run(write_config(private))
    check_good_node(code, lines)
    assert line(lines, f"warn journal {journal.directory}:").endswith(
        f"1 pilot(s) hold slots now (slot slot-live on node1, pid {os.getpid()})"
    )
    with open(os.path.join(journal.directory, "junk.json"), "w", encoding="utf-8") as handle:
        handle.write("{not json")
    code, lines = run(write_config(private))
    assert code == ExitCode.NOT_READY
    assert "1 unreadable entry (junk.json: not a journal entry" in line(lines, f"FAIL journal {journal.directory}:")


# -- backend, libvirt, contact, user, privilege ---------------------------------


def test_backend_none_warns_loudly_and_minmem_above_the_host_fails(tmp_path):
    code, lines = run(write_config(str(tmp_path)))
    assert "backend none sets NO memory aside" in line(lines, "warn memory backend:")
    code, lines = run(write_config(str(tmp_path), memory="minmem = 100000000\n"))
    assert code == ExitCode.NOT_READY
    failed = line(lines, "FAIL memory backend:")
    assert "minmem 100000000 MB" in failed and "the host is already below minmem" in failed


def test_the_guests_user_is_read_from_the_real_libvirt_and_its_way_to_the_images_checked(guest_reachable,
                                                                                         libvirt_qemu):
    # The tests' own libvirtd runs QEMU as libvirt-qemu (scripts/bootstrap.sh, qemu.conf): evaluate says so,
    # from what libvirt itself reports, and checks that this user can search its way to the site's images.
    import pwd

    tmp_path = guest_reachable
    uid = pwd.getpwnam("libvirt-qemu").pw_uid
    os.chmod(tmp_path, 0o700)  # its image directory <tmp_path>/images is 0755, but the way there is closed
    code, lines = run(write_config(str(tmp_path), uri=libvirt_qemu.uri))
    assert line(lines, f"ok   libvirt {libvirt_qemu.uri}:")
    assert line(lines, "ok   guests:") == (
        f"ok   guests: run as uid {uid} (libvirt's DAC label), with no confinement (security_driver)")
    warned = line(lines, "warn guests:")
    assert warned == (f"warn guests: cannot reach the image directory: {tmp_path} is root:root 0700: the guests' user "
                      f"(uid {uid}) cannot search it; VMs booting from its images are refused (make it and its "
                      f"images readable by gid {pwd.getpwnam('libvirt-qemu').pw_gid})")
    os.chmod(tmp_path, 0o711)
    code, lines = run(write_config(str(tmp_path), uri=libvirt_qemu.uri))
    assert not [text for text in lines if text.startswith("warn guests:")]


def test_guests_run_as_root_are_warned_about():
    from pilot.evaluate.node import check_guest_user

    root = ("<capabilities><host><secmodel><model>none</model><doi>0</doi></secmodel><secmodel><model>dac</model>"
            "<doi>0</doi><baselabel type='kvm'>+0:+0</baselabel><baselabel type='qemu'>+0:+0</baselabel>"
            "</secmodel></host></capabilities>")
    (warned,) = check_guest_user(root)
    assert warned.line().startswith("warn guests: run as root (libvirt's DAC label +0:+0), with no confinement")
    assert warned.line().endswith("dynamic_ownership = 1 in /etc/libvirt/qemu.conf")


def test_guests_of_an_unprivileged_user_are_fine_and_other_drivers_say_nothing():
    from pilot.evaluate.node import check_guest_user

    qemu = ("<capabilities><host><secmodel><model>apparmor</model><doi>0</doi></secmodel><secmodel><model>dac"
            "</model><doi>0</doi><baselabel type='kvm'>+64055:+994</baselabel><baselabel type='qemu'>+64055:+994"
            "</baselabel></secmodel></host></capabilities>")
    (check,) = check_guest_user(qemu)
    assert check.line() == "ok   guests: run as uid 64055 (libvirt's DAC label), confined by apparmor"
    assert check_guest_user("<capabilities><host><secmodel><model>testSecurity</model></secmodel></host>"
                            "</capabilities>") == []


def test_an_unreachable_libvirt_fails_and_an_empty_uri_warns(tmp_path):
    uri = f"qemu+unix:///system?socket={tmp_path}/nosock"
    code, lines = run(write_config(str(tmp_path), uri=uri))
    assert code == ExitCode.NOT_READY
    failed = line(lines, f"FAIL libvirt {uri}:")
    assert "cannot connect:" in failed and failed.endswith("is libvirtd running?")
    code, lines = run(write_config(str(tmp_path), uri=""))
    assert line(lines, "warn libvirt:").endswith("VMs are disabled, pilots only set memory aside")


def test_a_contact_where_nothing_listens_fails(tmp_path):
    contact = f"http://127.0.0.1:{free_port()}"
    code, lines = run(write_config(str(tmp_path)), contact=contact)
    assert code == ExitCode.NOT_READY
    assert "Connection refused; check the URL and that the service runs" in line(
        lines, f"FAIL service contact {contact}:"
    )


def test_a_contact_that_is_not_the_service_fails(tmp_path):
    # A real HTTP server that is not the workspace service: it answers, but with no digest challenge.
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "--directory", str(tmp_path), "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    try:
        port = server.stdout.readline().split("port ")[1].split()[0]
        contact = f"http://127.0.0.1:{port}"
        code, lines = run(write_config(str(tmp_path)), contact=contact)
    finally:
        server.kill()
        server.wait()
    assert code == ExitCode.NOT_READY
    assert "not 401 with a digest challenge: is this the workspace service's URL?" in line(
        lines, f"FAIL service contact {contact}:"
    )


def test_no_contact_is_skipped_and_no_node_key_fails_but_the_rest_runs(tmp_path):
    code, lines = run(write_config(str(tmp_path), node_key=False), contact=None)
    assert code == ExitCode.NOT_READY
    assert line(lines, "warn service contact:").startswith("warn service contact: none given, not checked")
    assert "No such file or directory (make it on the service's host with: workspace-lease node-key HOST)" in line(
        lines, "FAIL node key:")
    assert line(lines, "ok   libvirt test:///default:")  # the other checks still ran


def test_a_bad_batch_user_fails_and_gets_no_sudoers_line(tmp_path):
    code, lines = run(write_config(str(tmp_path)), batch_user="Robert'); DROP")
    assert code == ExitCode.NOT_READY
    assert "is not a valid user name" in line(lines, "FAIL batch user:")
    assert not [text for text in lines if "NOPASSWD" in text]
    assert lines[-1].startswith("# no sudoers line:")


def test_the_batch_user_defaults_to_sudo_user_then_pilot(tmp_path, monkeypatch):
    config = write_config(str(tmp_path))
    monkeypatch.setenv("SUDO_USER", "alice")
    assert run(config, batch_user=None)[1][-1] == f"alice ALL=(root) NOPASSWD: {EXECUTABLE} reserve *"
    monkeypatch.delenv("SUDO_USER")
    assert run(config, batch_user=None)[1][-1] == f"pilot ALL=(root) NOPASSWD: {EXECUTABLE} reserve *"


def test_without_root_the_sudo_rule_is_required():
    # The real sudo (or its absence) is asked; nobody (uid 65534) has no rule for this checkout's executable.
    [check] = check_privilege(EXECUTABLE, "nobody", euid=65534)
    assert check.status == "FAIL" and check.what == "privilege"
    assert check.detail.startswith("not root (uid 65534) and ") and check.detail.endswith(
        ": install the sudoers line below"
    )


@needs_root
def test_as_root_a_missing_rule_for_the_batch_user_only_warns():
    checks = check_privilege(EXECUTABLE, "nobody")
    assert checks[0] == Check("ok", "privilege", "running as root (uid 0)")
    assert checks[1].what == "sudo rule for nobody" and checks[1].status in ("ok", "warn")


def test_as_another_user_hidden_paths_warn_instead_of_lying(private):
    # A pilot's tree that this uid cannot look into: evaluate says so, it neither guesses nor FAILs.
    os.mkdir(os.path.join(private, "journal"), 0o700)
    config = write_config(private)
    loaded = load_config(config, require_service=False)
    os.seteuid(65534)
    try:
        journal = check_journal(loaded)
        path = check_path("path journal dir", loaded.journal_dir, create_mode=0o700)
    finally:
        os.seteuid(0)
    assert journal == [Check("warn", f"journal {private}/journal",
                             "cannot list it as uid 65534: run evaluate as root to see its entries")]
    assert path.status == "warn" and f"cannot look at {private} as uid 65534: run evaluate as root" in path.detail


def test_an_image_dir_others_can_write_makes_the_node_not_ready(private):
    config = write_config(private)
    os.chmod(os.path.join(private, "images"), 0o777)  # anyone could swap an image between its hash and its boot
    code, lines = run(config)
    assert line(lines, "FAIL path image dir:")
    assert code != 0


# -- VM jobs -------------------------------------------------------------------


def test_a_node_without_an_image_list_does_not_run_vm_jobs_and_that_is_fine(tmp_path):
    config = write_config(str(tmp_path))
    with open(config, "a", encoding="utf-8") as handle:
        handle.write(f"[vmjob]\nimages = {tmp_path}/no-such-list.conf\n")
    _, lines = run(config)
    assert line(lines, "ok   VM jobs") == f"ok   VM jobs: not set up on this node (no image list at {tmp_path}/no-such-list.conf)"


def test_vm_job_prerequisites_are_checked_when_images_are_listed(tmp_path):
    config = write_config(str(tmp_path))
    (tmp_path / "images" / "vmlinuz").write_bytes(b"k")
    listed = tmp_path / "vmjob-images.conf"
    listed.write_text(f"[present]\nkernel = vmlinuz\nkernel_sha256 = {'a' * 64}\n"
                      f"[absent]\ndisk = gone.qcow2\ndisk_sha256 = {'b' * 64}\n")
    with open(config, "a", encoding="utf-8") as handle:
        handle.write(f"[vmjob]\nimages = {listed}\nvirtiofsd = {tmp_path}/no-virtiofsd\n")
    code, lines = run(config)
    assert code == ExitCode.NOT_READY
    assert line(lines, "warn VM job images").endswith(
        f"not in {tmp_path}/images: absent disk gone.qcow2 (jobs asking for these images will be refused)")
    assert line(lines, "FAIL VM jobs: virtiofsd").startswith(f"FAIL VM jobs: virtiofsd: {tmp_path}/no-virtiofsd is not")
    assert line(lines, "ok   VM jobs: unshare") == "ok   VM jobs: unshare: /usr/bin/unshare"
    assert line(lines, "ok   VM jobs: user namespaces").startswith("ok   VM jobs: user namespaces: allowed (")
    listed.write_text("# no image yet\n")
    _, lines = run(config)
    assert line(lines, "ok   VM jobs") == f"ok   VM jobs: not used on this node (no image in {listed})"
