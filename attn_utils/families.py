"""Which Stable Diffusion family a base model is (sd1, sd2, sdxl), and its native size.

The family decides defaults (docs/sdxl.md) and how the model is loaded and conditioned. It
comes from the model's own config files, read before any weight (attn_utils/models.py reads
them from a folder, the Hub cache or the Hub): model_index.json's pipeline class or its
text_encoder_2, the U-Net's "text_time" added conditioning (SDXL), then the text encoder's
width (768: SD 1.x, 1024: SD 2.x). The name is only a guess, for a --dry_run without files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from attn_utils.config import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl")
FLAG = "--pretrained_model_name_or_path"
SDXL_PIPELINES = {"StableDiffusionXLPipeline"}
REFINER_PIPELINES = {"StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
# Subfolders an SDXL pipeline needs beyond SD's (the refiner lacks the first encoder).
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
# The config files that tell the family and the native size: {key: path in the model}.
CONFIG_FILES = {
    "index": "model_index.json",
    "unet": "unet/config.json",
    "vae": "vae/config.json",
    "text": "text_encoder/config.json",
}


@dataclass(frozen=True)
class BaseFacts:
    """What the base model's config files say, before any weight loads."""

    family: str  # sd1 | sd2 | sdxl
    resolution: int | None  # the U-Net's native size in pixels; None: the family's default
    guess: str | None = None  # why the family was guessed from the name; None: read from files


def guess_family(name: str) -> str:
    """The family a model's name suggests (".../stable-diffusion-xl-...", "...-2-1...")."""
    n = name.lower()
    if re.search(r"(^|[-_/])(sdxl|xl)([-_/]|$)|stable-diffusion-xl", n):
        return "sdxl"
    if re.search(r"stable-diffusion-2|(^|[-_/])sd-?2", n):
        return "sd2"
    if re.search(r"v1-[0-9]|stable-diffusion-v1|(^|[-_/])sd-?1", n):
        return "sd1"
    return "sd2"  # the paper's family: SD defaults, which is what an unknown SD id gets


def native_resolution(unet: dict | None, vae: dict | None) -> int | None:
    """The U-Net's sample_size times the VAE's downsampling (2 ** (levels - 1)), in pixels."""
    size = (unet or {}).get("sample_size")
    levels = len((vae or {}).get("block_out_channels") or ())
    if isinstance(size, list) and len(set(size)) == 1:  # [h, w] of a square model
        size = size[0]
    if not isinstance(size, int) or size < 1 or levels < 1:
        return None
    return size * 2 ** (levels - 1)


def family_of(configs: dict[str, dict | None], where: str, folder: Path | None = None) -> str:
    """'sd1' | 'sd2' | 'sdxl' from CONFIG_FILES' contents (None: unread); a refiner, or an
    SDXL folder without its second text encoder or tokenizer, is one ConfigError naming it."""
    index, unet, text = (configs.get(k) or {} for k in ("index", "unet", "text"))
    cls = index.get("_class_name", "")
    if cls in REFINER_PIPELINES:
        raise ConfigError(f"{FLAG}: {where} is an SDXL {cls}; a refiner is out of scope")
    second = index.get("text_encoder_2")  # [library, class] in SDXL's index; null when absent
    if (
        cls in SDXL_PIPELINES
        or unet.get("addition_embed_type") == "text_time"
        or (isinstance(second, list) and second[0] is not None)
    ):
        for part in SDXL_PARTS if folder is not None else ():
            if not (folder / part).is_dir() or not any((folder / part).iterdir()):
                raise ConfigError(
                    f"{FLAG}: {folder / part} is missing: an SDXL model needs both text "
                    "encoders and both tokenizers"
                )
        return "sdxl"
    if text.get("hidden_size") == 768 or text.get("hidden_act") == "quick_gelu":
        return "sd1"
    return "sd2"
