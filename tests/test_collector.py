"""serve's garbage collector settings (service_adapter.collector): few young scans, full ones on a schedule."""

import asyncio
import gc
import weakref

import pytest

from service_adapter import collector


class Node:
    """An object that can sit in a reference cycle, and be watched by a weak reference."""

    def __init__(self):
        self.other = None


@pytest.fixture
def restored_collector():
    """Whatever a test does to the collector, the session's settings come back after it."""
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)
    gc.collect()


def old_cycle() -> weakref.ref:
    """Two objects that refer to each other, kept alive through the young collections (so they sit in the oldest
    generation), then let go: garbage that only a full collection frees."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    gc.collect(1)  # survivors of the middle generation move to the oldest
    return weakref.ref(first)


def test_settle_freezes_what_start_up_made_and_raises_the_thresholds(restored_collector):
    collector.settle()
    assert gc.get_freeze_count() > 0  # this process's modules, functions, classes: out of every later scan
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, collector.MIDDLE_THRESHOLD, collector.FULL_THRESHOLD)


def test_a_cycle_that_outlived_the_young_collections_is_freed_by_the_scheduled_full_one(restored_collector):
    collector.settle()
    watched = old_cycle()
    gc.collect(1)
    assert watched() is not None  # unreachable, but the young collections do not look where it is

    async def one_interval():
        task = asyncio.create_task(collector.collect_fully_every(0.05))
        while watched() is not None:
            await asyncio.sleep(0.01)
        task.cancel()

    asyncio.run(asyncio.wait_for(one_interval(), 10))
    assert watched() is None
