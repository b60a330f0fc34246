"""The VAE's precision: float32 where its config says float16 overflows it (force_upcast).

SDXL's VAE overflows float16 (activations past 65504: NaN latents, black images), and its
config says `force_upcast: true`; diffusers' SDXL pipeline decodes in float32 whenever the VAE
is float16, and its SDXL training examples keep the VAE in float32. Here the flag is honoured
the same way wherever the VAE runs: under a float16 run (autocast or float16 weights) a
force_upcast VAE encodes and decodes in float32 with autocast off. bfloat16 has float32's range:
nothing changes under it. AutoencoderKL's default is force_upcast=True, so the VAEs of SD 1.x
and 2.x, whose configs predate the key, run in float32 under float16 too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


def keeps_fp32(vae, dtype: torch.dtype | None) -> bool:
    """Must this VAE run in float32 where the run computes in `dtype` (None: float32)?"""
    return dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))


def vae_weight_dtype(vae, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype to keep the VAE's weights in for a run computing in `dtype`."""
    return torch.float32 if dtype is None or keeps_fp32(vae, dtype) else dtype


@contextlib.contextmanager
def vae_precision(vae) -> Iterator[torch.dtype]:
    """Context for one VAE call; yields the dtype its input must have.

    Where float16 would overflow this VAE (the ambient autocast or its weights are float16 and
    its config says force_upcast), autocast is off inside and float16 weights are upcast for the
    call and restored after, as diffusers' SDXL pipeline does; elsewhere nothing changes.
    """
    kind = vae.device.type
    ambient = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    if not keeps_fp32(vae, torch.float16 if vae.dtype == torch.float16 else ambient):
        yield vae.dtype
        return
    was = vae.dtype
    if was != torch.float32:
        vae.to(torch.float32)
    try:
        with torch.autocast(kind, enabled=False):
            yield torch.float32
    finally:
        if was != torch.float32:
            vae.to(was)


def vae_encode(vae, pixels: torch.Tensor):
    """The posterior (latent_dist) of images (B, 3, H, W) in [-1, 1], force_upcast honoured."""
    with vae_precision(vae) as dtype:
        return vae.encode(pixels.to(vae.device, dtype, non_blocking=True)).latent_dist


def vae_decode(
    vae, latents: torch.Tensor, mean: torch.Tensor | None = None, std: torch.Tensor | None = None
) -> torch.Tensor:
    """Images (B, 3, H, W) in about [-1, 1] from scaled latents (B, C, h, w), force_upcast
    honoured: latents / scaling_factor, or with a per-channel mean and std (1, C, 1, 1)
    latents * std / scaling_factor + mean; unscaled in the dtype the VAE runs in."""
    with vae_precision(vae) as dtype:
        z = latents.to(vae.device, dtype)
        sf = vae.config.scaling_factor
        z = z / sf if mean is None else z * std.to(z) / sf + mean.to(z)
        return vae.decode(z).sample
