"""Class images under several processes: each makes its share, the set is the same bytes as one
process's, and a process that fails or stalls stops the others instead of leaving them waiting."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch
from conftest import ROOT, train_argv
from PIL import Image

from attn_utils.train.prior import class_image_files, generate_class_images
from attn_utils.train.runtime import EXIT_OTHER_PROCESS, TrainingStopped


def _sampler(calls: list, fail: bool = False):
    def sample(seeds):
        calls.append(list(seeds))
        if fail:
            raise RuntimeError("out of memory (simulated)")
        return [Image.new("RGB", (8, 8), (s % 251, s // 7 % 251, s // 13 % 251)) for s in seeds]

    return sample


def _ranks(folder, n, batch_size, samplers) -> tuple[list, list]:
    """generate_class_images on len(samplers) threads standing in for processes; their
    `agree` is a real barrier (it gives up after 20 s); returns (results, errors)."""
    world = len(samplers)
    barrier, flags = threading.Barrier(world, timeout=20), [None] * world
    results, errors = [None] * world, [None] * world

    def agree(rank, failed):
        flags[rank] = failed
        barrier.wait()
        first = next((r for r, f in enumerate(flags) if f), None)
        barrier.wait()  # nobody overwrites a flag before everyone has read them
        return first

    def run(rank):
        try:
            results[rank] = generate_class_images(
                folder, n, samplers[rank], batch_size, seed=0, show_bar=False,
                rank=rank, world=world, agree=lambda failed: agree(rank, failed),
            )  # fmt: skip
        except BaseException as e:  # noqa: BLE001 - the test inspects it
            errors[rank] = e

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results, errors


def test_each_process_makes_its_share_of_batches_and_the_set_is_one_processs(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    alone: list = []
    assert generate_class_images(one, 5, _sampler(alone), 2, seed=0, show_bar=False) == 5
    calls: list[list] = [[], []]
    results, errors = _ranks(two, 5, 2, [_sampler(calls[0]), _sampler(calls[1])])
    assert errors == [None, None] and results == [3, 2]
    # batches cut as one process cuts them ([0, 1], [2, 3], [4]); batch j on process j % 2
    assert calls == [[alone[0], alone[2]], [alone[1]]]
    assert [p.name for p in class_image_files(two)] == [p.name for p in class_image_files(one)]
    assert [p.read_bytes() for p in class_image_files(two)] == [
        p.read_bytes() for p in class_image_files(one)
    ]
    assert not list(two.glob(".tmp-*"))


def test_a_process_that_fails_stops_the_others_without_waiting(tmp_path):
    calls: list[list] = [[], []]
    start = time.monotonic()
    _, errors = _ranks(tmp_path / "c", 6, 1, [_sampler(calls[0]), _sampler(calls[1], fail=True)])
    assert time.monotonic() - start < 15  # not the barrier's 20 s give-up
    assert isinstance(errors[1], RuntimeError) and "out of memory" in str(errors[1])
    assert isinstance(errors[0], TrainingStopped), errors[0]
    assert errors[0].code == EXIT_OTHER_PROCESS and "process 1 failed" in str(errors[0])
    assert len(calls[1]) == 1  # it stopped at its first batch; process 0 finished its own
    assert len(class_image_files(tmp_path / "c")) == 3


def _agree_worker(rank: int, port: int, out: str) -> None:
    import datetime

    import torch.distributed as dist

    from attn_utils.train.runtime import first_failed_process

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))  # fmt: skip
    cpu = torch.device("cpu")
    seen = [first_failed_process(rank == 1, cpu), first_failed_process(False, cpu),
            first_failed_process(True, cpu)]  # fmt: skip
    dist.destroy_process_group()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump(seen, f)


def test_every_process_learns_which_process_failed(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_agree_worker, args=(port, str(tmp_path)), nprocs=2)
    for rank in (0, 1):  # process 1 alone; nobody; both (the first is named)
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [1, None, 0]


# One rank of a torchrun launch of the training CLI that only sets up prior preservation
# (Trainer.run stops after the class images); ADB_STALL_RANK makes that rank's sampler hang.
RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    out, argv = sys.argv[1], sys.argv[2:]
    rank = os.environ["RANK"]
    os.dup2(os.open(f"{out}/rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.path.insert(0, os.environ["ADB_ROOT"])
    import train_attndreambooth
    from attn_utils.train import prior
    from attn_utils.train.trainer import Trainer

    real = prior.trainer_sampler

    def sampler(trainer):
        sample = real(trainer)
        if rank != os.environ.get("ADB_STALL_RANK"):
            return sample
        return lambda seeds: time.sleep(3600)

    prior.trainer_sampler = sampler
    Trainer.run = lambda self: prior.setup_prior(self) and None
    rc = train_attndreambooth.main(argv)
    with open(f"{out}/rank{rank}.rc", "w") as f:
        f.write(str(rc))
    sys.exit(rc)
    """
)
PRIOR = ["--with_prior_preservation", "--num_class_images", "5", "--sample_batch_size", "2",
         "--class_inference_steps", "2"]  # fmt: skip


