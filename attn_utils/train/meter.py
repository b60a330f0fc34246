"""Step statistics kept on the training device, read by the host only at logging intervals.

Reading a CUDA number (`.item()`, `bool(t)`) waits for every queued kernel, so the next step
cannot be queued while this one runs. The loop therefore adds losses and non-finite flags
into device tensors and pays one synchronisation per `--logging_steps` steps, per checkpoint
and per validation, instead of several per step.
"""

from __future__ import annotations

import torch


class StepMeter:
    """On-device running sums of the losses and the first step with a non-finite value."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = torch.zeros(2, device=device)  # (mse, reg) summed over optimiser steps
        self.steps = 0  # optimiser steps in the sums
        # First optimiser step (1-based) whose loss / gradient was not finite; 0: none yet.
        self.bad = torch.zeros(2, dtype=torch.int64, device=device)
        self._micro_bad = torch.zeros((), dtype=torch.bool, device=device)

    def add_micro(self, mse: torch.Tensor, reg: torch.Tensor, ga: int) -> torch.Tensor:
        """Add one micro-step's losses; returns the (device) flag 'this loss is not finite'."""
        pair = torch.stack([mse.detach().float(), reg.detach().float()]) / ga  # (2,)
        self.sums += pair
        bad = ~torch.isfinite(pair).all()
        self._micro_bad |= bad
        return bad

    def end_step(self, step: int, grad_bad: torch.Tensor) -> None:
        """Close optimiser step `step` (1-based); grad_bad is a device flag or a plain bool."""
        flags = torch.stack([self._micro_bad, torch.as_tensor(grad_bad, device=self.device)])
        self.bad = torch.where((self.bad == 0) & flags, step, self.bad)
        self._micro_bad = torch.zeros((), dtype=torch.bool, device=self.device)
        self.steps += 1

    def read(self) -> tuple[dict[str, float], tuple[int, str] | None]:
        """One host sync: ({loss, reg} means since the last read, (first bad step, what)).

        With several processes the bad steps are agreed on (one collective: call read at
        the same steps everywhere): a NaN on one rank stops every rank at the same read,
        never leaving the others in DDP's next all-reduce. Under fp16 the GradScaler hides
        the gradient's NaN, so the loss flag is the only signal, and it is per process.
        """
        values = torch.cat([self.sums, _agreed_first(self.bad).to(self.sums.dtype)]).tolist()
        n = max(self.steps, 1)
        logs = {"loss": values[0] / n, "reg": values[1] / n}
        self.sums = torch.zeros_like(self.sums)
        self.steps = 0
        loss_at, grad_at = int(values[2]), int(values[3])
        if loss_at and (not grad_at or loss_at <= grad_at):
            return logs, (loss_at, "loss")
        if grad_at:
            return logs, (grad_at, "gradient")
        return logs, None


def _agreed_first(bad: torch.Tensor) -> torch.Tensor:
    """The earliest non-zero step of each flag over all processes (0: none anywhere)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return bad
    never = torch.iinfo(torch.int64).max
    first = torch.where(bad == 0, never, bad)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    return torch.where(first == never, 0, first)
