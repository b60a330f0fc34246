"""Instance images: checked loading, the original's augmentation, resumable sampling."""

from __future__ import annotations

import hashlib
import logging
import os
import random
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset, Sampler

from .config import ConfigError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


def shown(path: Path) -> str:
    """A path for messages: undecodable bytes in a file name become \\xNN, never an error."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _readable_suffixes() -> set[str]:
    """Our list plus every extension of a format this Pillow build can open."""
    Image.init()
    return IMAGE_SUFFIXES | {
        e for e, fmt in Image.registered_extensions().items() if fmt in Image.OPEN
    }


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB; transparency is composited on white."""
    if img.mode.startswith("I;16"):  # 16-bit files: the full range is 0..65535
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr / 65535.0 * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "I":  # 32-bit integers: 16-bit data when above 8-bit range
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = img.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, rgba)
    return img.convert("RGB")


def load_image(path: Path) -> Image.Image:
    """Open, fully decode, apply EXIF orientation, convert to RGB; raise ValueError if unusable."""
    if path.stat().st_size == 0:
        raise ValueError("empty file (0 bytes)")
    # Some libraries switch this on globally; a truncated photo must still be refused.
    lenient, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated files fail here, not mid-training
            try:
                im = ImageOps.exif_transpose(im)
            except Exception as e:  # noqa: BLE001 - a broken EXIF block should not cost the photo
                log.warning("%s: EXIF orientation unreadable (%s); used as stored", shown(path), e)
            return _to_rgb(im)
    except UnidentifiedImageError:
        raise ValueError("not an image PIL can read") from None
    except Exception as e:  # noqa: BLE001 - decoders raise many types on corrupt data
        raise ValueError(f"cannot decode ({type(e).__name__}: {e})") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = lenient


def load_instance_images(
    folder: str | Path, resolution: int, skip_bad: bool = False
) -> tuple[list[Image.Image], list[Path]]:
    """Load every image of a concept folder; one line per bad file, or skip them if asked."""
    root = Path(folder)
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a folder"
        raise ConfigError(f"--instance_data_dir: {shown(root)} {what}")
    try:
        files = sorted(
            p for p in root.iterdir()
            if p.is_file() and not p.name.startswith(".") and p.name.lower() not in IGNORED_NAMES
        )  # fmt: skip
    except OSError as e:
        raise ConfigError(
            f"--instance_data_dir: cannot list {shown(root)} ({e.strerror})"
        ) from None
    suffixes = _readable_suffixes()
    images, used, bad = [], [], []
    for p in files:
        if p.suffix.lower() not in suffixes:
            suffix = shown(Path(p.suffix)) if p.suffix else "none"
            bad.append(f"{shown(p)}: not an image file (suffix {suffix})")
            continue
        try:
            img = load_image(p)
        except (ValueError, OSError) as e:
            bad.append(f"{shown(p)}: {str(e).encode('utf-8', 'backslashreplace').decode()}")
            continue
        if min(img.size) < resolution:
            log.warning("%s: %dx%d is smaller than --resolution %d; it will be upscaled",
                        shown(p), img.size[0], img.size[1], resolution)  # fmt: skip
        images.append(img)
        used.append(p)
    if bad and not skip_bad:
        raise ConfigError(
            f"--instance_data_dir: {len(bad)} unusable file(s) (pass --skip_bad_images to "
            "drop them):\n" + "\n".join(bad)
        )
    for line in bad:
        log.warning("--skip_bad_images: skipping %s", line)
    if not images:
        raise ConfigError(f"--instance_data_dir: no usable images in {shown(root)}")
    return images, used


def data_fingerprint(paths: list[Path]) -> str:
    """Hash of the instance files' names and bytes."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(p.name))  # any file name, even one that is not valid UTF-8
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _seed(*parts: int | str) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def augment(
    img: Image.Image, resolution: int, center_crop: bool, rng: random.Random, flip_p: float = 0.25
):
    """The original's augmentation; returns a (3, R, R) tensor in [-1, 1]."""
    if rng.random() < 0.75:  # RandomRotation(45, expand=True), nearest, black fill
        img = img.rotate(rng.uniform(-45.0, 45.0), resample=Image.NEAREST, expand=True)
    w, h = img.size  # Resize(R): the shorter side to R, bilinear
    if w <= h:
        size = (resolution, max(resolution, int(resolution * h / w)))
    else:
        size = (max(resolution, int(resolution * w / h)), resolution)
    img = img.resize(size, resample=Image.BILINEAR)
    if rng.random() < flip_p:
        img = img.transpose(Image.FLIP_LEFT_RIGHT)
    w, h = img.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = rng.randint(0, w - resolution), rng.randint(0, h - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return arr.float().div(127.5).sub(1.0)  # (3, R, R)


class InstanceDataset(Dataset):
    """Item g is the g-th sample of the stage: epoch order and augmentation derive from g.

    Nothing depends on iteration history, so a resumed stage sees exactly the same samples.
    """

    def __init__(self, images, resolution: int, center_crop: bool, repeats: int, seed: int,
                 stage: int, flip_p: float = 0.25):  # fmt: skip
        self.images = images
        self.flip_p = flip_p
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
        return augment(img, self.resolution, self.center_crop, rng, self.flip_p)


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