def _launch(tmp_path, name, model, data, nproc, *extra, env=None, timeout=240):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / name
    out.mkdir()
    argv = train_argv(model, data, out, *PRIOR, *extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           str(script), str(out), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADB_ROOT": str(ROOT), **(env or {})}
    # its own session, so a launch that hangs is killed with its workers, not just torchrun
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=tmp_path, start_new_session=True)  # fmt: skip
    try:
        proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return proc, out


def test_two_processes_write_the_same_class_images_as_one(tmp_path, tiny_model, concept):
    r1, one = _launch(tmp_path, "one", tiny_model, concept, 1)
    assert r1.returncode == 0, (one / "rank0.err").read_text()[-3000:]
    r2, two = _launch(tmp_path, "two", tiny_model, concept, 2)
    errs = [(two / f"rank{k}.err").read_text() for k in (0, 1)]
    assert r2.returncode == 0, errs[0][-3000:] + errs[1][-3000:]
    # both processes generated: batches [0, 1] and [4] on process 0, [2, 3] on process 1
    assert "process 0 of 2 generated 3 class image(s)" in errs[0], errs[0][-3000:]
    assert "process 1 of 2 generated 2 class image(s)" in errs[1], errs[1][-3000:]
    files = class_image_files(two / "class_images")
    assert [p.name for p in files] == [f"class_{i:05d}.png" for i in range(5)]
    assert [p.read_bytes() for p in files] == [
        p.read_bytes() for p in class_image_files(one / "class_images")
    ]


def test_a_stalled_process_stops_the_other_at_the_ddp_timeout(tmp_path, tiny_model, concept):
    start = time.monotonic()
    r, out = _launch(tmp_path, "run", tiny_model, concept, 2, "--ddp_timeout", "10",
                     env={"ADB_STALL_RANK": "1"}, timeout=200)  # fmt: skip
    assert r.returncode != 0 and time.monotonic() - start < 150
    err = (out / "rank0.err").read_text()
    assert (out / "rank0.rc").read_text() == str(EXIT_OTHER_PROCESS), err[-3000:]
    stops = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
    assert len(stops) == 1 and "--ddp_timeout" in stops[0], err[-3000:]


def test_ddp_timeout_must_be_a_positive_number_of_seconds(capsys):
    import train_attndreambooth

    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--output_dir",
            "o", "--category", "sloth", "--dry_run"]  # fmt: skip
    for bad in ("0", "-5", "nan", "soon"):
        with pytest.raises(SystemExit) as e:
            train_attndreambooth.main([*argv, "--ddp_timeout", bad])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip() == (
            f"error: --ddp_timeout: must be a positive number of seconds, got {bad!r}"
        )
    assert train_attndreambooth.main([*argv, "--ddp_timeout", "90.5"]) == 0
