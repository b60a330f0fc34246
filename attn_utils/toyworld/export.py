"""The pretraining's export: diffusers / transformers folders under --out and manifest.json,
and `verify`, which checks shipped folders against it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from attn_utils.model_defaults import MODEL_DEFAULTS
from attn_utils.models import SHIPPED_KIND, SHIPPED_MANIFEST, file_sha256, verify_shipped
from attn_utils.runfiles import write_dir_atomically
from attn_utils.tiny import SD_SCHEDULER
from attn_utils.toyworld.report import MEASURED_WITH

# Each writer takes the Pretrainer (attn_utils/toyworld/pretrain.py, which imports this module)
# and the folder to fill.

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def _fresh_tokenizer(p):
    """A tokenizer object no phase has used: a fast tokenizer keeps its last call's padding
    in its saved tokenizer.json, which would make the export depend on which phases ran in
    this process."""
    from attn_utils.toyworld.world import build_tokenizer

    return build_tokenizer(p.work / "tokenizer")


def _write_base(p, dest: Path) -> None:
    import diffusers
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    scale = float(np.load(p.work / "latents.npz", allow_pickle=False)["scale"])
    vae = AutoencoderKL.from_pretrained(str(p.work / "vae"))
    vae.register_to_config(scaling_factor=scale)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(str(p.work / "text_encoder_short")),
        tokenizer=_fresh_tokenizer(p),
        unet=UNet2DConditionModel.from_pretrained(str(p.work / "unet_short")),
        scheduler=diffusers.DDPMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(dest), safe_serialization=True)
    for config in dest.glob("*/config.json"):  # where it was built: a path of this machine
        data = json.loads(config.read_text())
        if data.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    (dest / MODEL_DEFAULTS).write_text(json.dumps(base_defaults(), indent=2) + "\n")


def base_defaults() -> dict:
    """base/attndreambooth_defaults.json: the render settings the report measured the model
    with, and the metric models shipped beside it (attn_utils.model_defaults)."""
    return {
        "what": "inference.py and evaluate.py use these when their flags are not given "
        "(docs/toyworld.md)",
        "render": MEASURED_WITH,
        "metric_models": {
            "clip_model": "../clip",
            "dino_model": "../dino",
            "oracle_model": "../oracle",
        },
    }


def _write_clip(p, dest: Path) -> None:
    from transformers import CLIPModel

    CLIPModel.from_pretrained(str(p.work / "clip_short")).save_pretrained(str(dest))
    _fresh_tokenizer(p).save_pretrained(str(dest))
    size = {"shortest_edge": 64}
    processor = {
        "image_processor_type": "CLIPImageProcessor",
        "size": size,
        "crop_size": {"height": 64, "width": 64},
        "do_resize": True,
        "do_center_crop": True,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
    }
    (dest / "preprocessor_config.json").write_text(json.dumps(processor, indent=2) + "\n")


def _write_dino(p, dest: Path) -> None:
    from transformers import CLIPModel, CLIPVisionModel

    clip = CLIPModel.from_pretrained(str(p.work / "clip_short"))
    vision = CLIPVisionModel(clip.config.vision_config)
    # transformers 5 flattens CLIPVisionModel; 4 nests it under .vision_model.
    target = getattr(vision, "vision_model", vision)
    target.load_state_dict(clip.vision_model.state_dict())
    vision.save_pretrained(str(dest))


def _write_oracle(p, dest: Path) -> None:
    from attn_utils.evaluate.oracle import Oracle

    Oracle.load(p.work / "oracle").save(dest)


def git_commit() -> str:
    """The repository's HEAD commit, or "unknown" outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, timeout=10
        )
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def export(p) -> None:
    """Write base/, clip/, dino/, oracle/ and manifest.json under p.out (all or nothing)."""
    writers = {
        "base": _write_base,
        "clip": _write_clip,
        "dino": _write_dino,
        "oracle": _write_oracle,
    }

    def write(tmp: Path) -> None:
        for part, writer in writers.items():
            (tmp / part).mkdir()
            writer(p, tmp / part)
        files = {
            str(f.relative_to(tmp)): file_sha256(f) for f in sorted(tmp.rglob("*")) if f.is_file()
        }
        manifest = {
            "kind": SHIPPED_KIND,
            "what": "the toy world's pretrained models (docs/toyworld.md)",
            "command": " ".join(p.argv),
            "seed": p.seed,
            "commit": git_commit(),
            "budget": p.budget.__dict__,
            "phase_seconds": {k: round(v, 1) for k, v in p.times.items()},
            "files": files,
        }
        (tmp / SHIPPED_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

    write_dir_atomically(p.out, write)


def verify(out: Path) -> None:
    """Check every part under out against out/manifest.json; exit 1 with one line if not."""
    from attn_utils.config import ConfigError

    if not (out / SHIPPED_MANIFEST).is_file():
        sys.exit(f"error: {out / SHIPPED_MANIFEST} does not exist")
    try:
        verify_shipped(out, "--out")
    except ConfigError as e:
        sys.exit(f"error: {e}")
    n = len(json.loads((out / SHIPPED_MANIFEST).read_text())["files"])
    print(f"{out}: all {n} files match {SHIPPED_MANIFEST}")
