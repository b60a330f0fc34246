"""One stage's moving parts, gathered by Trainer._begin_stage and read by its loop."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from attn_utils.config import StageConfig
from attn_utils.method.capture import TokenStats
from attn_utils.train.meter import StepMeter
from attn_utils.train.profiling import StageProfiler
from attn_utils.train.schedule import Schedule
from attn_utils.train.stages import StageParams


@dataclass
class StageRun:
    """One stage's moving parts, made by Trainer._begin_stage and read by its loop."""

    sc: StageConfig
    params: StageParams  # the stage's trainable tensors by name (stages.select_trainable)
    plist: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled under fp16 only
    unet: torch.nn.Module  # DDP-wrapped in stages 2-3 when several processes run
    # ((1, 77, D), SDXL's pooled (1, P) or None): cached encoder output, when fixed and frozen
    text: tuple[torch.Tensor, torch.Tensor | None] | None
    encodes: bool  # the text encoder runs each micro-step (stage 1, or it trains)
    loader: DataLoader
    stats: TokenStats  # the regulariser's attention statistics, filled by the capture
    meter: StepMeter
    schedule: Schedule
    bar: tqdm
    prof: StageProfiler
    capture: contextlib.AbstractContextManager
    start: int  # the step it resumed at (0: from the beginning)
    step: int  # optimiser steps done
