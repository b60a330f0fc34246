"""Defaults and refusals that depend on the base model's family (attn_utils/families.py).

SD 1.x / 2.x keep the paper's recipe unchanged. On SDXL the attndreambooth recipe's numbers
are ours, not the paper's (the paper trained SD 2.1-base only); each comes from a diffusers
SDXL example, or says why not (docs/sdxl.md):

  resolution 1024       SDXL's native size, read from the model as for every family (both
                        SDXL examples train at 1024 or 768)
  layout                batch 1 x gradient accumulation 4 in every stage: the examples'
                        (train_batch_size 1, gradient_accumulation_steps 4), which fits a
                        1024 px SDXL step in one GPU's memory
  regulariser weights   the paper's x 8: it sums over the batch and tuned its weights at batch
                        8 against a batch-mean MSE; at batch 1 the same per-sample balance
                        needs 8x the weight (0.8 / 0 in stage 1; 16 / 40 in stages 2-3)
  stage 1               lr 2e-3 = examples/textual_inversion/README_sdxl.md's 5e-4 x --scale_lr
                        (x 4 accumulation x batch 1), 500 steps (its max_train_steps)
  stage 2               the paper's cross-attention stage (no SDXL example trains attn2 alone):
                        its lr 2e-5, 200 steps (the paper's 100 steps x batch 8 = 800 samples,
                        here 4 a step)
  stage 3               LoRA, rank 4 on every attention projection: the examples/dreambooth
                        README_sdxl.md recipe (train_dreambooth_lora_sdxl.py, its --rank
                        default 4), lr 1e-4, 500 steps. --unet_lora_rank 0 trains the whole
                        U-Net instead, at the paper's 2e-6 (not tried on SDXL)
"""

from __future__ import annotations

import argparse

from attn_utils.config import PAPER_STAGES, ConfigError, RunConfig
from attn_utils.models import base_facts

# --resolution's default is the model's native size (U-Net sample_size x VAE factor: 512 for
# SD 2.1-base and SD 1.5, 768 for SD 2.1, 1024 for SDXL); these stand in when the configs
# do not say (a --dry_run guessing a Hub id's family by its name).
SDXL_RESOLUTION = 1024
SD_RESOLUTION = 512  # the paper's (SD 2.1-base)
SDXL_REG_SCALE = 8  # the paper's batch 8 over our batch 1 (docs/sdxl.md)
_LAYOUT = dict(batch_size=1, gradient_accumulation_steps=4)
TI_SDXL = "diffusers examples/textual_inversion/README_sdxl.md"
DB_LORA_SDXL = "diffusers examples/dreambooth/README_sdxl.md (train_dreambooth_lora_sdxl.py)"
SDXL_STAGES = {
    1: dict(learning_rate=5e-4 * 4 * 1, train_steps=500, reg_mean_weight=0.1 * SDXL_REG_SCALE,
            reg_var_weight=0.0, validation_steps=100, **_LAYOUT),
    2: dict(learning_rate=2e-5, train_steps=200, reg_mean_weight=2.0 * SDXL_REG_SCALE,
            reg_var_weight=5.0 * SDXL_REG_SCALE, validation_steps=100, **_LAYOUT),
    3: dict(learning_rate=1e-4, train_steps=500, reg_mean_weight=2.0 * SDXL_REG_SCALE,
            reg_var_weight=5.0 * SDXL_REG_SCALE, validation_steps=100, lora_rank=4,
            lora_targets="attention", **_LAYOUT),
}  # fmt: skip
SDXL_FULL_STAGE_3_LR = PAPER_STAGES[3]["learning_rate"]  # --unet_lora_rank 0
SDXL_SOURCE = (
    f"ours for SDXL (docs/sdxl.md): stage 1 from {TI_SDXL}, stage 2 the paper's, stage 3 "
    f"from {DB_LORA_SDXL}"
)
# SD-only flags and settings: what each would mean, and why SDXL refuses it.
SDXL_REFUSED = {
    "fast": "--fast: the paper's fast stage 3 is SD 2.1's full U-Net at 1e-5; on SDXL stage 3 "
    "is LoRA (docs/sdxl.md): set --unet_learning_rate / --unet_train_steps instead",
    "train_text_encoder": "--train_text_encoder: fine-tunes SD's one text encoder; not "
    "offered for SDXL's two",
    "core": "--method core: CoRe's context losses are not offered on SDXL",
}


def resolve_family(ns: argparse.Namespace) -> str:
    """The base model's family, read from its config files (no weights) before any default;
    fills in --resolution (the model's native size) and ns.family / ns.family_guess, which
    the RunConfig records. Files that cannot be read leave a guess from the name, which only
    a plan may rest on: a run stops when load_base_model reads the files (one ConfigError)."""
    name = ns.pretrained_model_name_or_path
    facts = base_facts(name, ns.revision, ns.local_files_only, guess=True)
    default = SDXL_RESOLUTION if facts.family == "sdxl" else SD_RESOLUTION
    ns.family, ns.family_guess = facts.family, None
    if facts.guess:
        ns.family_guess = f"{facts.family}, guessed from the name {name!r}: {facts.guess}"
    if ns.resolution is None:
        ns.resolution = facts.resolution or default
        if facts.guess:
            ns.family_guess += f"; resolution: the family's default {default}, a guess too"
    return facts.family


def refuse_a_guessed_family(cfg: RunConfig) -> None:
    """One ConfigError for a run whose defaults rest on a family guessed from the name (its
    files, unreadable when the flags were resolved, loaded a moment later): only a plan may."""
    if cfg.family_guess is not None:
        raise ConfigError(
            f"--pretrained_model_name_or_path: the defaults were resolved while the model's "
            f"files could not be read ({cfg.family_guess}); run again"
        )


def family_presets(ns: argparse.Namespace, presets: dict[int, dict], family: str) -> dict:
    """The method's stage presets on this family: unchanged for SD; attndreambooth's own
    SDXL numbers on SDXL (the ablations and baselines keep theirs, at SDXL's resolution)."""
    if family != "sdxl" or ns.method != "attndreambooth":
        return presets
    out = {k: dict(SDXL_STAGES[k]) for k in presets}
    if 3 in out and getattr(ns, "unet_lora_rank", None) == 0:  # the whole U-Net instead
        for key in ("lora_rank", "lora_targets"):
            out[3].pop(key)
        out[3]["learning_rate"] = SDXL_FULL_STAGE_3_LR
        ns.unet_lora_rank = None
    return out


def check_family(ns: argparse.Namespace, cfg, family: str) -> None:
    """One ConfigError naming an SD-only flag or setting that SDXL cannot honour."""
    if family != "sdxl":
        return
    if ns.fast:
        raise ConfigError(SDXL_REFUSED["fast"])
    if cfg.train_text_encoder:
        raise ConfigError(SDXL_REFUSED["train_text_encoder"])
    if cfg.method == "core":
        raise ConfigError(SDXL_REFUSED["core"])
    if cfg.method == "attndreambooth":
        cfg.method_source = SDXL_SOURCE
