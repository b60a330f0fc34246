"""The loop's device-side bookkeeping: the step meter, host snapshots, the background writer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from attn_utils.background import BackgroundWriter, HostSnapshot, finish_writes
from attn_utils.meter import StepMeter


def test_meter_means_and_the_first_bad_step():
    m = StepMeter(torch.device("cpu"))
    for step, (mse, reg) in enumerate([(1.0, 0.5), (3.0, 1.5)], start=1):
        for _ in range(2):  # two micro-steps of accumulation
            assert not m.add_micro(torch.tensor(mse), torch.tensor(reg), 2)
        m.end_step(step, torch.tensor(False))
    logs, bad = m.read()
    assert logs == pytest.approx({"loss": 2.0, "reg": 1.0}) and bad is None
    m.add_micro(torch.tensor(1.0), torch.tensor(0.0), 1)
    m.end_step(3, torch.tensor(True))  # a NaN gradient under a finite loss
    assert m.add_micro(torch.tensor(float("inf")), torch.tensor(0.0), 1)
    m.end_step(4, True)
    m.add_micro(torch.tensor(1.0), torch.tensor(0.0), 1)
    m.end_step(5, False)
    assert m.read()[1] == (3, "gradient")  # the first bad step is kept, whatever came after
    m2 = StepMeter(torch.device("cpu"))
    m2.add_micro(torch.tensor(float("nan")), torch.tensor(0.0), 1)
    m2.end_step(7, torch.tensor(True))  # the loss's NaN made the gradient NaN too
    assert m2.read()[1] == (7, "loss")


def test_snapshot_is_a_copy_taken_now():
    w = torch.arange(4.0)
    host, ready = HostSnapshot().take({"w": w})
    w.add_(100)  # the next optimiser step changes the weights in place
    ready()
    assert host["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_writer_runs_one_write_at_a_time_and_raises_at_wait():
    writer, order, gate = BackgroundWriter(), [], threading.Event()
    writer.submit(lambda: (gate.wait(5), order.append(1)))
    t = threading.Thread(target=lambda: writer.submit(lambda: order.append(2)))
    t.start()
    time.sleep(0.05)
    assert order == []  # the second write waits for the first
    gate.set()
    t.join(5)
    writer.wait()
    assert order == [1, 2]
    writer.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        writer.wait()
    writer.wait()  # reported once


def test_finish_writes_waits_on_an_error_and_keeps_that_error():
    writer, done = BackgroundWriter(), []
    with pytest.raises(KeyError), finish_writes(writer):
        writer.submit(lambda: (time.sleep(0.1), done.append(True)))
        raise KeyError("the loop crashed")
    assert done == [True]  # the checkpoint in flight was finished, not lost
