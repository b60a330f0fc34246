"""Opt-in pool of pre-encoded augmented latents (--cache_latents).

Off by default: a finite pool of augmentations is a different data distribution from the
original's fresh augmentation every step. It removes the VAE encoder (about 1.1 TFLOP per
512 px image) from every training step.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

from attn_utils.method.vae import vae_encode
from attn_utils.train.data import _seed, augment_with_crop


class LatentPool:
    """Mean and std of the VAE posterior for `variants` augmentations of every image."""

    def __init__(
        self,
        images,
        vae,
        resolution: int,
        center_crop: bool,
        variants: int,
        seed: int,
        device,
        batch_size: int = 8,
        flip_p: float = 0.25,
        rotate_p: float = 0.75,
        rotate_degrees: float = 45.0,
        crop: str = "random",
    ) -> None:
        self.augmentation = dict(flip_p=flip_p, rotate_p=rotate_p, rotate_degrees=rotate_degrees,
                                 crop=crop)  # fmt: skip
        samples = [
            augment_with_crop(
                img,
                resolution,
                center_crop,
                random.Random(_seed(seed, "pool", i, v)),
                flip_p,
                rotate_p,
                rotate_degrees,
                crop,
            )  # fmt: skip
            for v in range(variants)
            for i, img in enumerate(images)
        ]
        pixels = [p for p, _ in samples]
        # SDXL's time ids of each entry: original size, crop, target size (P, 6)
        self.time_ids = torch.tensor(
            [[*crop, resolution, resolution] for _, crop in samples], dtype=torch.float32,
            device=device,
        )  # fmt: skip
        means, stds = [], []
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                dist = vae_encode(vae, torch.stack(pixels[start : start + batch_size]))
                means.append(dist.mean.float())
                stds.append(dist.std.float())
        self.mean = torch.cat(means)  # (P, 4, h, w)
        self.std = torch.cat(stds)
        self.seed = seed

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, idx: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Unscaled latents for pool entries idx (B,), sampled like latent_dist.sample()."""
        idx = idx.to(self.mean.device, non_blocking=True)  # pinned by the loader: no sync
        eps = torch.randn(self.mean[idx].shape, generator=generator, device=self.mean.device)
        return self.mean[idx] + self.std[idx] * eps


class PoolIndices(Dataset):
    """Item g -> a pool entry, derived from the global sample number (resumable)."""

    def __init__(self, pool_size: int, seed: int, stage: int) -> None:
        self.pool_size, self.seed, self.stage = pool_size, seed, stage

    def __len__(self) -> int:
        return self.pool_size

    def __getitem__(self, g: int) -> int:
        return _seed(self.seed, self.stage, "pool-pick", g) % self.pool_size
