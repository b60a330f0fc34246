"""Training losses as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def denoising_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of the U-Net prediction, in fp32."""
    return F.mse_loss(pred.float(), target.float(), reduction="mean")


def attention_reg_loss(
    stats: list[tuple[torch.Tensor, torch.Tensor]],
    k: int,
    mean_weight: float,
    var_weight: float,
) -> torch.Tensor:
    """AttnDreamBooth's cross-attention regulariser (docs/method.md, the original's semantics).

    stats: per layer (mean, var), each (B, k + 1): columns 0..k-1 the placeholder tokens,
    column k the category's first sub-token. Per layer and sample, the MSE over the k
    placeholder columns against the category value; summed over the batch, averaged over
    layers; no stop-gradient on the category statistics.
    """
    total = None
    for mean, var in stats:
        m = ((mean[:, :k] - mean[:, k : k + 1]) ** 2).mean(dim=1).sum()
        v = ((var[:, :k] - var[:, k : k + 1]) ** 2).mean(dim=1).sum()
        term = mean_weight * m + var_weight * v
        total = term if total is None else total + term
    if total is None:
        raise ValueError("no cross-attention statistics were recorded")
    return total / len(stats)
