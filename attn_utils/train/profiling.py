"""--profile_steps N: torch.profiler over N optimiser steps of each stage, after a warm-up.

Writes <output_dir>/profile/stage_<k>.txt (the ops by self device time, then by self CPU time,
and the host-device synchronisations counted) and stage_<k>.trace.json (chrome://tracing,
Perfetto). For finding what a step spends beyond the U-Net's own kernels.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

WARMUP_STEPS = 3  # the first steps allocate, autotune and compile: not what a step costs
# Host-side calls that wait for the GPU; each one stalls the queue of kernels.
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize",
               "aten::_local_scalar_dense", "aten::item", "cudaMemcpyAsync")  # fmt: skip


class StageProfiler:
    """Profiles optimiser steps WARMUP_STEPS+1 .. WARMUP_STEPS+n of one stage; else a no-op."""

    def __init__(self, n: int, out_dir: Path, stage: int, start_step: int, device) -> None:
        self.n, self.stage, self.device = n, stage, device
        self.path = Path(out_dir) / "profile" / f"stage_{stage}"
        self.first = start_step + WARMUP_STEPS  # profile from the step after this one
        self.prof = None

    def step_done(self, step: int) -> None:
        """Call after optimiser step `step` (1-based)."""
        if not self.n:
            return
        if step == self.first:
            acts = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                acts.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=acts, record_shapes=False)
            self.prof.__enter__()
        elif self.prof is not None and step == self.first + self.n:
            self.finish()

    def finish(self) -> None:
        """Stop (at the stage's end if it came first) and write the report."""
        if self.prof is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.prof.__exit__(None, None, None)
        prof, self.prof = self.prof, None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        events = prof.key_averages()
        by_device = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        syncs = {e.key: e.count for e in events if e.key in SYNC_EVENTS}
        lines = [
            f"stage {self.stage}: {self.n} optimiser steps after {WARMUP_STEPS} warm-up",
            f"host-device synchronisations and copies: {syncs or 'none'}",
            "",
            events.table(sort_by=by_device, row_limit=40),
        ]
        if by_device != "self_cpu_time_total":
            lines += ["", events.table(sort_by="self_cpu_time_total", row_limit=25)]
        self.path.with_suffix(".txt").write_text("\n".join(lines))
        with contextlib.suppress(RuntimeError):  # a trace is a nicety; the table is the point
            prof.export_chrome_trace(str(self.path.with_suffix(".trace.json")))
