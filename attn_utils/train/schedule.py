"""When the loop logs, checkpoints, validates and looks for a stop request: decided here only.

Every process must take the same decisions at the same steps: reading the meter and asking
for a stop request are collectives when several processes run.
"""

from __future__ import annotations

from dataclasses import dataclass

from attn_utils.config import StageConfig


@dataclass(frozen=True)
class Due:
    """What the loop does after one optimiser step, in this order."""

    read: bool  # read the device meter: log the means, stop on a non-finite loss or gradient
    done: bool  # the stage's last step: leave the loop (the stage result is saved after it)
    checkpoint: bool  # a resumable checkpoint of this step
    validate: bool  # render the validation prompt
    ask_stop: bool  # has a signal come? (then: checkpoint and stop)


class Schedule:
    """The periodic actions of one stage, from its step counts and --logging_steps."""

    def __init__(self, sc: StageConfig, logging_steps: int, world: int) -> None:
        self.sc, self.logging_steps, self.world = sc, logging_steps, world

    def after(self, step: int, host_saw_bad: bool = False) -> Due:
        """The actions after optimiser step `step` (1-based).

        host_saw_bad: the optimiser read a non-finite gradient on the host (no fused skip);
        the meter is read at once so the run stops at this step on every process.
        """
        sc = self.sc
        log = step % self.logging_steps == 0
        ckpt = bool(sc.checkpointing_steps) and step % sc.checkpointing_steps == 0
        val = bool(sc.validation_steps) and step % sc.validation_steps == 0
        done = step == sc.train_steps
        return Due(
            read=host_saw_bad or log or ckpt or val or done,  # never checkpoint a bad step
            done=done,
            checkpoint=ckpt and not done,  # the stage result supersedes a last checkpoint
            validate=val and not done,  # the stage's final validation follows the loop
            # One process: a flag read every step. Several: a collective, at log steps only.
            ask_stop=not done and (self.world == 1 or log),
        )
