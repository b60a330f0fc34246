"""DreamBooth's optional text-encoder training (--train_text_encoder).

The diffusers DreamBooth example can fine-tune the text encoder beside the U-Net. Here it is
stage 3 of `--method dreambooth`: the text encoder's weights join the U-Net's in the same
AdamW (their own param group and lr), the prompts are encoded every micro-step with
gradients, checkpoints hold them as `text_encoder.<name>`, and the stage result gains
`stage_3/text_encoder/` (transformers layout), which a relaunch and inference load.
"""

from __future__ import annotations

import argparse

import torch

from attn_utils.config import ConfigError, RunConfig

STAGE = 3  # the stage that trains the whole U-Net trains the text encoder too
PREFIX = "text_encoder."  # names of its tensors in checkpoints, beside the U-Net's
# Why each other method refuses the flag (docs/methods.md).
REFUSED = {
    "attndreambooth": "--method attndreambooth never trains the text encoder (docs/method.md); "
    "it is DreamBooth's option, for --method dreambooth",
    "ti": "--method ti trains [V]'s embedding alone; the text encoder trains only with the "
    "U-Net, in --method dreambooth",
    "ti_db": "--method ti_db learns [V]'s embedding in stage 1, which training the whole text "
    "encoder in stage 3 would change behind its file; use --method dreambooth",
}


def add_text_encoder_flags(g: argparse._ArgumentGroup) -> None:
    """--train_text_encoder and --text_encoder_learning_rate (the diffusers example's names)."""
    g.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="dreambooth: fine-tune the text encoder with the U-Net in stage 3",
    )
    g.add_argument(
        "--text_encoder_learning_rate",
        type=float,
        default=None,
        help="its learning rate (default: stage 3's; the example suggests 2e-6 for both)",
    )


def check_text_encoder_flags(cfg: RunConfig) -> None:
    """One ConfigError naming the flag; fills in the default lr (stage 3's U-Net lr)."""
    if not cfg.train_text_encoder:
        if cfg.text_encoder_learning_rate is not None:
            raise ConfigError(
                "--text_encoder_learning_rate: only means something with --train_text_encoder"
            )
        return
    if cfg.method != "dreambooth":  # the ablations are AttnDreamBooth's: never trained
        why = REFUSED.get(
            cfg.method, REFUSED["attndreambooth"].replace("attndreambooth", cfg.method)
        )
        raise ConfigError(f"--train_text_encoder: {why}")
    if STAGE not in cfg.run_stages:
        raise ConfigError(f"--train_text_encoder: trains in stage {STAGE}, not in --stages")
    if cfg.offload_text_encoder:
        raise ConfigError(
            "--offload_text_encoder: the text encoder trains with --train_text_encoder, so it "
            "cannot wait on the CPU"
        )
    if cfg.text_encoder_learning_rate is None:
        cfg.text_encoder_learning_rate = cfg.stage(STAGE).learning_rate
    if cfg.text_encoder_learning_rate <= 0:
        raise ConfigError("--text_encoder_learning_rate: must be > 0")


def trains_text_encoder(cfg: RunConfig, stage: int) -> bool:
    """Does this stage train the text encoder?"""
    return bool(cfg.train_text_encoder) and stage == STAGE


def text_encoder_identity(cfg: RunConfig) -> dict:
    """What text-encoder training adds to a stage's fingerprint ({} when off)."""
    if not cfg.train_text_encoder:
        return {}
    return {"text_encoder": {"trained": True, "lr": cfg.text_encoder_learning_rate}}


def unfreeze_text_encoder(trainer, stage: int, params, optimizer) -> list[torch.nn.Parameter]:
    """In the stage that trains it: every text-encoder weight becomes trainable, joins
    params.named as text_encoder.<name> and the optimiser as its own group; [] otherwise."""
    cfg = trainer.cfg
    if not trains_text_encoder(cfg, stage):
        return []
    te = trainer.text_encoder
    te.to(trainer.device, torch.float32)  # fp32 master weights: a bf16 step at 5e-6 rounds away
    te.train()  # as the example does; CLIP's text model has no dropout, so no number changes
    named = {PREFIX + n: p for n, p in te.named_parameters()}
    for p in named.values():
        p.requires_grad_(True)
    params.named.update(named)
    lr = cfg.text_encoder_learning_rate
    optimizer.add_param_group({"params": list(named.values()), "lr": lr})
    trainer.validation_embeds = None  # features from before training would go stale
    if trainer.prior is not None:  # the class prompt is encoded every step now
        trainer.prior.input_ids = trainer.prior.input_ids.to(trainer.device)
        trainer.prior.text = None
    return list(named.values())


def sync_text_encoder_grads(params, world: int, bucket: int = 2**24) -> None:
    """Average the text encoder's gradients over processes, at the optimiser step only.

    DDP wraps the U-Net alone: the text encoder runs twice per micro-step (instance and
    class prompt), which one DDP forward per backward does not allow, and gradient
    accumulation needs one reduction per step anyway. Flat buckets of `bucket` elements
    bound the extra memory.
    """
    if world == 1:
        return
    ps = [p for n, p in params.named.items() if n.startswith(PREFIX)]
    if not ps:
        return
    for p in ps:
        if p.grad is None:  # every process must send the same tensors
            p.grad = torch.zeros_like(p)
    chunk: list[torch.Tensor] = []
    for i, p in enumerate(ps):
        chunk.append(p.grad)
        if i == len(ps) - 1 or sum(g.numel() for g in chunk) + ps[i + 1].numel() > bucket:
            flat = torch.cat([g.reshape(-1) for g in chunk])
            torch.distributed.all_reduce(flat)
            flat.div_(world)
            for g, part in zip(chunk, flat.split([g.numel() for g in chunk])):
                g.copy_(part.view_as(g))
            chunk = []
