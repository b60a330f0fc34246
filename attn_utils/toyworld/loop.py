"""The pretraining's training loop: resumable and deterministic. Each step draws its batch and
noise from a generator seeded by (seed, phase, step), and a phase saves a checkpoint (safetensors:
the modules, the optimiser's state, an EMA) every few steps, so a relaunch continues from the
newest one and takes the same steps as an uninterrupted run."""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm


def step_rng(seed: int, phase: str, step: int) -> np.random.Generator:
    """The generator of one step: the same (seed, phase, step) gives the same draws."""
    digest = hashlib.sha256(f"{seed}/{phase}/{step}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def torch_gen(rng: np.random.Generator) -> torch.Generator:
    return torch.Generator().manual_seed(int(rng.integers(2**62)))


def _save_ckpt(path: Path, step: int, modules: dict, opt: torch.optim.Optimizer, extra=None):
    from safetensors.torch import save_file

    tensors = {}
    for name, module in modules.items():
        for k, v in module.state_dict().items():
            tensors[f"{name}.{k}"] = v.detach().contiguous()
    for i, state in opt.state_dict()["state"].items():
        for k, v in state.items():
            tensors[f"opt.{i}.{k}"] = torch.as_tensor(v).contiguous()
    for k, v in (extra or {}).items():
        tensors[k] = v.contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"step": str(step)})
    os.replace(tmp, path)


def _load_ckpt(path: Path, modules: dict, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        step = int(f.metadata()["step"])
    tensors = load_file(str(path))
    for name, module in modules.items():
        prefix = f"{name}."
        module.load_state_dict(
            {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        )
    state: dict = {}
    for k, v in tensors.items():
        if k.startswith("opt."):
            _, i, key = k.split(".", 2)
            state.setdefault(int(i), {})[key] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
    rest = {k: v for k, v in tensors.items() if k.startswith("ema.")}
    return step, rest


def train_phase(
    name: str,
    work: Path,
    steps: int,
    modules: dict,
    opt: torch.optim.Optimizer,
    loss_fn,
    every: int,
    ema: dict[str, torch.Tensor] | None = None,
    ema_params: dict[str, torch.nn.Parameter] | None = None,
    lr: float | None = None,
) -> None:
    """Run loss_fn(step) for steps optimiser steps with checkpoints at work/<name>.ckpt."""
    ckpt = work / f"{name}.ckpt"
    start = 0
    if ckpt.is_file():
        start, rest = _load_ckpt(ckpt, modules, opt)
        if ema is not None:
            for k in ema:
                ema[k].copy_(rest[f"ema.{k}"])
        print(f"{name}: resumed at step {start} of {steps}", flush=True)
    for m in modules.values():
        m.train()
    params = [p for g in opt.param_groups for p in g["params"]]
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=name)
    for step in bar:
        if lr is not None:  # linear warm-up over 100 steps, then cosine to a tenth
            warm = min(1.0, (step + 1) / 100)
            cos = 0.55 + 0.45 * math.cos(math.pi * step / steps)
            for g in opt.param_groups:
                g["lr"] = lr * warm * cos
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if ema is not None:
            decay = min(0.995, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, p in ema_params.items():
                    ema[k].lerp_(p.detach(), 1 - decay)
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if (step + 1) % every == 0 or step + 1 == steps:
            extra = {f"ema.{k}": v for k, v in (ema or {}).items()}
            _save_ckpt(ckpt, step + 1, modules, opt, extra)
