"""The demo's renders of the base model and its picture.

`render_baseline` renders the prompts of an inference.py folder with the untouched base model,
{} replaced by the category word alone, with the same sampler, settings and starting noise, into
an inference.py-style folder that evaluate.py scores like any other. `write_overview` shows the
concept's photos, then per prompt the base model's and the learned concept's images.
"""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw

from attn_utils.evaluate.scoring import read_index
from attn_utils.images import load_instance_images
from attn_utils.models import load_base_model
from attn_utils.render.pipeline import make_pipeline
from attn_utils.render.renderer import Renderer, RenderOptions, make_jobs

CELL = 128  # each 64 px image is shown at twice its size
LABEL = 200  # width of the label column


def render_baseline(base: Path, images_dir: Path, category: str, out: Path) -> Path:
    """Render images_dir's prompts with the base model into out (index.json written last)."""
    index, prompts = read_index(images_dir)
    settings = index.get("settings", {})
    m = load_base_model(str(base))
    scheduler = settings.get("scheduler", "dpm")
    pipe = make_pipeline(
        m.tokenizer, m.text_encoder, m.vae, m.unet, m.noise_scheduler.config, scheduler
    )
    known = {f.name for f in dataclasses.fields(RenderOptions)}
    opts = RenderOptions(**{k: v for k, v in settings.items() if k in known})
    opts.save_attention_maps = False
    jobs = make_jobs([p["template"] for p in prompts], [], category)
    what = {"model": str(base), "category": category, "scheduler": scheduler}
    Renderer(pipe, opts, [], category).render(jobs, out, {**what, "baseline_of": str(images_dir)})
    return out


def _row(sheet: Image.Image, y: int, label: str, images: list[Image.Image]) -> None:
    ImageDraw.Draw(sheet).multiline_text((6, y + 6), label, fill=(20, 20, 20), spacing=3)
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB").resize((CELL, CELL), Image.Resampling.NEAREST),
                    (LABEL + i * CELL, y))  # fmt: skip


def _wrap(text: str) -> str:
    return textwrap.fill(text, 30, break_long_words=False, break_on_hyphens=False)


def write_overview(
    concept_dir: Path, images_dir: Path, base_dir: Path, category: str, out: Path, n: int = 5
) -> Path:
    """The photos, then per prompt a base-model row and a learned-concept row (n images each)."""
    _, learned = read_index(images_dir)
    _, base = read_index(base_dir)
    base_of = {p["template"]: p for p in base}
    photos = load_instance_images(concept_dir, 64)[0][:n]
    sheet = Image.new("RGB", (LABEL + n * CELL, CELL * (1 + 2 * len(learned))), "white")
    _row(sheet, 0, "the concept's photos", photos)
    for i, p in enumerate(learned):
        y = CELL * (1 + 2 * i)
        plain = p["template"].replace("{}", category)
        _row(sheet, y, "base model:\n" + _wrap(plain),
             [Image.open(f) for f in base_of[p["template"]]["files"][:n]])  # fmt: skip
        text = p["template"].replace("{}", f"[V] {category}")
        _row(sheet, y + CELL, "learned concept:\n" + _wrap(text),
             [Image.open(f) for f in p["files"][:n]])  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
