"""Run-time pieces the step loop delegates to: stop requests, the optimiser, fingerprints,
and the few numbers all processes must agree on (finiteness, stop requests, checksums,
failures) and the process-group timeout."""

from __future__ import annotations

import hashlib
import json
import logging
import signal
from datetime import timedelta

import torch

from attn_utils.config import ConfigError, RunConfig, StageConfig, first_line
from attn_utils.train.methods import recipe_identity

log = logging.getLogger(__name__)


EXIT_OTHER_PROCESS = 5  # another process failed, or did not answer within --ddp_timeout


class TrainingStopped(Exception):
    """Raised after a clean stop (signal, non-finite loss, another process's failure);
    carries the exit code."""

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
    # fused: one kernel for all tensors, and it can skip a NaN step without a host sync
    # (optimizer_step); auto (None) picks it on CUDA and on the CPU where torch has it.
    fused = cfg.fused_adam if cfg.fused_adam is not None else fused_adamw_available(params)
    return torch.optim.AdamW(params, fused=fused or None, **kw)


def fused_adamw_available(params: list[torch.nn.Parameter]) -> bool:
    """Does this torch have a fused AdamW kernel for these parameters' device and dtype?"""
    try:
        torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1, device=params[0].device))], fused=True)
    except (RuntimeError, ValueError):
        return False
    return all(p.dtype in (torch.float32, torch.float16, torch.bfloat16) for p in params)


# The per-stage settings added later, with the values runs had before they existed: a stage
# at these values hashes as it did, so run folders of earlier versions stay valid.
LATER_STAGE_KEYS = dict(
    flip_p=0.25, rotate_p=0.75, rotate_degrees=45.0, max_grad_norm=None, templates=False,
    crop="random", tune_embedding=False, embedding_learning_rate=None,
    context_embedding_weight=0.0,
    context_attention_weight=0.0, norm_hold_start=0, norm_hold_end=0,
    lora_rank=0, lora_alpha=None, lora_dropout=0.0, lora_targets=None,
)  # fmt: skip
STAGE_IDENTITY = ("index", "learning_rate", "train_steps", "batch_size", "reg_mean_weight",
                  "reg_var_weight", "gradient_accumulation_steps")  # fmt: skip


def _stage_identity(s: StageConfig) -> dict:
    out = {k: getattr(s, k) for k in STAGE_IDENTITY}
    out.update({k: getattr(s, k) for k, old in LATER_STAGE_KEYS.items() if getattr(s, k) != old})
    return out


def stage_fingerprint(cfg: RunConfig, stage: int, data_fp: str, model_fp: str, world: int):
    """Everything that determines a stage's math, hashed; resuming across a change is refused."""
    ident = stage_identity(cfg, stage, data_fp, model_fp, world)
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def stage_identity(cfg: RunConfig, stage: int, data_fp: str, model_fp: str, world: int) -> dict:
    """What stage_fingerprint hashes, as JSON; recorded so that a refusal can name the change."""
    plan = [_stage_identity(s) for s in cfg.stages if s.index <= stage]
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
    return json.loads(json.dumps(ident))  # as it reads back from a file (tuples -> lists)


def _world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def grad_norm(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Total 2-norm of the gradients (one number: NaN or inf if any gradient is)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), device=params[0].device if params else "cpu")
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).float())


def skips_on_device(optimizer) -> bool:
    """Can the optimiser skip a step from a device flag (torch's fused AdamW: found_inf)?"""
    return isinstance(optimizer, torch.optim.AdamW) and bool(optimizer.defaults.get("fused"))


def optimizer_step(optimizer, scaler, params: list[torch.nn.Parameter], max_grad_norm):
    """One update unless a gradient is NaN or inf; returns the 'not finite' flag.

    The flag stays on the device where the optimiser can skip from it (fused AdamW), so
    no step waits for the GPU; otherwise it is read here, one sync per step. Under fp16
    the GradScaler skips overflowing steps itself, and those are not failures.
    """
    if max_grad_norm:
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)  # the pre-clip norm
    elif not scaler.is_enabled():
        norm = grad_norm(params)
    if scaler.is_enabled():
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        return False
    bad = ~torch.isfinite(norm)
    if skips_on_device(optimizer):
        optimizer.found_inf = bad.float()  # read by torch's fused kernel: no update if 1
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif bool(bad):
        bad = True  # a NaN update would poison the weights and every later checkpoint
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return bad


def stop_requested(stop: StopRequest, device: torch.device) -> bool:
    """Has any process been signalled? Every process then records the signal.

    One process: a flag read, no device round trip. Several: a collective, so call it at
    the same steps on every process.
    """
    if _world() == 1:
        return stop.signum is not None
    flag = torch.tensor([float(stop.signum or 0)], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    if flag.item() and stop.signum is None:
        stop.signum = int(flag.item())
    return bool(flag.item())


def process_group_kwargs(timeout_s: float):
    """accelerate's handler that sets every collective's timeout (--ddp_timeout)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))


def first_failed_process(failed: bool, device: torch.device) -> int | None:
    """The lowest process index that reports failure (this one's included), or None.

    Several processes: a collective, and so a barrier, that every process must reach at the
    same point; a process that never comes is waited for up to --ddp_timeout, then this one
    stops (TrainingStopped) instead of hanging.
    """
    world = _world()
    if world == 1:
        return 0 if failed else None
    dist = torch.distributed
    flag = torch.tensor([dist.get_rank() if failed else world], device=device)
    try:
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    except RuntimeError as e:  # gloo's timeout, or a peer that has gone
        raise TrainingStopped(
            "another process did not answer within --ddp_timeout, or has gone "
            f"({first_line(e, 200)})",
            EXIT_OTHER_PROCESS,
        ) from None
    first = int(flag.item())
    return None if first == world else first


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
