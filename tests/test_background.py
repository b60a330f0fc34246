"""The loop's device-side bookkeeping: the step meter, host snapshots, the background writer."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from attn_utils.train.background import BackgroundWriter, HostSnapshot, finish_writes
from attn_utils.train.meter import StepMeter


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


@pytest.mark.parametrize("reuse", [False, True], ids=["cpu-copy", "reused-buffers"])
def test_a_slow_write_never_sees_the_next_steps_tensors(monkeypatch, tmp_path, reuse):
    """Checkpoint N is still being written when step N+1 checkpoints: N keeps step N's values.

    `reuse` sends the CPU tensors through the reused (pinned on CUDA) buffers, the path
    where checkpoint N+1's copies used to land in the buffers checkpoint N was writing.
    """
    import attn_utils.train.checkpoint as ck

    real_save, gate = ck.save_file, threading.Event()

    def slow_save(tensors, path):
        gate.wait(0.5)  # the disk is slower than the next steps
        return real_save(tensors, path)

    monkeypatch.setattr(ck, "save_file", slow_save)
    p = torch.nn.Parameter(torch.zeros(8))
    opt = torch.optim.AdamW([p], lr=0.1)
    snapshot, writer, expected = HostSnapshot(reuse_cpu=reuse), BackgroundWriter(), {}
    for step in (1, 2, 3):
        p.grad = torch.full((8,), float(step))
        opt.step()
        expected[step] = (p.detach().clone(), opt.state[p]["exp_avg"].clone())
        ck.save_checkpoint(tmp_path, 1, step, {"w": p}, opt, {}, None, snapshot, writer)
    gate.set()
    writer.wait()
    for step, (w, m) in expected.items():
        state, tensors, opt_state = ck.load_checkpoint(
            tmp_path / f"checkpoints/checkpoint-s1-{step:06d}"
        )
        assert state["step"] == step
        assert torch.equal(tensors["w"], w), step
        assert torch.equal(opt_state["state"][0]["exp_avg"], m), step


def test_snapshot_buffers_are_not_reused_before_release():
    snap = HostSnapshot(reuse_cpu=True)
    snap.take({"w": torch.zeros(2)})
    with pytest.raises(RuntimeError, match="still being written"):
        snap.take({"w": torch.ones(2)})
    snap.release()
    host, _ = snap.take({"w": torch.ones(2)})
    assert host["w"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
@pytest.mark.parametrize("clip", [None, 1.0], ids=["plain", "clipped"])
def test_fused_adamw_skips_a_non_finite_step_without_touching_its_state(bad, clip):
    """optimizer_step's device-side skip: parameters, both moments and the step count stay."""
    from attn_utils.train.runtime import optimizer_step, skips_on_device

    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.randn(2, 3))]
    opt = torch.optim.AdamW(params, lr=0.1, fused=True)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert skips_on_device(opt)
    for p in params:
        p.grad = torch.randn_like(p)
    assert not bool(optimizer_step(opt, scaler, params, clip))  # one good step: state exists
    before = [p.detach().clone() for p in params]
    state = {
        k: [opt.state[p][k].clone() for p in params] for k in ("exp_avg", "exp_avg_sq", "step")
    }
    params[0].grad = torch.randn(5)
    params[1].grad = torch.randn(2, 3)
    params[1].grad[0, 1] = bad  # one bad entry in one tensor
    assert bool(optimizer_step(opt, scaler, params, clip))
    for i, p in enumerate(params):
        assert torch.equal(p.detach(), before[i])
        for k, vals in state.items():
            assert torch.equal(opt.state[p][k], vals[i]), (k, i)
    for p in params:  # and the next good step updates again
        p.grad = torch.ones_like(p)
    assert not bool(optimizer_step(opt, scaler, params, clip))
    assert not torch.equal(params[0].detach(), before[0])
    assert opt.state[params[0]]["step"].item() == 2
