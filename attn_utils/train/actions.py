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
from attn_utils.config import StageConfig
from attn_utils.method.capture import TokenStats
from attn_utils.train import checkpoint as ck
from attn_utils.train.meter import StepMeter
from attn_utils.train.methods import writes_embedding
from attn_utils.train.runtime import TrainingStopped
from attn_utils.train.stages import save_stage_result
from attn_utils.train.text_training import trains_text_encoder
from attn_utils.train.validation import render_validation


class StageActions:
    """Trainer's side effects: logs, checkpoints, validation images, stage results."""

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
        state = ck.restore_checkpoint(path, self.fingerprint(k), params.named, optimizer, scaler)
        step, held = int(state["step"]), state.get("norm_hold")
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
