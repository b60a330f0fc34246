"""Image files: checked loading of a folder of photos, and their fingerprint.

The base of training (instance and class images) and of evaluation (real photos, samples).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from attn_utils.config import ConfigError

log = logging.getLogger(__name__)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
IGNORED_NAMES = {".ds_store", "thumbs.db", "desktop.ini"}


def shown(path: Path) -> str:
    """A path for messages: undecodable bytes in a file name become \\xNN, never an error."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def readable_suffixes() -> set[str]:
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
    suffixes = readable_suffixes()
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
