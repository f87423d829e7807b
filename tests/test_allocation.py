"""The allocation check's memory of which nodes a job has: asked once per job, also when its nodes report at once."""

from __future__ import annotations

import subprocess
import threading
import time

from service_adapter.allocation import Allocations
from service_adapter.providers.local import LocalProvider
from tests.support.service import TEST_HOSTS, Service, notification


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


class CountedAllocations(Allocations):
    """Counts the calls that ask for a job's hosts (each one a worker thread's in the receiver)."""

    def __init__(self, provider):
        super().__init__(provider)
        self.calls = 0

    def hosts(self, job_id: str):
        self.calls += 1
        return super().hosts(job_id)


def test_through_the_receiver_the_nodes_of_one_job_reporting_at_once_share_one_thread(tmp_path):
    """Eight nodes of one job post their first `reserved` together to a real receiver: all are accepted, the
    batch system is asked once, and one worker thread asks for all of them (the others wait on the loop)."""
    simulator = subprocess.Popen(["sleep", "60"])
    provider = CountedLocalProvider(str(tmp_path / "local"))
    allocations = CountedAllocations(provider)
    service = Service(str(tmp_path), allocations=allocations)
    try:
        slot = service.add_slot(nodes=len(TEST_HOSTS))
        (job,) = provider.adopt([(slot, service.lease, list(TEST_HOSTS))], simulator.pid)
        service.store.set_job_id(slot, job)
        start = threading.Barrier(len(TEST_HOSTS))
        statuses: dict[str, int] = {}

        def report(host: str) -> None:
            session = service.session(host)
            start.wait()
            statuses[host] = service.post(session, notification(slot, host=host).to_json()).status_code

        threads = [threading.Thread(target=report, args=(host,)) for host in TEST_HOSTS]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert statuses == {host: 200 for host in TEST_HOSTS}
        assert provider.asked == 1
        assert allocations.calls == 1
    finally:
        service.close()
        simulator.kill()
        simulator.wait()
