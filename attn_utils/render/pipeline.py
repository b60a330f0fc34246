"""Inference pipelines from modules already in memory, and the device to run them on."""

from __future__ import annotations

import torch

from attn_utils.config import ConfigError, first_line
from attn_utils.method.vae import vae_decode

# --dtype spellings, each to one of auto | fp32 | fp16 | bf16
DTYPES = {"auto": "auto", "fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16"}
DTYPES |= {"bf16": "bf16", "bfloat16": "bf16"}


def is_sdxl_unet(unet) -> bool:
    """Is this SDXL's U-Net (conditioned on pooled text and time ids)?"""
    return getattr(unet.config, "addition_embed_type", None) == "text_time"


def make_pipeline(tokenizer, text_encoder, vae, unet, scheduler_config, scheduler: str = "dpm"):
    """A StableDiffusionPipeline (StableDiffusionXLPipeline for an SDXL U-Net; text_encoder
    is then attn_utils.sdxl.SDXLTextEncoders, or None) around modules already in memory."""
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )

    cls = {
        "dpm": DPMSolverMultistepScheduler,
        "ddim": DDIMScheduler,
        "euler": EulerDiscreteScheduler,
        "ddpm": DDPMScheduler,
        "pndm": PNDMScheduler,
    }[scheduler]
    if is_sdxl_unet(unet):
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=None if text_encoder is None else text_encoder.text_encoder,
            text_encoder_2=None if text_encoder is None else text_encoder.text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=None if text_encoder is None else text_encoder.tokenizer_2,
            unet=unet,
            scheduler=cls.from_config(scheduler_config),
            add_watermarker=False,  # the invisible-watermark package is not a dependency
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe
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


def sample_images(pipe, **kwargs) -> list:
    """PIL images from pipe(**kwargs), decoded by decode_images (force_upcast honoured)."""
    return decode_images(pipe, pipe(**kwargs, output_type="latent").images)


def decode_images(pipe, latents: torch.Tensor) -> list:
    """PIL images from the pipeline's final latents (B, C, h, w), as its own decode would make
    them, but in float32 with autocast off where the VAE's config says float16 overflows it:
    the pipelines' decode runs under the caller's autocast (attn_utils/method/vae.py)."""
    vae, mean, std = pipe.vae, None, None
    stats = [getattr(vae.config, k, None) for k in ("latents_mean", "latents_std")]
    if is_sdxl_unet(pipe.unet) and None not in stats:  # SD's pipeline ignores them
        mean, std = (torch.tensor(v, device=latents.device).view(1, -1, 1, 1) for v in stats)
    image = vae_decode(vae, latents, mean, std)  # (B, 3, H, W)
    return pipe.image_processor.postprocess(image, output_type="pil")


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
