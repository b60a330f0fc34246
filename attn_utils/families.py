"""Which Stable Diffusion family a base model is (sd1, sd2, sdxl), read before any load.

The family decides defaults (docs/sdxl.md) and how the model is loaded and conditioned. It
comes from the model's own files: model_index.json's pipeline class, then the text encoder's
width (768: SD 1.x, 1024: SD 2.x). A Hub id is read from the local cache the same way; an
uncached id is told by its name (".../stable-diffusion-xl-...", "...-2-1...", "...v1-5...").
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from attn_utils.config import ConfigError

FAMILIES = ("sd1", "sd2", "sdxl")
FLAG = "--pretrained_model_name_or_path"
SDXL_PIPELINES = {"StableDiffusionXLPipeline"}
REFINER_PIPELINES = {"StableDiffusionXLImg2ImgPipeline", "StableDiffusionXLInpaintPipeline"}
# Subfolders an SDXL pipeline needs beyond SD's (the refiner lacks the first encoder).
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")


def _read(path: Path | None) -> dict | None:
    if path is None or not Path(path).is_file():
        return None
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def _cached(name: str, file: str, revision: str | None) -> Path | None:
    try:
        from huggingface_hub import try_to_load_from_cache

        hit = try_to_load_from_cache(name, file, revision=revision)
    except (ValueError, ImportError):
        return None
    return Path(hit) if isinstance(hit, str) else None


def _by_name(name: str) -> str:
    n = name.lower()
    if re.search(r"(^|[-_/])(sdxl|xl)([-_/]|$)|stable-diffusion-xl", n):
        return "sdxl"
    if re.search(r"stable-diffusion-2|(^|[-_/])sd-?2", n):
        return "sd2"
    if re.search(r"v1-[0-9]|stable-diffusion-v1|(^|[-_/])sd-?1", n):
        return "sd1"
    return "sd2"  # the paper's family: SD defaults, which is what an unknown SD id gets


def detect_family(name_or_path: str, revision: str | None = None) -> str:
    """'sd1' | 'sd2' | 'sdxl' of a local diffusers folder or a Hub id; a refiner, or an SDXL
    folder without its second text encoder or tokenizer, is one ConfigError naming it."""
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        index = _read(local / "model_index.json")
        text = _read(local / "text_encoder" / "config.json")
    else:
        index = _read(_cached(name_or_path, "model_index.json", revision))
        text = _read(_cached(name_or_path, "text_encoder/config.json", revision))
        if index is None:
            return _by_name(name_or_path)
    cls = (index or {}).get("_class_name", "")
    if cls in REFINER_PIPELINES:
        raise ConfigError(f"{FLAG}: {name_or_path} is an SDXL {cls}; a refiner is out of scope")
    if cls in SDXL_PIPELINES:
        if local.is_dir():
            for part in SDXL_PARTS:
                if not (local / part).is_dir() or not any((local / part).iterdir()):
                    raise ConfigError(
                        f"{FLAG}: {local / part} is missing: an SDXL model needs both text "
                        "encoders and both tokenizers"
                    )
        return "sdxl"
    width = (text or {}).get("hidden_size")
    if width == 768 or (text and text.get("hidden_act") == "quick_gelu"):
        return "sd1"
    return "sd2"
