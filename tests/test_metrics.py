"""/metrics: the service's figures scraped with a real HTTP client from a real ``workspace-lease serve``."""

from __future__ import annotations

import json
import re
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families
from requests.auth import HTTPDigestAuth

from service_adapter.metrics import ServiceMetrics
from service_adapter.providers import ProviderSettings, make_provider
from service_adapter.providers.jobscript import JobTemplate
from tests.support.ports import free_port
from tests.support.site import OPERATOR, OPERATOR_SECRET, Site, serving


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """(sample name, sorted labels) -> value, parsed by prometheus_client's own parser."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def scrape(url: str, auth=None) -> requests.Response:
    return requests.get(url + "/metrics", auth=auth, timeout=20)


def test_metrics_behind_the_operators_digest_follow_a_lease(tmp_path, hugepages):
    site = Site(tmp_path)
    operator = HTTPDigestAuth(OPERATOR, OPERATOR_SECRET)
    with serving(site):
        assert scrape(site.url).status_code == 401  # no credentials: no figures
        assert scrape(site.url, HTTPDigestAuth(OPERATOR, "wrong")).status_code == 401
        reserved = site.cli("reserve", "--nodes", "2", "--memory", "32", "--duration", "60", "--json", "--wait")
        assert reserved.returncode == 0, reserved.stderr
        lease_id = json.loads(reserved.stdout)["id"]

        answer = scrape(site.url, operator)
        assert answer.status_code == 200 and answer.headers["Content-Type"].startswith("text/plain")
        during = samples(answer.text)
        assert during[("workspace_leases", (("state", "ready"),))] == 1
        assert during[("workspace_notifications_total", (("result", "accepted"),))] == 2  # each node's reserved
        assert during[("workspace_notification_seconds_count", ())] >= 2
        assert ("workspace_hosts_polling", ()) in during

        released = site.cli("release", lease_id, "--wait", "--json")
        assert released.returncode == 0, released.stderr
        after = samples(scrape(site.url, operator).text)
        assert after[("workspace_leases", (("state", "released"),))] == 1
        assert ("workspace_leases", (("state", "ready"),)) not in after
        assert after[("workspace_notifications_total", (("result", "accepted"),))] > 2  # and their goodbyes
        # Each pilot's command poll was handed its release: the wait from queued to handed is measured.
        assert after[("workspace_command_wait_seconds_count", (("op", "release"),))] == 2
        # Every figure the shipped Grafana dashboard plots is one the service exports.
        dashboard = json.loads((Path(__file__).parent.parent / "packaging" / "grafana-dashboard.json").read_text())
        plotted = {name for panel in dashboard["panels"] for target in panel["targets"]
                   for name in re.findall(r"workspace_[a-z_]+", target["expr"])}
        # The batch-system figures have a sample once a command ran (the local provider runs none):
        # the last test here shows them.
        exported = {name for name, _ in after} | {"workspace_lrm_command_seconds_bucket",
                                                  "workspace_lrm_command_failures_total"}
        assert plotted and plotted <= exported, plotted - exported


def test_metrics_on_a_separate_listener_without_credentials(tmp_path):
    port = free_port()
    site = Site(tmp_path)
    with open(site.config, "a", encoding="utf-8") as handle:
        handle.write(f"[metrics]\nlisten = 127.0.0.1:{port}\n")
    with serving(site):
        answer = scrape(f"http://127.0.0.1:{port}")
        assert answer.status_code == 200
        assert ("workspace_hosts_polling", ()) in samples(answer.text)
        # Not on the service's own port then (an operator gets 404 there, anyone else 401).
        assert scrape(site.url, HTTPDigestAuth(OPERATOR, OPERATOR_SECRET)).status_code == 404


def test_batch_system_commands_are_timed_and_their_failures_counted(slurm_cluster, tmp_path):
    metrics = ServiceMetrics()
    provider = make_provider(ProviderSettings(
        name="slurm", template=JobTemplate(output_dir=str(tmp_path)), env={"SLURM_CONF": slurm_cluster.conf},
        command_timeout_s=20))
    provider.observe = metrics.lrm_command
    provider.status(["999999"])  # a real squeue (and sacct if Slurm asks it) for a job that is not there
    provider.env = {"SLURM_CONF": str(tmp_path / "no-such.conf")}
    provider.status(["999998"])  # squeue fails without its config
    found = samples(metrics.render().decode())
    assert found[("workspace_lrm_command_seconds_count", (("command", "squeue"),))] == 2
    assert found[("workspace_lrm_command_failures_total", (("command", "squeue"), ("outcome", "nonzero-exit")))] == 1
