"""Issue 5, items 4-5: interruptions, full disks, NaN losses, exact resume and fingerprints."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_error, train_argv
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file

import attn_utils.runfiles as rf
import attn_utils.train.checkpoint as ck
import train_attndreambooth
from attn_utils.train.trainer import Trainer

STAGE_FLAG = {1: "ti", 2: "attn", 3: "unet"}
UNET = "unet/diffusion_pytorch_model.safetensors"
WEIGHTS = {1: "stage_1/learned_embeds.safetensors", 2: f"stage_2/{UNET}", 3: f"stage_3/{UNET}"}
LONG = "24"  # stage-1 steps of the signal tests: long enough to still be running when signalled


class SimulatedCrash(RuntimeError):
    """Stands for a power cut or a pre-empted machine: nothing after it runs."""


def hook(mp: pytest.MonkeyPatch, name: str, n: int, before=None, after=None) -> None:
    """Wrap Trainer.<name> for the next run: at its n-th call, run before() / map the result."""
    real, calls = getattr(Trainer, name), [0]

    def wrapped(self, *args, **kwargs):
        calls[0] += 1
        hit = calls[0] == n
        if hit and before:
            before()
        out = real(self, *args, **kwargs)
        return after(*out) if hit and after else out

    mp.setattr(Trainer, name, wrapped)


def fail_nth(mp: pytest.MonkeyPatch, obj, name: str, n: int, exc: BaseException) -> None:
    """obj.<name>'s n-th call raises exc; a file it was writing is left as a 10-byte stub."""
    real, calls = getattr(obj, name), [0]

    def flaky(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            if name == "save_file":
                Path(args[1]).write_bytes(b"\0" * 10)  # what a full disk leaves behind
            raise exc
        return real(*args, **kwargs)

    mp.setattr(obj, name, flaky)


kill_self = lambda sig: lambda: os.kill(os.getpid(), sig)


def crash():
    raise SimulatedCrash("simulated crash")


def same_weights(a: Path, b: Path) -> bool:
    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def copy_stages(src: Path, dst: Path, upto: int) -> None:
    for j in range(1, upto + 1):
        shutil.copytree(src / f"stage_{j}", dst / f"stage_{j}")


@pytest.fixture(scope="module")
def full_run(tiny_model, concept, tmp_path_factory) -> Path:
    """Run A: all three stages, uninterrupted, no checkpoints."""
    out = tmp_path_factory.mktemp("a") / "run"
    assert train_attndreambooth.main(train_argv(tiny_model, concept, out)) == 0
    return out


@pytest.mark.parametrize("stage,how", [(1, "sigterm"), (2, "crash"), (3, "sigint")])
def test_resume_is_bitwise_exact(
    run_train, capsys, monkeypatch, tmp_path, tiny_model, concept, full_run, stage, how
):
    out = tmp_path / "b"
    copy_stages(full_run, out, stage - 1)
    flag = f"--{STAGE_FLAG[stage]}_checkpointing_steps"
    argv = train_argv(tiny_model, concept, out, "--stages", str(stage), flag, "2")
    with monkeypatch.context() as m:
        if how == "crash":  # after the step-2 checkpoint, during step 3
            hook(m, "_optimizer_step", 3, before=crash)
            with pytest.raises(SimulatedCrash):
                run_train(argv)
        else:  # a signal during step 3: checkpoint at the end of it, exit 128 + signum
            sig = signal.SIGTERM if how == "sigterm" else signal.SIGINT
            hook(m, "_optimizer_step", 3, before=kill_self(sig))
            assert run_train(argv) == 128 + sig
    step = 2 if how == "crash" else 3
    assert [p.name for p in ck.list_checkpoints(out)][-1] == f"checkpoint-s{stage}-{step:06d}"
    assert not (out / f"stage_{stage}").exists()
    capsys.readouterr()
    assert run_train(argv) == 0  # the same command again continues mid-stage, and says so
    assert f"resumed from {out / 'checkpoints'}" in capsys.readouterr().out
    assert same_weights(full_run / WEIGHTS[stage], out / WEIGHTS[stage])
    assert ck.list_checkpoints(out) == []  # superseded by the stage result


def test_a_resumed_stage_keeps_one_loss_record_per_step_and_sums_its_launches(
    run_train, monkeypatch, tmp_path, tiny_model, concept, full_run
):
    from attn_utils.train.records import LOSS_LOG, read_loss_log

    out = tmp_path / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_checkpointing_steps", "2",
                      "--logging_steps", "1")  # fmt: skip
    with monkeypatch.context() as m:  # crashes in step 4: steps 1-3 logged, checkpoint at 2
        hook(m, "_optimizer_step", 4, before=crash)
        with pytest.raises(SimulatedCrash):
            run_train(argv)
    assert [r["step"] for r in read_loss_log(out)] == [1, 2, 3]
    with open(out / LOSS_LOG, "a") as f:
        f.write('{"stage": 1, "step": 4, "ste')  # torn by a crash mid-write
    ckpt = ck.list_checkpoints(out)[-1] / "state.json"
    state = json.loads(ckpt.read_text())
    assert state["launches"] == 1 and state["train_seconds"] > 0
    ckpt.write_text(json.dumps({**state, "train_seconds": 1000.0}))  # a long first launch
    assert run_train(argv) == 0
    records = read_loss_log(out)  # step 3 replayed once, the torn line gone
    assert [(r["stage"], r["step"], r["steps"]) for r in records] == [
        (1, s, 1) for s in (1, 2, 3, 4)
    ]
    assert (out / LOSS_LOG).read_text().count("\n") == 4
    whole = [r for r in read_loss_log(full_run) if r["stage"] == 1]  # one read: steps 1-4
    assert [(r["step"], r["steps"]) for r in whole] == [(4, 4)]
    mean = sum(r["loss"] for r in records) / 4
    assert mean == pytest.approx(whole[0]["loss"], rel=1e-5)  # the same steps, bitwise
    info = rf.stage_info(out, 1)
    assert info["launches"] == 2 and info["train_seconds"] > 1000.0  # both launches


