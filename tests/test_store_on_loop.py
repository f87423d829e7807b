"""The store's writes awaited on an event loop (the receiver's path): settled there after the commit, one wake-up
of the loop per committed batch, and a caller that gave up does not disturb its neighbours. A real store on disk,
a real writer thread, a real asyncio loop; each test on a SQLite file and on the session's PostgreSQL."""

from __future__ import annotations

import asyncio
import threading

import pytest

from service_adapter.store import Store
from tests.support.postgres import rows_elsewhere


def test_a_batch_of_waiting_writes_wakes_the_loop_once_and_each_gets_its_own_result(store_location):
    store = Store(store_location)
    try:
        async def scenario():
            loop = asyncio.get_running_loop()
            wakes = []
            call_soon_threadsafe = loop.call_soon_threadsafe

            def counted(callback, *args, **kwargs):
                wakes.append(callback)
                return call_soon_threadsafe(callback, *args, **kwargs)

            loop.call_soon_threadsafe = counted
            gate = threading.Event()
            blocker = store.submit(lambda conn: gate.wait(10))  # the writer is busy with this one
            futures = [store.submit_on_loop(lambda conn, i=i: conn.execute("SELECT ?", (i,)).fetchone()[0])
                       for i in range(100)]
            failing = store.submit_on_loop(lambda conn: conn.execute("SELECT * FROM no_such_table"))
            given_up = store.submit_on_loop(lambda conn: 7)
            given_up.cancel()
            gate.set()
            results = await asyncio.gather(*futures)
            with pytest.raises(Exception, match="no such table|does not exist"):
                await failing
            assert blocker.result(10) is True
            return results, wakes

        results, wakes = asyncio.run(scenario())
        assert results == list(range(100))
        assert len(wakes) == 1  # the 102 writes after the blocker committed as one batch: one wake-up for all
    finally:
        store.close()


def test_a_write_awaited_on_a_loop_is_committed_before_its_future_settles(store_location):
    store = Store(store_location)
    try:
        async def scenario():
            await store.submit_on_loop(lambda conn: conn.execute("CREATE TABLE marks (n INTEGER)"))
            await store.submit_on_loop(lambda conn: conn.execute("INSERT INTO marks VALUES (42)"))

        asyncio.run(scenario())
        # Another connection (not the writer's transaction) sees it: the future came after the commit.
        assert rows_elsewhere(store_location, "SELECT n FROM marks") == [(42,)]
    finally:
        store.close()
