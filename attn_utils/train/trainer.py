"""The step loop shared by the three stages; stage specifics live in stages.py."""

from __future__ import annotations

import contextlib
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attn_utils import runfiles as rf
from attn_utils.config import ConfigError, RunConfig, StageConfig
from attn_utils.images import data_fingerprint, load_instance_images
from attn_utils.method.capture import TokenStats, capture_if
from attn_utils.method.step import denoise_losses, encode_latents
from attn_utils.models import (
    base_model_source,
    library_versions,
    load_base_model,
    model_fingerprint,
)
from attn_utils.train import checkpoint as ck
from attn_utils.train.background import BackgroundWriter, HostSnapshot, finish_writes
from attn_utils.train.data import step_seed
from attn_utils.train.loader import stage_loader
from attn_utils.train.meter import StepMeter
from attn_utils.train.methods import concept_token_ids, prompt_ids, training_prompts
from attn_utils.train.placement import (
    attention_backend,
    offloads_text_encoder,
    peak_memory,
    place_models,
    reset_peak,
)
from attn_utils.train.prior import prior_losses, setup_prior
from attn_utils.train.profiling import StageProfiler
from attn_utils.train.runtime import (
    StopRequest,
    TrainingStopped,
    build_optimizer,
    optimizer_step,
    rank_checksums,
    stage_fingerprint,
    stop_requested,
)
from attn_utils.train.stages import (
    finish_trainable,
    load_stage_result,
    missing_stage_message,
    save_stage_result,
    select_trainable,
)
from attn_utils.train.text_training import (
    sync_text_encoder_grads,
    trains_text_encoder,
    unfreeze_text_encoder,
)
from attn_utils.train.validation import encode_validation_prompt, render_validation

log = logging.getLogger(__name__)