def test_starting_over_takes_an_explicit_flag(
    run_train, capsys, tmp_path, tiny_model, concept, full_run, interrupted
):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_checkpointing_steps", "2")
    capsys.readouterr()
    assert run_train([*argv, "--resume_from_checkpoint", "none"]) == 0
    assert "resumed from" not in capsys.readouterr().out
    assert same_weights(full_run / WEIGHTS[1], out / WEIGHTS[1])  # from step 0, uninterrupted
    assert ck.list_checkpoints(out) == []


@pytest.fixture(scope="module")
def long_reference(tiny_model, concept, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("long") / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_train_steps", LONG)
    assert train_attndreambooth.main(argv) == 0
    return out / WEIGHTS[1]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_cli_checkpoints_and_exits_cleanly(
    run_train, tmp_path, tiny_model, concept, long_reference, sig
):
    out = tmp_path / "sig"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_train_steps", LONG,
                      "--ti_checkpointing_steps", "1", "--checkpoints_total_limit",
                      "1")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}  # same math as here
    proc = subprocess.Popen([sys.executable, "train_attndreambooth.py", *argv], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 180
    while not ck.list_checkpoints(out):  # training has started: the first checkpoint is there
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert "Traceback" not in err
    assert "stopped: stopped by signal at stage 1 step" in err
    assert "launch the same command again to continue" in err
    state, tensors, _ = ck.load_checkpoint(ck.list_checkpoints(out)[-1])
    assert 0 < state["step"] < int(LONG) and torch.isfinite(tensors["learned_embeds"]).all()
    assert not (out / "stage_1").exists()
    assert run_train(argv) == 0
    assert same_weights(long_reference, out / WEIGHTS[1])


def test_signal_in_the_last_step_stops_before_the_next_stage(run_train, monkeypatch, tmp_path,
                                                            tiny_model, concept):  # fmt: skip
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        hook(m, "_optimizer_step", 4, before=kill_self(signal.SIGTERM))  # step 4 of 4 of stage 1
        rc = run_train(train_argv(tiny_model, concept, out, "--stages", "1,2"))
    assert rc == 128 + signal.SIGTERM
    assert rf.stage_info(out, 1) is not None and not (out / "stage_2").exists()


@pytest.fixture(scope="module")
def interrupted(tiny_model, concept, tmp_path_factory) -> Path:
    """A run folder holding checkpoint-s1-000002 of a stage-1 run that crashed at step 3."""
    out = tmp_path_factory.mktemp("int") / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_checkpointing_steps", "2")
    with pytest.MonkeyPatch.context() as m:
        hook(m, "_optimizer_step", 3, before=crash)
        with pytest.raises(SimulatedCrash):
            train_attndreambooth.main(argv)
    return out


def _other_data(concept: Path, tmp: Path) -> Path:
    d = tmp / "other_concept"
    shutil.copytree(concept, d)
    first = sorted(d.iterdir())[0]
    with Image.open(first) as im:
        im.transpose(Image.FLIP_LEFT_RIGHT).save(first)
    return d


def _other_model(model: Path, tmp: Path) -> Path:
    d = tmp / "other_model"
    shutil.copytree(model, d)
    cfg_path = d / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["beta_end"] = cfg["beta_end"] * 1.01
    cfg_path.write_text(json.dumps(cfg))
    return d


@pytest.mark.parametrize("change", ["data", "model", "plan", "optimizer"])
def test_resume_with_a_different_fingerprint_is_refused(
    run_train, capsys, tmp_path, tiny_model, concept, interrupted, change
):
    out = tmp_path / "run"
    shutil.copytree(interrupted, out)
    ckpt = ck.list_checkpoints(out)[-1]
    assert len(json.loads((ckpt / "state.json").read_text())["fingerprint"]) == 64
    model = _other_model(tiny_model, tmp_path) if change == "model" else tiny_model
    data = _other_data(concept, tmp_path) if change == "data" else concept
    extra = {"plan": ["--ti_learning_rate", "2e-3"], "optimizer": ["--adam_weight_decay", "0.02"]}
    extra = extra.get(change, [])
    argv = train_argv(model, data, out, "--stages", "1", "--resume_from_checkpoint", "latest",
                      *extra)  # fmt: skip
    line, _ = cli_error(run_train, capsys, argv)
    assert line.startswith(f"error: --resume_from_checkpoint: {ckpt}")
    named = {"data": "(data: ", "model": "(model: ",  # hashes: named, values shortened
             "plan": "(stage 1.learning_rate: 0.001 -> 0.002)",
             "optimizer": "(optimizer.weight_decay: 0.01 -> 0.02)"}  # fmt: skip
    assert "different data, base model or settings " + named[change] in line
    assert ck.list_checkpoints(out) == [out / "checkpoints" / ckpt.name]  # left untouched


def test_completed_stage_with_other_data_is_refused(run_train, capsys, tmp_path, tiny_model,
                                                    concept, full_run):  # fmt: skip
    out = tmp_path / "run"
    copy_stages(full_run, out, 1)
    argv = train_argv(tiny_model, _other_data(concept, tmp_path), out, "--stages", "2")
    capsys.readouterr()
    assert run_train(argv) == 2
    err = capsys.readouterr().err
    assert f"error: --output_dir: {out / 'stage_1'} was trained with different data" in err
    assert not (out / "stage_2").exists()


def test_a_refused_completed_stage_names_the_change_and_the_stages_to_keep(
    run_train, capsys, tmp_path, tiny_model, concept, full_run
):
    out = tmp_path / "run"
    copy_stages(full_run, out, 2)
    argv = train_argv(tiny_model, concept, out, "--stages", "3", "--attn_learning_rate", "1e-4")
    line, _ = cli_error(run_train, capsys, argv)
    old = json.loads((out / "stage_2" / "stage_info.json").read_text())["identity"]
    assert old["plan"][1]["learning_rate"] != 1e-4
    assert line == (
        f"error: --output_dir: {out / 'stage_2'} was trained with different data, base model "
        f"or settings (stage 2.learning_rate: {old['plan'][1]['learning_rate']} -> 0.0001); "
        "use a new --output_dir (copy stage_1 into it to reuse them)"
    )


@pytest.mark.parametrize("opt", ["--fused_adam", "--no-fused_adam"])  # device skip / host read
def test_inf_loss_stops_with_exit_3_and_keeps_the_last_checkpoint(
    run_train, capsys, monkeypatch, tmp_path, tiny_model, concept, full_run, opt
):
    out = tmp_path / "run"
    copy_stages(full_run, out, 1)
    argv = train_argv(tiny_model, concept, out, "--stages", "2", "--attn_checkpointing_steps", "2",
                      opt)  # fmt: skip
    capsys.readouterr()
    with monkeypatch.context() as m:
        hook(m, "_losses", 3, after=lambda mse, reg: (mse * float("inf"), reg))
        assert run_train(argv) == 3
    err = capsys.readouterr().err
    assert "stopped: non-finite loss at stage 2 step 3" in err and "Traceback" not in err
    good = out / "checkpoints" / "checkpoint-s2-000002"
    assert f"Last good checkpoint: {good}" in err
    assert ck.list_checkpoints(out) == [good] and not (out / "stage_2").exists()
    state, tensors, _ = ck.load_checkpoint(good)
    assert state["step"] == 2 and all(torch.isfinite(t).all() for t in tensors.values())


def test_diverging_learning_rate_stops_with_exit_3(
    run_train, capsys, tmp_path, tiny_model, concept
):
    out = tmp_path / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_learning_rate", "1e30",
                      "--ti_train_steps", "8", "--ti_checkpointing_steps", "1")  # fmt: skip
    capsys.readouterr()
    assert run_train(argv) == 3
    err = capsys.readouterr().err
    assert re.search(r"stopped: non-finite (loss|gradient) at stage 1 step \d", err)
    assert "Traceback" not in err
    assert ck.list_checkpoints(out) and not (out / "stage_1").exists()


