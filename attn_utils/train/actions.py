"""What the stage loop does at the steps its Schedule names, and at a stage's end.

Reading the meter (log, or stop on a non-finite value), checkpoints and resuming, validation
grids, and the stage result. A mixin of Trainer: it works on the trainer's models, run folder,
accelerator and background writer.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from attn_utils import runfiles as rf
from attn_utils.config import ConfigError, StageConfig
from attn_utils.method.capture import TokenStats
from attn_utils.train import checkpoint as ck
from attn_utils.train.meter import StepMeter
from attn_utils.train.methods import writes_embedding
from attn_utils.train.records import StageClock
from attn_utils.train.runtime import TrainingStopped, stage_identity
from attn_utils.train.stages import save_stage_result
from attn_utils.train.text_training import trains_text_encoder
from attn_utils.train.validation import render_validation


class StageActions:
    """Trainer's side effects: logs, checkpoints, validation images, stage results."""

    def identity(self, k: int) -> dict:
        """What stage k's fingerprint hashes (runtime.stage_identity)."""
        return stage_identity(self.cfg, k, self.data_fp, self.model_fp, self.acc.num_processes)

    def _check_reusable(self, k: int, info: dict) -> None:
        """A completed stage_<k>/ of this run folder must come from the same data and
        settings; refused naming what changed, and how to keep the stages before it."""
        if info.get("fingerprint") == self.fingerprint(k):
            return
        earlier = [rf.stage_dir(self.run_dir, s.index).name for s in self.cfg.stages
                   if s.index < k]  # fmt: skip
        reuse = f" (copy {', '.join(earlier)} into it to reuse them)" if earlier else ""
        raise ConfigError(
            f"--output_dir: {rf.stage_dir(self.run_dir, k)} was trained with different data, "
            f"base model or settings{ck.identity_change(info.get('identity'), self.identity(k))}; "
            f"use a new --output_dir{reuse}"
        )

    def _read_meter(self, meter: StepMeter, k: int, step: int, sc: StageConfig, bar) -> None:
        """Log the means since the last read; stop if a loss or gradient was not finite."""
        steps = meter.steps  # since the last read: nothing new to log when 0
        fresh = steps > 0
        logs, bad = meter.read()
        if bad is not None:
            raise TrainingStopped(self._nan_message(k, bad[0], bad[1]), 3)
        if not fresh:
            return
        logs["lr"] = sc.learning_rate
        if self.loss_log is not None:  # the main process's
            self.loss_log.add(step, steps, logs)
        bar.set_postfix(
            loss=f"{logs['loss']:.4f}", reg=f"{logs['reg']:.4g}", lr=f"{sc.learning_rate:.1e}"
        )
        self.acc.log({f"stage_{k}/{n}": v for n, v in logs.items()}, step=step)
        self.last_logs = logs

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
            extra = {"fingerprint": self.fingerprint(k), "identity": self.identity(k),
                     "scaler": scaler.state_dict(), **self.clock.state()}  # fmt: skip
            hold = self.core.hold if self.core is not None else None
            if hold is not None and hold.norms is not None:  # CoRe: the norm [V] is held to
                extra["norm_hold"] = hold.norms.tolist()
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
        state = ck.restore_checkpoint(
            path, self.fingerprint(k), params.named, optimizer, scaler, self.identity(k)
        )
        step, held = int(state["step"]), state.get("norm_hold")
        self.clock = StageClock.resumed(state)  # the earlier launches' seconds count too
        if held is not None and self.core is not None and self.core.hold is not None:
            self.core.hold.norms = torch.tensor(held, device=params.embedding.learned.device)
        total = self.cfg.stage(k).train_steps
        self.acc.print(
            f"stage {k}: resumed from {path} at step {step} of {total} "
            "(--resume_from_checkpoint none starts the stage over)"
        )
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

    def _save_stage(self, k: int, step: int, checksums: list, timing: dict, lora=None) -> None:
        self.writer.wait()  # the stage's last checkpoint is on disk before it is superseded
        if self.acc.is_main_process:
            info = {
                "fingerprint": self.fingerprint(k),
                "identity": self.identity(k),  # what the fingerprint hashes: names a change
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
                embedding_trained=writes_embedding(self.cfg, k),
                lora_state=lora,  # a LoRA stage's adapters, written instead of unet/
            )
            for old in ck.list_checkpoints(self.run_dir):  # superseded by the stage result
                if old.name.startswith(f"checkpoint-s{k}-"):
                    shutil.rmtree(old, ignore_errors=True)
        self.acc.wait_for_everyone()
