"""The allocation check's memory of which nodes a job has: asked once per job, also when its nodes report at once."""

from __future__ import annotations

import subprocess
import threading
import time

from service_adapter.allocation import Allocations
from service_adapter.providers.local import LocalProvider


class CountedLocalProvider(LocalProvider):
    """The local provider, counting how often it is asked for a job's nodes (each answer takes 0.2 s,
    as an LRM query under load may, so that the nodes' checks overlap)."""

    def __init__(self, output_dir: str):
        super().__init__(output_dir)
        self.asked = 0

    def allocated_hosts(self, job_id: str):
        self.asked += 1
        time.sleep(0.2)
        return super().allocated_hosts(job_id)


def test_the_nodes_of_one_job_reporting_at_once_ask_the_batch_system_once(tmp_path):
    simulator = subprocess.Popen(["sleep", "60"])
    try:
        provider = CountedLocalProvider(str(tmp_path))
        hosts = [f"sim-{i}" for i in range(10)]
        (job,) = provider.adopt([("slot-a", "lease-a", hosts)], simulator.pid)
        allocations = Allocations(provider)
        assert allocations.known_hosts(job) is None  # nothing asked yet: the event loop's look says so
        start = threading.Barrier(len(hosts) + 1)
        answers: dict[str, bool | None] = {}

        def check(host: str) -> None:
            start.wait()
            answers[host] = allocations.holds(job, host)

        threads = [threading.Thread(target=check, args=(host,)) for host in hosts]
        for thread in threads:
            thread.start()
        start.wait()
        for thread in threads:
            thread.join(10)
        assert answers == {host: True for host in hosts}
        assert provider.asked == 1
        assert allocations.holds(job, "sim-99") is False and provider.asked == 1  # from memory
        assert allocations.known_hosts(job) == frozenset(hosts)
    finally:
        simulator.kill()
        simulator.wait()
