"""Load the base model's parts: local folders offline, Hub ids only from cache or network."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from .config import ConfigError


@dataclass
class BaseModel:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object


def _load_kwargs(name_or_path: str, revision: str | None, local_files_only: bool) -> dict:
    local = Path(name_or_path).is_dir()
    offline = local or local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    return {"revision": None if local else revision, "local_files_only": offline}


def check_model_source(name_or_path: str) -> None:
    """Fail early on a path-like argument that does not exist (no Hub lookup for it)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"--pretrained_model_name_or_path: {name_or_path} is not a folder")


def load_base_model(
    name_or_path: str,
    revision: str | None = None,
    local_files_only: bool = False,
    unet_path: str | Path | None = None,
) -> BaseModel:
    """Tokenizer, text encoder, VAE, U-Net and DDPM scheduler; one clear error if unreachable.

    The VAE is always the model's own `vae/` subfolder: no Hub API call decides that.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_model_source(name_or_path)
    kw = _load_kwargs(name_or_path, revision, local_files_only)
    try:
        tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **kw)
        text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kw)
        vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **kw)
        if unet_path is not None:
            unet = UNet2DConditionModel.from_pretrained(unet_path, local_files_only=True)
        else:
            unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kw)
        sched = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = (
            "not found in the local cache and the Hub was not contacted"
            if kw["local_files_only"]
            else "not a local diffusers folder and the Hub could not provide it"
        )
        raise ConfigError(
            f"--pretrained_model_name_or_path: cannot load {name_or_path!r}: {hint} ({first})"
        ) from None
    for m in (text_encoder, vae, unet):  # frozen unless a stage unfreezes its own part
        m.requires_grad_(False)
    return BaseModel(tokenizer, text_encoder, vae, unet, sched)


def model_fingerprint(name_or_path: str, revision: str | None) -> str:
    """Identity of the base model: the id and revision, or a local folder's config files."""
    h = hashlib.sha256(f"{name_or_path}@{revision}".encode())
    root = Path(name_or_path)
    if root.is_dir():
        for p in sorted(root.rglob("*.json")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        for p in sorted(root.rglob("*.safetensors")):  # size only: hashing GBs is too slow
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    return h.hexdigest()


def library_versions() -> dict:
    import accelerate
    import diffusers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read JSON ({e})") from None
