"""Several processes: a failure on one rank stops every rank, with the same message, in time."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from conftest import ROOT, train_argv

# Runs the training CLI as one rank of a torchrun launch, with rank 1's stage-2 loss turned
# into inf at its second step; each rank's stderr and exit code go to files of their own.
RANK_SCRIPT = textwrap.dedent(
    """
    import os, sys
    out, argv = sys.argv[1], sys.argv[2:]
    rank = os.environ["RANK"]
    os.dup2(os.open(f"{out}/rank{rank}.err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
    sys.path.insert(0, os.environ["ADB_ROOT"])
    import train_attndreambooth
    from attn_utils.train.trainer import Trainer

    real, calls = Trainer._losses, [0]

    def poisoned(self, unet, batch, text, gen, stats, sc):
        mse, reg = real(self, unet, batch, text, gen, stats, sc)
        if sc.index == 2:
            calls[0] += 1
            if rank == "1" and calls[0] == 2:
                mse = mse * float("inf")
        return mse, reg

    Trainer._losses = poisoned
    rc = train_attndreambooth.main(argv)
    open(f"{out}/rank{rank}.rc", "w").write(str(rc))
    sys.exit(rc)
    """
)


@pytest.mark.parametrize("precision", ["fp16", "no"])
def test_a_nan_loss_on_one_rank_stops_both_at_the_same_step(
    tmp_path, tiny_model, concept, precision
):
    """Under fp16 the GradScaler hides the NaN gradient; the loss flag alone must stop all."""
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    out = tmp_path / "run"
    out.mkdir()
    argv = train_argv(tiny_model, concept, out, "--stages", "1,2",
                      "--mixed_precision", precision)  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(script), str(out), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ADB_ROOT": str(ROOT)}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=tmp_path)
    assert r.returncode != 0
    for rank in (0, 1):
        err = (out / f"rank{rank}.err").read_text()
        rc = (out / f"rank{rank}.rc").read_text() if (out / f"rank{rank}.rc").exists() else None
        stops = [ln for ln in err.splitlines() if ln.startswith("stopped:")]
        assert rc == "3" and len(stops) == 1, (rank, rc, err[-2000:])
        assert stops[0].startswith("stopped: non-finite loss at stage 2 step 2;"), stops
        assert "Traceback" not in err
    assert not (out / "stage_2").exists()
