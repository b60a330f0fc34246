"""Run-time pieces the step loop delegates to: stop requests, the optimiser, fingerprints."""

from __future__ import annotations

import hashlib
import json
import logging
import signal

import torch

from .config import ConfigError, RunConfig, StageConfig

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
    )
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()
