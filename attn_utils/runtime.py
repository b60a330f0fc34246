"""Run-time pieces the step loop delegates to: stop requests, the optimiser, fingerprints,
and the few numbers all processes must agree on (finiteness, stop requests, checksums)."""

from __future__ import annotations

import hashlib
import json
import logging
import signal

import torch

from .config import ConfigError, RunConfig, StageConfig
from .methods import recipe_identity

log = logging.getLogger(__name__)


class TrainingStopped(Exception):
    """Raised after a clean stop (signal or non-finite loss); carries the exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class StopRequest:
    """SIGINT / SIGTERM set a flag; the loop checkpoints at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict = {}

    def __enter__(self) -> StopRequest:
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum
        log.warning("signal %d: will checkpoint and stop after this step", signum)

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def build_optimizer(params: list[torch.nn.Parameter], stage: StageConfig, cfg: RunConfig):
    """AdamW with the paper's settings; 8-bit or fused kernels when asked."""
    kw = dict(
        lr=stage.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        weight_decay=cfg.adam_weight_decay,
        eps=cfg.adam_epsilon,
    )
    if cfg.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("--use_8bit_adam: needs `pip install bitsandbytes`") from None
        return bnb.optim.AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, fused=True if cfg.fused_adam else None, **kw)


def stage_fingerprint(cfg: RunConfig, stage: int, data_fp: str, model_fp: str, world: int):
    """Everything that determines a stage's math; resuming across a change is refused."""
    plan = [
        {
            k: getattr(s, k)
            for k in (
                "index",
                "learning_rate",
                "train_steps",
                "batch_size",
                "reg_mean_weight",
                "reg_var_weight",
                "gradient_accumulation_steps",
            )
        }
        for s in cfg.stages
        if s.index <= stage
    ]
    ident = dict(
        plan=plan,
        data=data_fp,
        model=model_fp,
        world=world,
        tokens=cfg.placeholder_tokens,
        category=cfg.category,
        prompt=cfg.instance_prompt,
        reg_category_target=cfg.reg_category_target,
        resolution=cfg.resolution,
        center_crop=cfg.center_crop,
        repeats=cfg.repeats,
        seed=cfg.seed,
        noise_offset=cfg.noise_offset,
        cache_latents=cfg.cache_latents,
        pool_variants=cfg.cache_latents_variants if cfg.cache_latents else None,
        # the optimiser and the precision change the trajectory just as the data does
        optimizer=dict(
            betas=[cfg.adam_beta1, cfg.adam_beta2],
            weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
            eight_bit=cfg.use_8bit_adam,
            max_grad_norm=cfg.max_grad_norm,
        ),
        mixed_precision=cfg.mixed_precision,
        **recipe_identity(cfg),  # --method, prior preservation and the like; {} by default
    )
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_finite(value: torch.Tensor) -> bool:
    """Is `value` finite on every process?"""
    ok = torch.isfinite(value.detach()).all().float().reshape(1)
    if _world() > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    return bool(ok.item())


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Total 2-norm of the gradients (one number: NaN or inf if any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def stop_requested(stop: StopRequest, device: torch.device) -> bool:
    """Has any process been signalled? Every process then records the signal."""
    flag = torch.tensor([float(stop.signum or 0)], device=device)
    if _world() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and stop.signum is None:
        stop.signum = int(flag.item())
    return bool(flag.item())


def rank_checksums(params: list[torch.nn.Parameter], device: torch.device) -> list[list[float]]:
    """Per-process (sum, sum of squares) of the trained weights; raise if processes differ."""
    local = torch.stack(
        [
            sum(p.detach().double().sum() for p in params),
            sum(p.detach().double().square().sum() for p in params),
        ]
    ).to(device)
    world = _world()
    if world == 1:
        return [local.tolist()]
    gathered = [torch.zeros_like(local) for _ in range(world)]
    torch.distributed.all_gather(gathered, local)
    sums = [g.tolist() for g in gathered]
    if any(s != sums[0] for s in sums):
        raise RuntimeError(f"trained weights differ between processes: {sums}")
    return sums
