"""How the processes of one study hear of each other: a failure marker and bounded waits.

A process that fails writes <out>/study.failed.json (atomically); every waiting process reads
it on each poll and stops with that failure's message. A wait also ends after --wait_timeout
seconds in which no process finished a step. A marker from an earlier launch must not stop a
relaunch: rank 0 removes it when it starts, and until then a process trusts only a marker
written after it was itself created (and, under torchelastic, by the same restart attempt).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from attn_utils.config import ConfigError, first_line
from attn_utils.images import shown
from attn_utils.runfiles import write_json_atomically

log = logging.getLogger(__name__)

MARKER = "study.failed.json"
# A study step is one concept's training or rendering: hours on a slow GPU, so be generous.
DEFAULT_WAIT_S = 6 * 3600.0
_CLOCK_SLACK_S = 2.0  # the nodes of one launch may disagree this much about the time
_IMPORTED = time.time()


class PeerFailed(ConfigError):
    """Another process of the study failed, so this one stops too."""


def process_start_time() -> float:
    """When this process was created (wall clock), i.e. before its slow imports."""
    try:
        import psutil  # installed with accelerate

        return psutil.Process().create_time()
    except Exception:  # no psutil, or a platform it cannot read: the next best moment
        return _IMPORTED


@dataclass
class FailureMarker:
    """study.failed.json as seen by one process of one launch."""

    path: Path
    rank: int
    world: int
    attempt: str | None = None  # TORCHELASTIC_RESTART_COUNT: a restart is a new launch
    started: float = field(default_factory=process_start_time)

    def clear(self) -> None:
        """Remove an earlier launch's marker (rank 0, before anything else)."""
        self.path.unlink(missing_ok=True)

    def write(self, error: BaseException) -> None:
        """Record that this process failed, with its one-line message."""
        data = {"rank": self.rank, "world_size": self.world, "error": first_line(error)}
        try:
            write_json_atomically(self.path, {**data, "time": time.time(), "attempt": self.attempt})
        except OSError as e:  # the original error matters more than this one
            log.warning("cannot write %s (%s)", shown(self.path), first_line(e))

    def check(self) -> None:
        """Raise PeerFailed when a process of this launch has written the marker."""
        try:
            m = json.loads(self.path.read_text(encoding="utf-8"))
            fresh = float(m["time"]) >= self.started - _CLOCK_SLACK_S
            ours = fresh and m.get("attempt") == self.attempt
            who, why = int(m["rank"]) + 1, str(m["error"])
        except (OSError, ValueError, KeyError, TypeError):
            return  # none, or not one we wrote
        if ours:
            raise PeerFailed(
                f"process {who}/{self.world} of the study failed ({why}); process "
                f"{self.rank + 1}/{self.world} stops too (see {shown(self.path)})"
            )


def wait_for(
    what: str,
    done: Callable[[], bool],
    marker: FailureMarker,
    timeout_s: float,
    poll_s: float,
    progress: Callable[[], object] = lambda: None,
) -> None:
    """Poll until done(); PeerFailed when another process fails, ConfigError after
    `timeout_s` seconds in which progress() did not change."""
    last, since = progress(), time.monotonic()
    while not done():
        marker.check()
        now = progress()
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since > timeout_s:
            raise ConfigError(
                f"--wait_timeout: waited {timeout_s:g} s for {what} without progress; "
                "is another process of the study still running?"
            )
        time.sleep(poll_s)
