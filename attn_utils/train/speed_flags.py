"""The flags that choose how fast and how lean a run is, not what it computes.

None of them changes the recipe's math beyond floating-point rounding, except --cache_latents
(a finite pool of augmentations; opt-in). attn_utils.train.placement applies them.
"""

from __future__ import annotations

import argparse

SDPA_BACKENDS = ("auto", "flash", "cudnn", "efficient", "math")


def add_speed_flags(p: argparse.ArgumentParser) -> None:
    """Precision, optimiser kernel, memory, compilation, attention kernel, data loading."""
    p = p.add_argument_group("speed and memory (docs/performance.md)")
    p.add_argument(
        "--mixed_precision",
        choices=["no", "fp16", "bf16"],
        default=None,
        help="autocast precision (default: what `accelerate launch` / `accelerate config` set)",
    )
    p.add_argument("--allow_tf32", action="store_true")
    p.add_argument("--gradient_checkpointing", action="store_true")
    p.add_argument("--use_8bit_adam", action="store_true")
    p.add_argument(
        "--fused_adam",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="fused AdamW kernel (default: wherever torch has it)",
    )
    p.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    p.add_argument("--channels_last", action="store_true")
    p.add_argument(
        "--torch_compile",
        nargs="?",
        const="unet",
        default="none",
        choices=["none", "unet", "blocks"],
        help="compile the whole U-Net (bare flag) or each transformer/resnet block",
    )
    p.add_argument(
        "--compile_vae", action="store_true", help="compile the VAE encoder (per-step encode)"
    )
    p.add_argument("--sdpa_backend", choices=list(SDPA_BACKENDS), default="auto")
    p.add_argument(
        "--offload_text_encoder",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the text encoder on the CPU in stages 2-3 (default: on CUDA)",
    )
    p.add_argument("--logging_steps", type=int, default=10, help="read and log losses every N")
    p.add_argument(
        "--profile_steps",
        type=int,
        default=0,
        metavar="N",
        help="torch.profiler over N steps of each stage, after 3 warm-up steps: a table of "
        "ops and host-device syncs in <output_dir>/profile/",
    )
    p.add_argument(
        "--cache_latents",
        action="store_true",
        help="train on a pool of pre-encoded augmented latents",
    )
    p.add_argument("--cache_latents_variants", type=int, default=16)
    p.add_argument(
        "--dataloader_num_workers",
        type=int,
        default=None,
        help="default: up to 4 on a GPU, 0 on the CPU",
    )


def validate_speed_flags(cfg) -> None:
    """One ConfigError naming the flag (called by config.validate)."""
    from attn_utils.config import ConfigError

    if cfg.profile_steps < 0:
        raise ConfigError("--profile_steps: must be >= 0")
    if cfg.logging_steps < 1:
        raise ConfigError("--logging_steps: must be >= 1")
    if cfg.dataloader_num_workers is not None and cfg.dataloader_num_workers < 0:
        raise ConfigError("--dataloader_num_workers: must be >= 0")
    if cfg.use_8bit_adam and cfg.fused_adam:
        raise ConfigError("--use_8bit_adam and --fused_adam: choose one optimiser")
    if cfg.cache_latents and cfg.cache_latents_variants < 1:
        raise ConfigError("--cache_latents_variants: must be >= 1")
