"""The embedded local site for lease tests, closed at the end."""

from __future__ import annotations

from service_adapter.local_site import LocalSite


def local_site(tmp_path, name="site", **options) -> LocalSite:
    options.setdefault("grace_s", 3)
    options.setdefault("release_grace_s", 5)
    options.setdefault("status_interval_s", 0.2)
    return LocalSite(str(tmp_path / name), journal_dir=str(tmp_path / "journal"), **options)
