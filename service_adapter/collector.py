"""The cyclic garbage collector's settings for ``serve``: few full collections, each on a schedule.

A receiver holding 10,000 pilots' connections keeps about a million live objects that the
collector tracks. With CPython's defaults (700, 10, 10) a full collection runs each time that
heap has grown by a quarter, so a burst of new connections paid for about ten full scans of a
growing heap: a third of the service's CPU in the 10,000-pilot bench (bench/bench_scale.py,
measured with gc.callbacks). :func:`settle` instead

- freezes what start-up made (modules, the app, the config: never garbage) out of every scan;
- collects the young generations after 50,000 new objects rather than 700 (one scan of them
  costs about the same, so fewer scans cost less);
- leaves full collections to :func:`collect_fully_every`, which runs one every
  ``FULL_EVERY_S`` on the event loop: cyclic garbage that outlived the young collections (a
  closed connection's objects that refer to each other) waits at most that long, so memory
  stays bounded, and the pause (about 0.2 s with 10,000 connections) comes at a known rate
  instead of in the middle of a burst.

Reference counting frees everything that is not in a cycle at once, as always.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time

log = logging.getLogger(__name__)

#: New container objects (net of freed ones) between young collections (CPython's default: 700).
YOUNG_THRESHOLD = 50_000
#: Young collections before a middle one; middle ones before a full one (never reached in practice:
#: the full collections are :func:`collect_fully_every`'s).
MIDDLE_THRESHOLD, FULL_THRESHOLD = 20, 1_000_000
#: Seconds between the scheduled full collections.
FULL_EVERY_S = 600.0


def settle() -> None:
    """Collect what start-up left, freeze the rest out of later scans, and set the thresholds above."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(YOUNG_THRESHOLD, MIDDLE_THRESHOLD, FULL_THRESHOLD)


async def collect_fully_every(interval_s: float = FULL_EVERY_S) -> None:
    """Run a full collection every ``interval_s`` seconds until cancelled; each is logged at debug level."""
    while True:
        await asyncio.sleep(interval_s)
        started = time.perf_counter()
        found = gc.collect()
        log.debug("full collection: %d unreachable objects, %.0f ms", found, (time.perf_counter() - started) * 1000)
