"""Training data: the original's augmentation, the instance dataset, resumable sampling."""

from __future__ import annotations

import hashlib
import logging
import random
from functools import lru_cache

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler

log = logging.getLogger(__name__)


def _seed(*parts: int | str) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def augment(
    img: Image.Image, resolution: int, center_crop: bool, rng: random.Random,
    flip_p: float = 0.25, rotate_p: float = 0.75, rotate_degrees: float = 45.0,
    crop: str = "random",
):  # fmt: skip
    """The original's augmentation by default; returns a (3, R, R) tensor in [-1, 1].

    crop: "random" (the original's, and DreamBooth's) or "center" (also `center_crop`) after
    resizing the shorter side to R; "resize" squashes the whole image to R x R, bicubic (the
    textual_inversion example's).
    """
    return augment_with_crop(img, resolution, center_crop, rng, flip_p, rotate_p,
                             rotate_degrees, crop)[0]  # fmt: skip


def augment_with_crop(
    img: Image.Image, resolution: int, center_crop: bool, rng: random.Random,
    flip_p: float = 0.25, rotate_p: float = 0.75, rotate_degrees: float = 45.0,
    crop: str = "random",
) -> tuple[torch.Tensor, tuple[int, int, int, int]]:  # fmt: skip
    """augment(), and what SDXL's micro-conditioning needs of it: (original h, original w,
    crop top, crop left). The original size is the image that was resized (the photo, or its
    rotated canvas); the crop is where the R x R window lay in the resized (and flipped)
    image, (0, 0) when the whole image is squashed. Same random draws as augment()."""
    if rng.random() < rotate_p:  # RandomRotation(d, expand=True), nearest, black fill
        angle = rng.uniform(-rotate_degrees, rotate_degrees)
        img = img.rotate(angle, resample=Image.NEAREST, expand=True)
    w, h = img.size
    original = (h, w)
    left = top = 0
    if crop == "resize":  # the whole image, squashed
        size = (resolution, resolution)
    elif w <= h:  # Resize(R): the shorter side to R
        size = (resolution, max(resolution, int(resolution * h / w)))
    else:
        size = (max(resolution, int(resolution * w / h)), resolution)
    img = img.resize(size, resample=Image.BICUBIC if crop == "resize" else Image.BILINEAR)
    if rng.random() < flip_p:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    if crop != "resize":
        w, h = img.size
        if center_crop or crop == "center":
            left, top = (w - resolution) // 2, (h - resolution) // 2
        else:
            left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
        img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div(127.5).sub(1.0), (*original, top, left)  # (3, R, R)


class InstanceDataset(Dataset):
    """Item g is the g-th sample of the stage: epoch order and augmentation derive from g.

    Nothing depends on iteration history, so a resumed stage sees exactly the same samples.
    """

    def __init__(self, images, resolution: int, center_crop: bool, repeats: int, seed: int,
                 stage: int, flip_p: float = 0.25, rotate_p: float = 0.75,
                 rotate_degrees: float = 45.0, crop: str = "random",
                 time_ids: bool = False):  # fmt: skip
        self.images = images
        self.time_ids = time_ids  # SDXL: items are {"pixels", "time_ids" (6,)}
        self.flip_p, self.rotate_p, self.rotate_degrees = flip_p, rotate_p, rotate_degrees
        self.crop = crop
        self.resolution = resolution
        self.center_crop = center_crop
        self.epoch_len = len(images) * repeats
        self.seed = seed
        self.stage = stage

    def __len__(self) -> int:
        return self.epoch_len

    @lru_cache(maxsize=4)  # noqa: B019 - a few epochs' permutations per dataset
    def _order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_seed(self.seed, self.stage, "epoch", epoch)).permutation(
            self.epoch_len
        )

    def __getitem__(self, g: int) -> torch.Tensor:
        item = int(self._order(g // self.epoch_len)[g % self.epoch_len])
        rng = random.Random(_seed(self.seed, self.stage, "aug", g))
        img = self.images[item % len(self.images)]
        pixels, (oh, ow, top, left) = augment_with_crop(
            img, self.resolution, self.center_crop, rng, self.flip_p, self.rotate_p,
            self.rotate_degrees, self.crop,
        )  # fmt: skip
        if not self.time_ids:
            return pixels
        r = self.resolution
        # on the host, as the pixels: the loader pins and moves both
        ids = torch.tensor([oh, ow, top, left, r, r], dtype=torch.float32, device="cpu")
        return {"pixels": pixels, "time_ids": ids}


class StepBatches(Sampler):
    """Batches of global sample numbers for micro-steps start..stop-1 of one process."""

    def __init__(self, batch_size: int, start: int, stop: int, rank: int, world: int):
        self.batch_size, self.start, self.stop = batch_size, start, stop
        self.rank, self.world = rank, world

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __iter__(self):
        b = self.batch_size
        for m in range(self.start, self.stop):
            first = (m * self.world + self.rank) * b
            yield list(range(first, first + b))


def step_seed(seed: int, stage: int, micro_step: int, rank: int) -> int:
    """Seed for the noise, timesteps and VAE sample of one micro-step of one process."""
    return _seed(seed, stage, "noise", micro_step, rank)
