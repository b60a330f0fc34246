"""One training micro-step and the augmentation against plain references."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from test_math import tiny_unet

from attn_utils.method.capture import TokenStats, capture_cross_attention
from attn_utils.method.step import denoise_losses
from attn_utils.train.data import augment


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_denoise_losses_matches_plain_reference(prediction_type):
    sched = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
    )
    unet = tiny_unet()
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    text = torch.randn(1, 77, 16, generator=torch.Generator().manual_seed(4))
    stats = TokenStats()
    stats.columns = torch.tensor([[5, 6]])
    with torch.no_grad(), capture_cross_attention(unet, stats):
        mse, reg = denoise_losses(
            unet, sched, latents, text, torch.Generator().manual_seed(9), stats, 1, 2.0, 5.0
        )
    g = torch.Generator().manual_seed(9)  # the same draws, in the same order
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (3,), generator=g)
    noisy = sched.add_noise(latents, noise, t)
    target = sched.get_velocity(latents, noise, t) if prediction_type == "v_prediction" else noise
    with torch.no_grad():
        pred = unet(noisy, t, text.expand(3, -1, -1)).sample
    torch.testing.assert_close(mse, F.mse_loss(pred, target), rtol=1e-5, atol=1e-7)
    assert reg.item() >= 0 and len(stats.stats) == 4


def test_timesteps_are_uniform_over_the_schedule():
    sched = DDPMScheduler(num_train_timesteps=1000)
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x, t, ehs):
            seen.append(t)
            return type("Out", (), {"sample": x})()

    stats = TokenStats()
    stats.stats = {"l": (torch.zeros(64, 2), torch.zeros(64, 2))}
    stats.reset = lambda: None
    latents = torch.zeros(64, 4, 2, 2)
    for i in range(50):
        denoise_losses(
            Probe(),
            sched,
            latents,
            torch.zeros(1, 77, 8),
            torch.Generator().manual_seed(i),
            stats,
            1,
            0.0,
            0.0,
        )
    t = torch.cat(seen)
    assert t.min() >= 0 and t.max() <= 999
    assert t.min() < 20 and t.max() > 980  # both ends reached
    assert abs(t.float().mean().item() - 499.5) < 15  # 3200 draws: sd of the mean ~5


def test_augmentation_follows_the_original_recipe(monkeypatch):
    img = Image.new("RGB", (40, 24), (200, 10, 10))
    calls = {"rotate": [], "flip": 0}
    real_rotate, real_transpose = Image.Image.rotate, Image.Image.transpose

    def rotate(self, angle, *a, **kw):
        calls["rotate"].append((angle, kw.get("expand"), kw.get("resample")))
        return real_rotate(self, angle, *a, **kw)

    def transpose(self, method):
        calls["flip"] += method == Image.FLIP_LEFT_RIGHT
        return real_transpose(self, method)

    monkeypatch.setattr(Image.Image, "rotate", rotate)
    monkeypatch.setattr(Image.Image, "transpose", transpose)
    n = 2000
    for i in range(n):
        x = augment(img, 16, False, random.Random(i))
        assert x.shape == (3, 16, 16) and x.min() >= -1 and x.max() <= 1
    angles = [a for a, _, _ in calls["rotate"]]
    assert abs(len(angles) / n - 0.75) < 0.04
    assert abs(calls["flip"] / n - 0.25) < 0.04
    assert all(-45 <= a <= 45 for a in angles) and min(angles) < -40 and max(angles) > 40
    assert all(e is True and r == Image.NEAREST for _, e, r in calls["rotate"])


def test_center_crop_is_deterministic_and_random_crop_is_not():
    import numpy as np

    pixels = np.random.default_rng(0).integers(0, 255, (32, 64, 3), dtype=np.uint8)
    img = Image.fromarray(pixels)
    a = [augment(img, 16, True, random.Random(s)) for s in range(30)]
    b = [augment(img, 16, False, random.Random(s)) for s in range(30)]
    plain = [x for x in a if torch.equal(x, a[0])]
    assert len(plain) > 1  # unrotated, unflipped centre crops coincide
    assert len({tuple(x.flatten().tolist()) for x in b}) > len(
        {tuple(x.flatten().tolist()) for x in a}
    )
