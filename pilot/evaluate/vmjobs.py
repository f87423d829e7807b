"""The node's checks for VM jobs (``workspace-vmjob``): its image list, virtiofsd, user namespaces.

A node without an image list does not run VM jobs: one ok line says so.
With one, what a VM job needs before its first run is checked here, so an
admin learns it from ``evaluate`` rather than from a user's failed job.
"""

from __future__ import annotations

import os
import stat

from pilot.config import PilotConfig
from pilot.evaluate.check import FAIL, OK, WARN, Check, plural

MAX_USER_NAMESPACES = "/proc/sys/user/max_user_namespaces"


def check_vmjobs(config: PilotConfig) -> list[Check]:
    """The image list (every image's files present in the image directory), virtiofsd, unshare, user namespaces."""
    from workspace_common.ini import ConfigError
    from pilot.vmjob.catalog import load_catalog
    from pilot.vmjob.virtiofs import UNSHARE

    path = config.vmjob_images
    if not os.path.exists(path):
        return [Check(OK, "VM jobs", f"not set up on this node (no image list at {path})")]
    try:
        catalog = load_catalog(path)
    except ConfigError as exc:
        return [Check(FAIL, "VM job images", problem) for problem in exc.problems]
    if not catalog:
        return [Check(OK, "VM jobs", f"not used on this node (no image in {path})")]
    checks = []
    missing = []
    for name, image in sorted(catalog.items()):
        for part, file in (("disk", image.disk), ("kernel", image.kernel), ("initrd", image.initrd)):
            if file is not None and not _regular(os.path.join(config.image_dir, file.path)):
                missing.append(f"{name} {part} {file.path}")
    if missing:
        checks.append(Check(WARN, "VM job images", f"not in {config.image_dir}: {'; '.join(missing)} "
                                                  "(jobs asking for these images will be refused)"))
    else:
        names = ", ".join(sorted(catalog))
        checks.append(Check(OK, "VM job images", f"{plural(len(catalog), 'image')} ({names}); their sha256 is "
                                                 "checked at every job"))
    for what, executable in (("virtiofsd", config.vmjob_virtiofsd), ("unshare", UNSHARE)):
        if os.path.isfile(executable) and os.access(executable, os.X_OK):
            checks.append(Check(OK, f"VM jobs: {what}", executable))
        else:
            checks.append(Check(FAIL, f"VM jobs: {what}", f"{executable} is not an executable file; VM jobs "
                                "cannot share the job's directory ([vmjob] virtiofsd)"))
    checks.append(_user_namespaces())
    return checks


def _regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _user_namespaces() -> Check:
    try:
        with open(MAX_USER_NAMESPACES, encoding="ascii") as handle:
            allowed = int(handle.read())
    except (OSError, ValueError):
        return Check(WARN, "VM jobs: user namespaces", f"cannot read {MAX_USER_NAMESPACES}")
    if allowed < 1:
        return Check(FAIL, "VM jobs: user namespaces", f"{MAX_USER_NAMESPACES} is 0: the share daemon runs as the "
                     "job's user in a user namespace; allow some (e.g. sysctl user.max_user_namespaces=1000)")
    return Check(OK, "VM jobs: user namespaces", f"allowed ({allowed})")
