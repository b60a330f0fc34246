"""The loop's periodic actions, decided in one place, against the rules written out here."""

from __future__ import annotations

import pytest

from attn_utils.config import StageConfig
from attn_utils.train.schedule import Schedule


def _stage(steps: int, ckpt: int, val: int) -> StageConfig:
    return StageConfig(index=2, learning_rate=1e-5, train_steps=steps, batch_size=2,
                       reg_mean_weight=2.0, reg_var_weight=5.0, validation_steps=val,
                       checkpointing_steps=ckpt)  # fmt: skip


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("steps,ckpt,val,log", [(12, 4, 6, 5), (10, 0, 0, 10), (7, 7, 7, 1)])
def test_actions_follow_the_rules(world, steps, ckpt, val, log):
    sched = Schedule(_stage(steps, ckpt, val), log, world)
    for step in range(1, steps + 1):
        due = sched.after(step)
        last = step == steps
        assert due.done == last
        assert due.checkpoint == (ckpt > 0 and step % ckpt == 0 and not last)
        assert due.validate == (val > 0 and step % val == 0 and not last)
        # the meter is read before anything is written and at the end
        periodic = (val > 0 and step % val == 0) or (ckpt > 0 and step % ckpt == 0)
        assert due.read == (last or step % log == 0 or periodic)
        assert due.ask_stop == (not last and (world == 1 or step % log == 0))


def test_a_host_read_bad_gradient_reads_the_meter_at_once():
    sched = Schedule(_stage(10, 0, 0), 100, 2)
    assert not sched.after(3).read and sched.after(3, host_saw_bad=True).read
