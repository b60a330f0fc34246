"""The demo's picture: the concept's photos, then per prompt the base model's renders of the
prompt with the category word alone and the learned concept's renders (inference.py's)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw

from attn_utils.evaluate.scoring import read_index
from attn_utils.images import load_instance_images
from attn_utils.render.renderer import initial_latents

CELL = 128  # each 64 px image is shown at twice its size
LABEL = 200  # width of the label column


def _row(sheet: Image.Image, y: int, label: str, images: list[Image.Image]) -> None:
    ImageDraw.Draw(sheet).multiline_text((6, y + 6), label, fill=(20, 20, 20), spacing=3)
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST),
                    (LABEL + i * CELL, y))  # fmt: skip


def _wrap(text: str, width: int = 30) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])


@torch.no_grad()
def base_renders(base: Path, prompts: list[str], n: int, seed: int, steps: int, guidance: float):
    """n images per prompt from the untouched base model (DPM-Solver, as inference.py)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    side = pipe.unet.config.sample_size
    size = side * pipe.vae_scale_factor
    # inference.py's starting noise for image i (seed + i): both rows start from the same noise
    latents = initial_latents(
        [seed + i for i in range(n)], (pipe.unet.config.in_channels, side, side)
    )
    out = []
    for prompt in prompts:
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        out.append(
            pipe([prompt] * n, num_inference_steps=steps, guidance_scale=guidance,
                 generator=gens, latents=latents.clone(), height=size, width=size).images
        )  # fmt: skip
    return out


def write_overview(models: Path, concept_dir: Path, images_dir: Path, category: str, out: Path):
    """Write the picture to out; return its path."""
    index, prompts = read_index(images_dir)
    settings = index.get("settings", {})
    n = min(len(p["files"]) for p in prompts)
    plain = [p["template"].replace("{}", category) for p in prompts]
    base = base_renders(
        models / "base", plain, n, int(settings.get("seed") or 0),
        int(settings.get("num_inference_steps", 25)), float(settings.get("guidance_scale", 4.0)),
    )  # fmt: skip
    photos = load_instance_images(concept_dir, 64)[0][:5]
    cols = max(n, len(photos))
    sheet = Image.new("RGB", (LABEL + cols * CELL, CELL * (1 + 2 * len(prompts))), "white")
    _row(sheet, 0, "the concept's photos", photos)
    for i, p in enumerate(prompts):
        y = CELL * (1 + 2 * i)
        _row(sheet, y, "base model:\n" + _wrap(plain[i]), base[i])
        learned = [Image.open(f) for f in p["files"][:n]]
        text = p["template"].replace("{}", f"[V] {category}")
        _row(sheet, y + CELL, "learned concept:\n" + _wrap(text), learned)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
