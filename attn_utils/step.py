"""The math of one training micro-step, shared by the trainer and the benchmark."""

from __future__ import annotations

import torch

from .capture import TokenStats
from .losses import attention_reg_loss, denoising_loss


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Scaled latents (B, 4, h, w) in fp32 from images (B, 3, H, W) in [-1, 1]."""
    pixels = pixels.to(vae.device, vae.dtype, non_blocking=True)
    dist = vae.encode(pixels).latent_dist
    return dist.sample(generator=gen).float() * vae.config.scaling_factor


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """(denoising MSE, attention regulariser) for one micro-batch; `unet` runs under capture.

    latents (B, 4, h, w); text (1 or B, 77, D), broadcast over the batch; timesteps uniform
    in [0, num_train_timesteps); target epsilon or velocity as the scheduler is configured.
    """
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
    stats.reset()
    pred = unet(noisy, t, text.expand(b, -1, -1)).sample
    mse = denoising_loss(pred, target)
    reg = attention_reg_loss(list(stats.stats.values()), k, reg_mean_weight, reg_var_weight)
    return mse, reg