class Trainer:
    """Loads everything once, then runs the requested stages in order."""

    def __init__(self, cfg: RunConfig, accelerator) -> None:
        self.cfg, self.acc = cfg, accelerator
        if cfg.mixed_precision is None:  # what `accelerate launch` / `accelerate config` says
            cfg.mixed_precision = accelerator.mixed_precision
        self.run_dir = Path(cfg.output_dir)
        self.device = accelerator.device
        # Data first: a bad photo fails the run before any model is loaded.
        self.images, paths = load_instance_images(
            cfg.instance_data_dir, cfg.resolution, cfg.skip_bad_images
        )
        self.data_fp = data_fingerprint(paths)
        for stage in [s.index for s in cfg.stages if s.index < max(cfg.run_stages)]:
            if stage not in cfg.run_stages and rf.stage_info(self.run_dir, stage) is None:
                raise ConfigError(missing_stage_message(self.run_dir, stage, cfg.run_stages))
        self.model_fp = model_fingerprint(cfg.pretrained_model_name_or_path, cfg.revision)
        m = load_base_model(cfg.pretrained_model_name_or_path, cfg.revision, cfg.local_files_only)
        self.tokenizer, self.text_encoder, self.vae = m.tokenizer, m.text_encoder, m.vae
        self.unet, self.noise_scheduler = m.unet, m.noise_scheduler
        self.token_ids = concept_token_ids(cfg, self.tokenizer, self.text_encoder)
        # (P, 77), (P, K): the instance prompt, or (--method ti) one row per template
        self.input_ids, self.columns = training_prompts(cfg, self.tokenizer, self.token_ids)
        self.pool = None  # LatentPool, built on first use with --cache_latents
        self.text_cache = None  # (1, 77, D) encoder output for stages 2-3
        self.validation_embeds = None  # (prompt, negative) embeddings once the encoder rests
        self.snapshot, self.writer = HostSnapshot(), BackgroundWriter()
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            cfg.mixed_precision
        )
        place_models(self)

    # ------------------------------------------------------------------ setup
    def _cached_text(self) -> torch.Tensor:
        """(1, 77, D) output of the frozen encoder on the fixed prompt, once per run.

        Computed when stage 2 starts (the embedding is final then), with the validation
        prompt's embeddings; afterwards the encoder may wait on the CPU.
        """
        if self.text_cache is None:
            self.text_encoder.to(self.device)
            with torch.no_grad(), self._autocast():
                self.text_cache = self.text_encoder(self.input_ids)[0].float()
                if self.cfg.validation_prompt:
                    self.validation_embeds = encode_validation_prompt(self)
                if self.prior is not None and self.prior.text is None:  # the class prompt
                    ids = self.prior.input_ids.to(self.device)
                    self.prior.text = self.text_encoder(ids)[0].float()
            if offloads_text_encoder(self.cfg.offload_text_encoder, self.device):
                self.text_encoder.to("cpu")
        return self.text_cache

    def _attention_backend(self):
        return attention_backend(self.cfg.sdpa_backend)

    def fingerprint(self, stage: int) -> str:
        return stage_fingerprint(
            self.cfg, stage, self.data_fp, self.model_fp, self.acc.num_processes
        )

    def _autocast(self):
        return torch.autocast(
            self.device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None
        )

    # ------------------------------------------------------------------ driver
    def run(self) -> None:
        cfg, acc = self.cfg, self.acc
        self.prior = setup_prior(self)  # class images, from the base model before any stage
        if acc.is_main_process:
            rf.recover_interrupted_writes(self.run_dir)
            rf.write_json_atomically(
                self.run_dir / "run_config.json",
                {
                    **cfg.to_dict(),
                    "base_model": base_model_source(
                        cfg.pretrained_model_name_or_path, cfg.revision
                    ),
                    "versions": library_versions(),
                    "world_size": acc.num_processes,
                    "data_fingerprint": self.data_fp,
                },
            )
        acc.wait_for_everyone()
        resume = ck.resolve_resume(self.run_dir, cfg.resume_from_checkpoint)
        if resume is None and ck.list_checkpoints(self.run_dir) and acc.is_main_process:
            log.warning(
                "%s holds checkpoints; pass --resume_from_checkpoint latest to continue "
                "from them instead of restarting the stage",
                self.run_dir,
            )
        # one StopRequest for the run: a signal between stages counts too
        with StopRequest() as self.stop, finish_writes(self.writer):
            for stage in [s.index for s in cfg.stages if s.index <= max(cfg.run_stages)]:
                self._run_stage(stage, resume)
        acc.end_training()

    def _run_stage(self, stage: int, resume: Path | None) -> None:
        """Reuse a completed stage, or train it; stop afterwards if a signal came meanwhile."""
        cfg, acc = self.cfg, self.acc
        info = rf.stage_info(self.run_dir, stage)
        if info is not None:
            if info.get("fingerprint") != self.fingerprint(stage):
                raise ConfigError(
                    f"--output_dir: {rf.stage_dir(self.run_dir, stage)} was trained with "
                    "different data, base model or settings; use a new --output_dir"
                )
            later_done = any(rf.stage_info(self.run_dir, j) for j in range(stage + 1, 4))
            if not (later_done and stage >= 2):  # a later U-Net supersedes this one
                load_stage_result(
                    self.run_dir,
                    stage,
                    cfg.placeholder_tokens,
                    self.unet,
                    self.text_encoder,
                    self.token_ids,
                )
            acc.print(f"stage {stage}: already complete, reusing {info.get('path', '')}")
            return
        if stage not in cfg.run_stages:
            raise ConfigError(missing_stage_message(self.run_dir, stage, cfg.run_stages))
        self.train_stage(cfg.stage(stage), resume)
        if stage < max(cfg.run_stages) and stop_requested(self.stop, self.device):
            raise TrainingStopped(
                f"stopped by signal after stage {stage} completed "
                f"({rf.stage_dir(self.run_dir, stage)}); launch the same command again to run "
                "the remaining stages",
                128 + self.stop.signum,
            )

    # ------------------------------------------------------------------ one stage
    def train_stage(self, sc: StageConfig, resume: Path | None) -> None:
        cfg, acc = self.cfg, self.acc
        k = sc.index
        self.snapshot = HostSnapshot()  # this stage's tensors: the last one's buffers go
        params = select_trainable(k, self.unet, self.text_encoder, self.token_ids)
        plist = list(params.named.values())
        optimizer = build_optimizer(plist, sc, cfg)
        plist += unfreeze_text_encoder(self, k, params, optimizer)  # [] unless it trains
        te = trains_text_encoder(cfg, k)  # then every micro-step encodes with gradients
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        start = 0
        if resume is not None and resume.name.startswith(f"checkpoint-s{k}-"):
            start = self._resume(resume, k, params, optimizer, scaler)
        ddp_unet = self.unet
        if k >= 2 and acc.num_processes > 1:
            ddp_unet = torch.nn.parallel.DistributedDataParallel(
                self.unet,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        cached = self._cached_text() if k >= 2 and not te else None  # frozen, fixed prompt
        self.unet.train(cfg.gradient_checkpointing)  # diffusers checkpoints only in train mode
        ga = sc.gradient_accumulation_steps
        loader = stage_loader(self, sc, start)
        stats = TokenStats(merge_last=self.columns.shape[1] - len(self.token_ids))
        stats.columns = self.columns  # (1, k + category columns), on the device
        meter = StepMeter(self.device)
        bar = tqdm(
            total=sc.train_steps,
            initial=start,
            desc=f"stage {k}",
            disable=not acc.is_main_process,
            dynamic_ncols=True,
        )
        reset_peak(self.device)
        n_prof = cfg.profile_steps if acc.is_main_process else 0
        prof = StageProfiler(n_prof, self.run_dir, k, start, self.device)
        step, t0 = start, time.perf_counter()
        if cfg.validate_before_training and start == 0:
            self._validate(k, 0, stats)
        capture = capture_if(bool(sc.reg_mean_weight or sc.reg_var_weight), self.unet, stats)
        # closed on every exit, so an error message starts on a line of its own
        with contextlib.closing(bar), capture:
            for micro, batch in enumerate(loader, start=start * ga):
                last_micro = (micro + 1) % ga == 0
                sync = last_micro or acc.num_processes == 1
                ctx = (
                    ddp_unet.no_sync()
                    if (not sync and ddp_unet is not self.unet)
                    else contextlib.nullcontext()
                )
                with ctx, self._attention_backend():
                    gen = torch.Generator(self.device).manual_seed(
                        step_seed(cfg.seed, k, micro, acc.process_index)
                    )
                    with self._autocast():
                        ids = prompt_ids(self, k, micro, stats) if k == 1 or te else None
                        text = self.text_encoder(ids)[0] if ids is not None else cached
                        mse, reg = self._losses(ddp_unet, batch, text, gen, stats, sc)
                        loss = (mse + reg) / ga
                    meter.add_micro(mse, reg, ga)
                    scaler.scale(loss).backward()
                if not last_micro:
                    continue
                grad_bad = self._optimizer_step(params, optimizer, scaler, plist)
                step += 1
                meter.end_step(step, grad_bad)
                if grad_bad is True:  # read on the host (no fused skip): stop now, as loss or
                    self._read_meter(meter, k, step, sc, bar)  # gradient, on every process
                prof.step_done(step)
                bar.update(1)
                ckpt = bool(sc.checkpointing_steps) and step % sc.checkpointing_steps == 0
                val = bool(sc.validation_steps) and step % sc.validation_steps == 0
                done = step == sc.train_steps
                if ckpt or val or done or step % cfg.logging_steps == 0:
                    self._read_meter(meter, k, step, sc, bar)  # the one host sync
                if done:
                    break
                if ckpt:
                    self._checkpoint(k, step, params, optimizer, scaler)
                if val:
                    self._validate(k, step, stats)
                if (acc.num_processes == 1 or step % cfg.logging_steps == 0) and stop_requested(
                    self.stop, self.device
                ):
                    self._read_meter(meter, k, step, sc, bar)  # never checkpoint a bad step
                    path = self._checkpoint(k, step, params, optimizer, scaler)
                    self.writer.wait()
                    raise TrainingStopped(
                        f"stopped by signal at stage {k} step {step}; checkpoint {path}; "
                        "continue with --resume_from_checkpoint latest",
                        128 + self.stop.signum,
                    )
        prof.finish()
        train_s = time.perf_counter() - t0
        checksums = rank_checksums(plist, self.device)
        if cfg.validation_prompt and sc.validation_steps:
            self._validate(k, step, stats)
        finish_trainable(k, params, self.text_encoder)
        timing = {"train_seconds": round(train_s, 3), **peak_memory(self.device)}
        self._save_stage(k, step, checksums, timing)

    def _read_meter(self, meter: StepMeter, k: int, step: int, sc: StageConfig, bar) -> None:
        """Log the means since the last read; stop if a loss or gradient was not finite."""
        fresh = meter.steps > 0  # steps since the last read: nothing new to log otherwise
        logs, bad = meter.read()
        if bad is not None:
            raise TrainingStopped(self._nan_message(k, bad[0], bad[1]), 3)
        if not fresh:
            return
        logs["lr"] = sc.learning_rate
        bar.set_postfix(
            loss=f"{logs['loss']:.4f}", reg=f"{logs['reg']:.4g}", lr=f"{sc.learning_rate:.1e}"
        )
        self.acc.log({f"stage_{k}/{n}": v for n, v in logs.items()}, step=step)
        self.last_logs = logs

    def _losses(self, unet, batch, text, gen, stats: TokenStats, sc: StageConfig):
        """Denoising MSE and attention regulariser for one micro-batch."""
        if isinstance(batch, (list, tuple)):  # prior preservation: (instance, class) samples
            return prior_losses(self, unet, batch, text, gen, stats, sc)
        if self.pool is not None:  # the batch holds pool indices
            latents = self.pool.sample(batch, gen) * self.vae.config.scaling_factor
        else:
            latents = encode_latents(self.vae, batch, gen)
        return denoise_losses(
            unet, self.noise_scheduler, latents, text, gen, stats, len(self.token_ids),
            sc.reg_mean_weight, sc.reg_var_weight, self.cfg.noise_offset, self.cfg.channels_last,
        )  # fmt: skip

    def _optimizer_step(self, params, optimizer, scaler, plist):
        """One update, none if a gradient is NaN or inf; returns that flag (maybe on device)."""
        if params.embedding is not None and self.acc.num_processes > 1:
            # Stage 1's few numbers are all-reduced by hand: the original forgot to, and
            # its ranks drifted apart.
            g = params.embedding.learned.grad
            torch.distributed.all_reduce(g)
            g.div_(self.acc.num_processes)
        sync_text_encoder_grads(params, self.acc.num_processes)  # DDP wraps the U-Net only
        return optimizer_step(optimizer, scaler, plist, self.cfg.max_grad_norm)

    # ------------------------------------------------------------------ helpers
    def _nan_message(self, k: int, step: int, what: str) -> str:
        self.writer.wait()  # a checkpoint still being written is a good one
        found = ck.list_checkpoints(self.run_dir)
        last = str(found[-1]) if found else "none (no checkpoint written yet)"
        return (
            f"non-finite {what} at stage {k} step {step}; stopping without saving. "
            f"Last good checkpoint: {last}. Try a lower learning rate or "
            "--mixed_precision no"
        )

    def _checkpoint(self, k, step, params, optimizer, scaler) -> Path | None:
        path = None
        if self.acc.is_main_process:
            extra = {"fingerprint": self.fingerprint(k), "scaler": scaler.state_dict()}
            path = ck.save_checkpoint(
                self.run_dir,
                k,
                step,
                params.named,
                optimizer,
                extra,
                self.cfg.checkpoints_total_limit,
                snapshot=self.snapshot,
                writer=self.writer,
            )
        self.acc.wait_for_everyone()
        return path or self.run_dir / "checkpoints"

    def _resume(self, path: Path, k: int, params, optimizer, scaler) -> int:
        step = ck.restore_checkpoint(path, self.fingerprint(k), params.named, optimizer, scaler)
        self.acc.print(f"stage {k}: resumed from {path} at step {step}")
        return step

    def _validate(self, k: int, step: int, stats: TokenStats) -> None:
        if not self.cfg.validation_prompt:
            return
        if self.acc.is_main_process:
            stats.active = False  # fused attention and no recording while sampling
            try:
                out = self.run_dir / "validation" / f"stage_{k}" / f"step_{step}.png"
                render_validation(self, out)
            finally:
                stats.active = True
        self.acc.wait_for_everyone()

    def _save_stage(self, k: int, step: int, checksums: list, timing: dict) -> None:
        self.writer.wait()  # the stage's last checkpoint is on disk before it is superseded
        if self.acc.is_main_process:
            info = {
                "fingerprint": self.fingerprint(k),
                "steps": step,
                "path": str(rf.stage_dir(self.run_dir, k)),
                "final_logs": getattr(self, "last_logs", {}),
                "rank_checksums": checksums,
                **timing,  # loop seconds and peak memory of this run of the stage
            }
            save_stage_result(
                self.run_dir,
                k,
                self.cfg.placeholder_tokens,
                self.unet,
                self.text_encoder,
                self.token_ids,
                info,
                text_encoder_trained=trains_text_encoder(self.cfg, k),
            )
            for old in ck.list_checkpoints(self.run_dir):  # superseded by the stage result
                if old.name.startswith(f"checkpoint-s{k}-"):
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
