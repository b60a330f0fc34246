"""Time several ways of one step against each other in one process, for a ratio that a busy
machine does not skew: each way is warmed up (two calls; the first one's time is kept apart,
e.g. a compilation), then the ways run in turn in blocks of steps, so that whatever else the
machine does slows them alike."""

from __future__ import annotations

import time
from collections.abc import Callable


def time_interleaved(
    ways: dict[str, Callable[[], None]], steps: int, block: int = 5
) -> tuple[dict[str, float], dict[str, float], int]:
    """(seconds per step of each way, seconds of each way's first call, timed steps each):
    at least one block, and steps rounded down to whole blocks."""
    first = {}
    for name, step in ways.items():
        t0 = time.perf_counter()
        step()
        first[name] = time.perf_counter() - t0
        step()
    seconds = dict.fromkeys(ways, 0.0)
    blocks = max(1, steps // block)
    for _ in range(blocks):
        for name, step in ways.items():
            t0 = time.perf_counter()
            for _ in range(block):
                step()
            seconds[name] += time.perf_counter() - t0
    n = blocks * block
    return {name: s / n for name, s in seconds.items()}, first, n