@pytest.mark.parametrize("clip", [[], ["--max_grad_norm", "1.0"]], ids=["plain", "clipped"])
def test_nan_gradient_is_never_checkpointed(
    run_train, monkeypatch, tmp_path, tiny_model, concept, clip
):
    out = tmp_path / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_train_steps", "6",
                      "--ti_checkpointing_steps", "1", *clip)  # fmt: skip
    # sqrt'(0) = inf times d|x|/dx(0) = 0: a NaN gradient under a finite loss
    poison = lambda mse, reg: (mse + torch.sqrt((mse - mse.detach()).abs()), reg)
    with monkeypatch.context() as m:
        hook(m, "_losses", 3, after=poison)
        assert run_train(argv) == 3
    found = ck.list_checkpoints(out)
    assert found and not (out / "stage_1").exists()
    for p in found:
        assert torch.isfinite(ck.load_checkpoint(p)[1]["learned_embeds"]).all(), p


def _tiny_checkpoint(run_dir: Path, step: int, value: float, limit: int | None = 2) -> Path:
    p = torch.nn.Parameter(torch.full((4,), value))
    opt = torch.optim.AdamW([p])
    p.grad = torch.ones(4)
    opt.step()
    return ck.save_checkpoint(run_dir, 1, step, {"w": p}, opt, {"fingerprint": "f"}, limit)


