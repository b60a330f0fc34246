"""What a stage's loop records besides its weights: the loss record and the training time.

    <run>/logs/loss.jsonl   one JSON object a line, at each read of the meter (every
                            --logging_steps steps, each checkpoint, validation and a stage's
                            end): {"stage", "step", "steps", "loss", "reg", "lr"}, the means
                            over the `steps` optimiser steps that end at `step`

A resumed stage replays from its checkpoint's step, so the first write of a stage in a launch
drops that stage's records past the step it starts from (and any torn last line a crash left)
before appending: every step is counted once, whatever the interruptions. The file is
rewritten atomically then; later records are appended and flushed one by one.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from attn_utils.runfiles import write_text_atomically

LOSS_LOG = Path("logs") / "loss.jsonl"
FIELDS = ("stage", "step", "steps", "loss", "reg", "lr")


def _record(line: str) -> dict | None:
    """The record of one complete line, or None for a torn or foreign one."""
    if not line.endswith("\n"):
        return None  # the process died while writing it
    try:
        rec = json.loads(line)
    except json.JSONDecodeError:
        return None
    return rec if isinstance(rec, dict) and all(k in rec for k in FIELDS) else None


def read_loss_log(run_dir: str | Path) -> list[dict]:
    """The complete records of a run folder's loss log ([] when there is none)."""
    path = Path(run_dir) / LOSS_LOG
    if not path.is_file():
        return []
    with open(path, encoding="utf-8") as f:
        return [r for r in map(_record, f) if r is not None]


class LossLog:
    """Stage `stage`'s records, appended to the run's loss log from step `start` on."""

    def __init__(self, run_dir: str | Path, stage: int, start: int) -> None:
        self.path, self.stage = Path(run_dir) / LOSS_LOG, stage
        # earlier stages' records stay; this stage's after `start` are replayed, so they go
        kept = [r for r in read_loss_log(run_dir)
                if r["stage"] < stage or (r["stage"] == stage and r["step"] <= start)]  # fmt: skip
        write_text_atomically(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def add(self, step: int, steps: int, logs: dict[str, float]) -> None:
        """Append the means over the `steps` steps that end at `step`; flushed at once."""
        rec = {"stage": self.stage, "step": step, "steps": steps, **logs}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: rec[k] for k in FIELDS}) + "\n")
            f.flush()


@dataclass
class StageClock:
    """A stage's training seconds over all its launches: those recorded in the checkpoint it
    resumed from, plus this launch's (the loop only: loading and validation before it
    excluded). The steps a crash lost after the last checkpoint are not counted; their replay is."""

    before: float = 0.0  # seconds of earlier launches, up to the checkpoint resumed from
    launches: int = 1  # launches that trained this stage, this one included
    t0: float = field(default_factory=time.perf_counter)

    @classmethod
    def resumed(cls, state: dict) -> StageClock:
        """The clock of a launch that continues from a checkpoint's state.json."""
        return cls(float(state.get("train_seconds", 0.0)), int(state.get("launches", 1)) + 1)

    def start(self) -> None:
        self.t0 = time.perf_counter()

    def state(self) -> dict:
        """{"train_seconds", "launches"}: for a checkpoint's state.json and stage_info.json."""
        seconds = self.before + time.perf_counter() - self.t0
        return {"train_seconds": round(seconds, 3), "launches": self.launches}
