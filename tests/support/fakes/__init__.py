"""Stand-ins for what cannot run on these machines, each named as a fake.

Xen has no hypervisor here, so its ``xl`` command is replaced by
:mod:`tests.support.fakes.fake_xl`, which implements exactly ``xl list 0`` and
``xl mem-set 0 <N>m`` against a state file.
"""

from __future__ import annotations

import os
import sys

FAKE_XL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_xl.py")


def install_fake_xl(directory: str, dom0_mb: int, name: str = "fake-xl") -> str:
    """Put an executable fake ``xl`` in ``directory`` with Domain-0 at ``dom0_mb``; returns its path.

    It runs with this interpreter, isolated (``-IS``): through a pyenv shim a
    Python start costs ~90 ms, which would swamp what the tests measure.
    """
    path = os.path.join(directory, name)
    with open(FAKE_XL_SOURCE, encoding="utf-8") as source, open(path, "w", encoding="utf-8") as handle:
        handle.write(f"#!{os.path.realpath(sys.executable)} -IS\n" + source.read())
    os.chmod(path, 0o755)
    with open(os.path.join(directory, "fake-xl.state"), "w", encoding="ascii") as handle:
        handle.write(str(dom0_mb))
    return path
