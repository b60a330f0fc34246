"""The math of one training micro-step, shared by the trainer and the benchmark."""

from __future__ import annotations

import torch

from attn_utils.method.capture import TokenStats
from attn_utils.method.losses import attention_reg_loss, denoising_loss
from attn_utils.method.vae import vae_encode


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) in fp32 from images (B, 3, H, W) in [-1, 1]."""
    dist = vae_encode(vae, pixels)  # fp32 with autocast off where fp16 overflows the VAE
    return dist.sample(generator=gen).float() * vae.config.scaling_factor


def noisy_latents(
    scheduler, latents: torch.Tensor, gen: torch.Generator, noise_offset: float = 0.0,
    channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """(noisy latents, timesteps (B,), target) of one micro-batch: noise (with its offset),
    timesteps uniform in [0, num_train_timesteps), target epsilon or velocity as the
    scheduler is configured. The draws come from `gen` in this order."""
    b, device = latents.shape[0], latents.device
    noise = torch.randn(latents.shape, generator=gen, device=device)
    if noise_offset:
        noise = noise + noise_offset * torch.randn(
            (b, latents.shape[1], 1, 1), generator=gen, device=device
        )
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=gen, device=device)
    noisy = scheduler.add_noise(latents, noise, t)
    if scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, t)
    else:
        target = noise
    if channels_last:
        noisy = noisy.contiguous(memory_format=torch.channels_last)
    return noisy, t, target


def denoise_losses(
    unet,
    scheduler,
    latents: torch.Tensor,
    text: torch.Tensor,
    gen: torch.Generator,
    stats: TokenStats,
    k: int,
    reg_mean_weight: float,
    reg_var_weight: float,
    noise_offset: float = 0.0,
    channels_last: bool = False,
    n_instance: int | None = None,
    prior_loss_weight: float = 1.0,
    added_cond: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoising MSE, attention regulariser) for one micro-batch; `unet` runs under capture
    unless both regulariser weights are 0. `added_cond`: SDXL's added_cond_kwargs (pooled
    text (B, P) and time ids (B, 6)); None for SD.

    latents (B, 4, h, w); text (1 or B, 77, D), broadcast over the batch; timesteps uniform
    in [0, num_train_timesteps); target epsilon or velocity as the scheduler is configured.
    Prior preservation: the first n_instance samples are instance images, the rest class
    images; the MSE is instance MSE + prior_loss_weight x class MSE, and the regulariser
    sees the instance samples only (the class prompt has no placeholder).
    """
    b, device = latents.shape[0], latents.device
    noisy, t, target = noisy_latents(scheduler, latents, gen, noise_offset, channels_last)
    stats.reset()
    extra = {} if added_cond is None else {"added_cond_kwargs": added_cond}
    pred = unet(noisy, t, text.expand(b, -1, -1), **extra).sample
    if n_instance is None:
        mse = denoising_loss(pred, target)
    else:
        i = n_instance
        mse = denoising_loss(pred[:i], target[:i])
        mse = mse + prior_loss_weight * denoising_loss(pred[i:], target[i:])
    if not (reg_mean_weight or reg_var_weight):  # nothing captured: the regulariser is off
        return mse, torch.zeros((), device=device)
    layers = [(m[:n_instance], v[:n_instance]) for m, v in stats.stats.values()]
    return mse, attention_reg_loss(layers, k, reg_mean_weight, reg_var_weight)