# What safetensors raises when the disk fills up (checked on a 1 MiB tmpfs); a plain
# OSError(ENOSPC) comes from json / open().write. Both must end as OSError(ENOSPC).
ENOSPC = SafetensorError(
    "Error while serializing: I/O error: No space left on device (os error 28)"
)
FAILURES = [ENOSPC, OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()]


@pytest.mark.parametrize("exc", FAILURES, ids=["safetensors-enospc", "oserror-enospc", "interrupt"])
@pytest.mark.parametrize("call", [1, 2])
def test_failed_save_leaves_no_checkpoint_and_keeps_the_previous(monkeypatch, tmp_path, exc, call):
    prev = _tiny_checkpoint(tmp_path, 2, 1.0, limit=1)
    before = {f.name: f.read_bytes() for f in prev.iterdir()}
    with monkeypatch.context() as m:
        fail_nth(m, ck, "save_file", call, exc)
        with pytest.raises(
            KeyboardInterrupt if isinstance(exc, KeyboardInterrupt) else OSError
        ) as e:
            _tiny_checkpoint(tmp_path, 4, 2.0, limit=1)
    if not isinstance(exc, KeyboardInterrupt):
        assert e.value.errno == errno.ENOSPC and "checkpoint-s1-000004" in e.value.filename
    assert ck.list_checkpoints(tmp_path) == [prev]
    assert ck.resolve_resume(tmp_path, "latest") == prev
    assert {f.name: f.read_bytes() for f in prev.iterdir()} == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [prev.name]


