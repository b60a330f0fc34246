"""Inference pipelines from modules already in memory, and the device to run them on."""

from __future__ import annotations

import torch

from attn_utils.config import ConfigError, first_line

# --dtype spellings, each to one of auto | fp32 | fp16 | bf16
DTYPES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}
DTYPES |= {"bf16": "bf16", "bfloat16": "bf16"}


def make_pipeline(tokenizer, text_encoder, vae, unet, scheduler_config, scheduler: str = "dpm"):
    """A StableDiffusionPipeline around modules already in memory (nothing reloaded)."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
    )

    cls = {
        "dpm": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "ddpm": DDPMScheduler,
        "pndm": PNDMScheduler,
    }[scheduler]
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=cls.from_config(scheduler_config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pick_device(name: str, dtype: str):
    """(torch device, torch dtype) from --device and --dtype."""

    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    try:
        device = torch.device(name)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        raise ConfigError(f"--device {name}: not usable here ({first_line(e)})") from None
    dt = DTYPES[dtype.lower()]
    if dt == "auto":
        dt = "fp16" if device.type == "cuda" else "fp32"
    return device, {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dt]
