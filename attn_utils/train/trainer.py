"""The step loop shared by the three stages; stage specifics live in stages.py."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attn_utils import runfiles as rf
from attn_utils.config import ConfigError, RunConfig, StageConfig
from attn_utils.images import data_fingerprint, load_instance_images
from attn_utils.method.capture import TokenStats, capture_cross_attention, capture_if
from attn_utils.method.core import core_losses
from attn_utils.method.step import denoise_losses, encode_latents
from attn_utils.models import (
    base_model_source,
    library_versions,
    load_base_model,
    model_fingerprint,
)
from attn_utils.train import checkpoint as ck
from attn_utils.train.actions import StageActions
from attn_utils.train.background import BackgroundWriter, HostSnapshot, finish_writes
from attn_utils.train.conditioning import encode_text, split_batch, unet_cond
from attn_utils.train.core import core_state
from attn_utils.train.data import step_seed
from attn_utils.train.loader import stage_loader
from attn_utils.train.lora import dropout_rng, lora_info
from attn_utils.train.meter import StepMeter
from attn_utils.train.placement import (
    attention_backend,
    offloads_text_encoder,
    peak_memory,
    place_models,
    reset_peak,
)
from attn_utils.train.prior import encode_class_prompt, prior_losses, setup_prior
from attn_utils.train.profiling import StageProfiler
from attn_utils.train.prompts import (
    concept_token_ids,
    prompt_ids,
    training_prompts,
    warn_unknown_words,
)
from attn_utils.train.records import LossLog, StageClock
from attn_utils.train.runtime import (
    StopRequest,
    TrainingStopped,
    build_optimizer,
    optimizer_step,
    rank_checksums,
    stage_fingerprint,
    stop_requested,
)
from attn_utils.train.schedule import Due, Schedule
from attn_utils.train.stage_run import StageRun
from attn_utils.train.stages import (
    finish_trainable,
    load_stage_result,
    missing_stage_message,
    select_trainable,
    superseded,
)
from attn_utils.train.text_training import (
    sync_text_encoder_grads,
    trains_text_encoder,
    unfreeze_text_encoder,
)
from attn_utils.train.validation import encode_validation_prompt

log = logging.getLogger(__name__)


class Trainer(StageActions):
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
        self.unet, self.noise_scheduler, self.family = m.unet, m.noise_scheduler, m.family
        self.token_ids = concept_token_ids(cfg, self.tokenizer, self.text_encoder)
        if accelerator.is_main_process:  # once per run: a toy tokenizer spells them in letters
            warn_unknown_words(cfg, self.tokenizer)
        # (P, 77), (P, K): the instance prompt, or (--method ti) one row per template
        # per stage: (P, 77) ids and (P, K) columns; the one instance prompt, or the templates
        self.prompts = {
            s.index: training_prompts(cfg, self.tokenizer, self.token_ids, s.templates)
            for s in cfg.stages
        }
        self.input_ids = self.columns = None  # (P, 77), (P, K): the stage's, set as it begins
        self.pool = None  # LatentPool, built on first use with --cache_latents
        self.core, self.micro = None, 0  # a CoRe stage's prompts and hold; the micro-step
        self.text_cache = None  # ((1, 77, D), SDXL's pooled (1, P) or None) for stages 2-3
        self.validation_embeds = None  # (prompt, negative) embeddings once the encoder rests
        self.snapshot, self.writer = HostSnapshot(), BackgroundWriter()
        self.autocast_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(
            cfg.mixed_precision
        )
        place_models(self)

    # ------------------------------------------------------------------ setup
    def _cached_text(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """((1, 77, D), pooled (1, P) or None) of the frozen encoder on the fixed prompt,
        once per run (SDXL's pooled embedding is cached with it).

        Computed when stage 2 starts (the embedding is final then), with the validation
        prompt's embeddings; afterwards the encoder may wait on the CPU.
        """
        if self.text_cache is None:
            self.text_encoder.to(self.device)
            with torch.no_grad(), self._autocast():
                text, pooled = encode_text(self.text_encoder, self.input_ids)
                self.text_cache = (text.float(), None if pooled is None else pooled.float())
                if self.cfg.validation_prompt:
                    self.validation_embeds = encode_validation_prompt(self)
                if self.prior is not None and self.prior.text is None:  # the class prompt
                    encode_class_prompt(self, self.prior)
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
                    "family": self.family,  # sd1 | sd2 | sdxl (attn_utils/families.py)
                    "versions": library_versions(),
                    "world_size": acc.num_processes,
                    "data_fingerprint": self.data_fp,
                },
            )
        acc.wait_for_everyone()
        resume = ck.resolve_resume(self.run_dir, cfg.resume_from_checkpoint)
        if cfg.resume_from_checkpoint == "none":
            self._start_over()
        # one StopRequest for the run: a signal between stages counts too
        with StopRequest() as self.stop, finish_writes(self.writer):
            for stage in [s.index for s in cfg.stages if s.index <= max(cfg.run_stages)]:
                self._run_stage(stage, resume)
        acc.end_training()

    def _start_over(self) -> None:
        """--resume_from_checkpoint none: an interrupted stage restarts; its checkpoints go."""
        if self.acc.is_main_process:
            for old in ck.list_checkpoints(self.run_dir):
                log.warning("--resume_from_checkpoint none: removing %s", old)
                rf.remove_dir(old)
        self.acc.wait_for_everyone()

    def _run_stage(self, stage: int, resume: Path | None) -> None:
        """Reuse a completed stage, or train it; stop afterwards if a signal came meanwhile."""
        cfg, acc = self.cfg, self.acc
        info = rf.stage_info(self.run_dir, stage)
        if info is not None:
            self._check_reusable(stage, info)
            if not superseded(self.run_dir, stage):  # a later full U-Net holds this one
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
        """One stage: each micro-batch is denoised, regularised and backpropagated; every
        gradient_accumulation_steps of them make one optimiser step, then what is due."""
        run = self._begin_stage(sc, resume)
        ga = sc.gradient_accumulation_steps
        with contextlib.closing(run.bar), run.capture:  # closed on every exit
            for micro, batch in enumerate(run.loader, start=run.start * ga):
                last_micro = (micro + 1) % ga == 0
                self._backward(run, micro, batch, sync=last_micro)
                if not last_micro:
                    continue
                grad_bad = self._optimizer_step(run.params, run.optimizer, run.scaler, run.plist)
                run.step += 1
                run.meter.end_step(run.step, grad_bad)
                run.prof.step_done(run.step)
                run.bar.update(1)
                # grad_bad is True only when read on the host (no fused skip): stop at once
                if self._after_step(run, run.schedule.after(run.step, grad_bad is True)):
                    break
        self._end_stage(run)

    def _begin_stage(self, sc: StageConfig, resume: Path | None) -> StageRun:
        """The stage's trainable set, optimiser, resumed state, data and bookkeeping."""
        cfg, acc, k = self.cfg, self.acc, sc.index
        self.snapshot = HostSnapshot()  # this stage's tensors: the last one's buffers go
        self.stage_cfg = sc
        self.input_ids, self.columns = self.prompts[k]
        params = select_trainable(k, self.unet, self.text_encoder, self.token_ids,
                                  sc.tune_embedding, lora=sc, seed=cfg.seed)  # fmt: skip
        tuned = params.embedding if k >= 2 else None  # ti_db: [V] trains with the U-Net
        plist = [p for p in params.named.values() if tuned is None or p is not tuned.learned]
        optimizer = build_optimizer(plist, sc, cfg)
        if tuned is not None:  # its own rate, in its own group
            lr = sc.embedding_learning_rate or sc.learning_rate
            optimizer.add_param_group({"params": [tuned.learned], "lr": lr})
            plist.append(tuned.learned)
        plist += unfreeze_text_encoder(self, k, params, optimizer)  # [] unless it trains
        # the text encoder then runs every micro-step, with gradients
        encodes = k == 1 or trains_text_encoder(cfg, k) or tuned is not None
        scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.mixed_precision == "fp16")
        self.core = core_state(cfg, sc, self.tokenizer, self.token_ids, self.device)  # or None
        start, self.clock = 0, StageClock()
        if resume is not None and resume.name.startswith(f"checkpoint-s{k}-"):
            start = self._resume(resume, k, params, optimizer, scaler)  # and its clock
        self.loss_log = LossLog(self.run_dir, k, start) if acc.is_main_process else None
        unet = self.unet
        if k >= 2 and acc.num_processes > 1:
            unet = torch.nn.parallel.DistributedDataParallel(
                self.unet, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        # Train mode only for adapter dropout: the U-Net has no other, and diffusers (0.32 and
        # later) checkpoints whenever gradients are on, in either mode
        self.unet.train(sc.lora_dropout > 0)
        stats = TokenStats(merge_last=self.columns.shape[1] - len(self.token_ids))
        stats.columns = self.columns  # (1, k + category columns), on the device
        bar = tqdm(total=sc.train_steps, initial=start, desc=f"stage {k}",
                   disable=not acc.is_main_process, dynamic_ncols=True)  # fmt: skip
        run = StageRun(
            sc=sc, params=params, plist=plist, optimizer=optimizer, scaler=scaler, unet=unet,
            text=None if encodes else self._cached_text(),  # frozen encoder, fixed prompt
            encodes=encodes, loader=stage_loader(self, sc, start), stats=stats,
            meter=StepMeter(self.device), schedule=Schedule(sc, cfg.logging_steps,
                                                            acc.num_processes),
            bar=bar, start=start, step=start,
            prof=StageProfiler(cfg.profile_steps if acc.is_main_process else 0, self.run_dir, k,
                               start, self.device),
            capture=self._capture(sc, stats),
        )  # fmt: skip
        reset_peak(self.device)
        if cfg.validate_before_training and start == 0:
            self._validate(k, 0, stats)
        self.clock.start()
        return run

    def _capture(self, sc: StageConfig, stats: TokenStats):
        """The stage's attn2 capture: the regulariser's statistics, CoRe's context means
        (recording only in its extra forwards), or none (fused attention everywhere)."""
        if self.core is not None:
            self.core.means.active = False
            return capture_cross_attention(self.unet, self.core.means)
        return capture_if(bool(sc.reg_mean_weight or sc.reg_var_weight), self.unet, stats)

    def _backward(self, run: StageRun, micro: int, batch, sync: bool) -> None:
        """One micro-batch: its text, denoising loss and regulariser, then backward.

        DDP all-reduces the gradients only on the optimiser step's micro-batch (`sync`).
        """
        k, ga = run.sc.index, run.sc.gradient_accumulation_steps
        wrapped = run.unet is not self.unet
        no_sync = run.unet.no_sync() if wrapped and not sync else contextlib.nullcontext()
        seed = step_seed(self.cfg.seed, k, micro, self.acc.process_index)
        with no_sync, self._attention_backend(), dropout_rng(run.sc, seed, self.device):
            self.micro = micro  # CoRe draws its regularisation prompt from it
            gen = torch.Generator(self.device).manual_seed(seed)
            with self._autocast():
                ids = prompt_ids(self, k, micro, run.stats) if run.encodes else None
                text, pooled = encode_text(self.text_encoder, ids) if ids is not None else run.text
                text = text if pooled is None else (text, pooled)  # SDXL: both condition it
                mse, reg = self._losses(run.unet, batch, text, gen, run.stats, run.sc)
                loss = (mse + reg) / ga
            run.meter.add_micro(mse, reg, ga)
            run.scaler.scale(loss).backward()

    def _after_step(self, run: StageRun, due: Due) -> bool:
        """Do what the schedule says is due after this step; True: the stage's loop ends."""
        k, step = run.sc.index, run.step
        if self.core is not None and self.core.hold is not None:  # CoRe: [V]'s norm held
            self.core.hold.after_step(step, run.params.embedding.learned)
        if due.read:
            self._read_meter(run.meter, k, step, run.sc, run.bar)  # the one host sync
        if due.done:
            return True
        if due.checkpoint:
            self._checkpoint(k, step, run.params, run.optimizer, run.scaler)
        if due.validate:
            self._validate(k, step, run.stats)
        if due.ask_stop and stop_requested(self.stop, self.device):
            self._read_meter(run.meter, k, step, run.sc, run.bar)  # never checkpoint a bad step
            path = self._checkpoint(k, step, run.params, run.optimizer, run.scaler)
            self.writer.wait()
            raise TrainingStopped(
                f"stopped by signal at stage {k} step {step}; checkpoint {path}; "
                "launch the same command again to continue from it",
                128 + self.stop.signum,
            )
        return False

    def _end_stage(self, run: StageRun) -> None:
        """Final validation, then the stage result (which supersedes its checkpoints)."""
        k = run.sc.index
        run.prof.finish()
        clock = self.clock.state()  # the loop's seconds, over every launch of the stage
        checksums = rank_checksums(run.plist, self.device)
        if self.cfg.validation_prompt and run.sc.validation_steps:
            self._validate(k, run.step, run.stats)
        lora = {"lora": lora_info(run.sc, run.params.named)} if run.params.lora else {}
        lora_state = finish_trainable(k, run.params, self.text_encoder, self.unet)
        timing = {**clock, **peak_memory(self.device), **lora}
        self._save_stage(k, run.step, checksums, timing, lora_state)

    def _losses(self, unet, batch, text, gen, stats: TokenStats, sc: StageConfig):
        """Denoising MSE and attention regulariser for one micro-batch; `text` is (1 or B,
        77, D), or on SDXL (that, pooled (1 or B, P)), the batch's time ids joining them."""
        text, pooled = text if isinstance(text, tuple) else (text, None)
        if isinstance(batch, (list, tuple)):  # prior preservation: (instance, class) samples
            return prior_losses(self, unet, batch, text, gen, stats, sc, pooled)
        batch, time_ids = split_batch(batch)
        if self.pool is not None:  # the batch holds pool indices
            latents = self.pool.sample(batch, gen) * self.vae.config.scaling_factor
        else:
            latents = encode_latents(self.vae, batch, gen)
        if self.core is not None:  # CoRe's stage 1: a regularisation prompt, encoded both ways
            cp = self.core.pick(self.cfg.seed, sc.index, self.micro, self.acc.process_index)
            h_v = self.text_encoder(cp.ids_v)[0]  # (1, 77, D), through [V]'s rows
            with torch.no_grad():  # no learned token in it
                h_c = self.text_encoder(cp.ids_c)[0]
            return core_losses(
                unet, self.noise_scheduler, latents, text, gen, h_v, h_c, cp.pos_v, cp.pos_c,
                self.core.means, sc.context_embedding_weight, sc.context_attention_weight,
                self.cfg.noise_offset, self.cfg.channels_last,
            )  # fmt: skip
        cond = unet_cond(pooled, time_ids, self.pool, batch, latents.shape[0])
        return denoise_losses(
            unet, self.noise_scheduler, latents, text, gen, stats, len(self.token_ids),
            sc.reg_mean_weight, sc.reg_var_weight, self.cfg.noise_offset, self.cfg.channels_last,
            added_cond=cond,
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
        return optimizer_step(optimizer, scaler, plist, self.stage_cfg.max_grad_norm)

    # ------------------------------------------------------------------ helpers