def test_leftovers_of_a_hard_kill_are_ignored_then_recovered(tmp_path):
    good = _tiny_checkpoint(tmp_path, 2, 1.0)
    root = tmp_path / "checkpoints"
    half = root / ".tmp-checkpoint-s1-000004-0badf00d"  # killed while writing
    half.mkdir()
    (half / "state.json").write_text('{"step": 4}')
    partial = root / "checkpoint-s1-000006"  # copied by hand, incomplete
    partial.mkdir()
    (partial / "state.json").write_text('{"step": 6}')
    moved = _tiny_checkpoint(tmp_path, 3, 3.0)  # killed between the two renames of a replace
    os.replace(moved, root / ".old-checkpoint-s1-000003-12345678")
    (root / ".tmp-rm-checkpoint-s1-000001-87654321").mkdir()  # killed while deleting
    assert ck.list_checkpoints(tmp_path) == [good]
    assert ck.resolve_resume(tmp_path, "latest") == good
    rf.recover_interrupted_writes(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [good.name, moved.name, partial.name]
    assert ck.list_checkpoints(tmp_path) == [good, moved]
    assert ck.load_checkpoint(moved)[0]["step"] == 3


def test_rotation_and_replacement_are_atomic(monkeypatch, tmp_path):
    for step in (1, 2, 3):
        _tiny_checkpoint(tmp_path, step, float(step))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == [
        "checkpoint-s1-000002",
        "checkpoint-s1-000003",
    ]
    final = tmp_path / "stage_1"
    rf.write_dir_atomically(final, lambda t: (t / "a.txt").write_text("old"))

    def half_write(tmp: Path) -> None:
        (tmp / "a.txt").write_text("ne")
        raise ENOSPC

    with pytest.raises(OSError, match="No space left"):
        rf.write_dir_atomically(final, half_write)
    assert (final / "a.txt").read_text() == "old"
    with monkeypatch.context() as m:  # the swap fails after the old copy was moved aside
        fail_nth(m, rf.os, "replace", 2, OSError(errno.EIO, "I/O error"))
        with pytest.raises(OSError, match="I/O error"):
            rf.write_dir_atomically(final, lambda t: (t / "a.txt").write_text("new"))
    assert (final / "a.txt").read_text() == "old"
    rf.write_dir_atomically(final, lambda t: (t / "a.txt").write_text("new"))
    assert (final / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "stage_1"]


def test_full_disk_mid_run_keeps_the_previous_checkpoint_and_resumes(
    run_train, monkeypatch, tmp_path, tiny_model, concept, full_run
):
    out = tmp_path / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_checkpointing_steps", "1")
    with monkeypatch.context() as m:
        fail_nth(
            m, ck, "save_file", 3, ENOSPC
        )  # calls 1-2: checkpoint 1; call 3: checkpoint 2 fails
        assert run_train(argv) == 4
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["checkpoint-s1-000001"]
    assert run_train([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert same_weights(full_run / WEIGHTS[1], out / WEIGHTS[1])


def test_full_disk_is_one_line_and_exit_4(run_train, capsys, monkeypatch, tmp_path, tiny_model,
                                          concept):  # fmt: skip
    out = tmp_path / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_checkpointing_steps", "1")
    with monkeypatch.context() as m:
        fail_nth(m, ck, "save_file", 3, ENOSPC)
        line, _ = cli_error(run_train, capsys, argv, code=4)
    assert "No space left on device" in line
