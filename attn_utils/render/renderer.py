"""Render prompt files: prompts, per-image seeds, batching, output folders and index.json.

Output of one call:
    <save_dir>/<slug>/<i>.png, prompt.txt   (one folder per prompt, swapped in when complete)
    <save_dir>/<slug>/attention/            (--save_attention_maps) <i>.png, maps.safetensors
    <save_dir>/grids/<slug>.png             (all images of a prompt, tiled)
    <save_dir>/index.json                   (written last: its presence means the run finished)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from attn_utils.method.capture import capture_cross_attention
from attn_utils.model_defaults import SD_RENDER
from attn_utils.render.heatmaps import HeatmapController, save_attention, token_columns
from attn_utils.render.pipeline import sample_images
from attn_utils.runfiles import (
    image_grid,
    read_prompt_lines,
    write_dir_atomically,
    write_json_atomically,
)

log = logging.getLogger(__name__)

MAX_SLUG = 80  # characters (ASCII only, so bytes too): far below every file system's limit
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RESERVED = {"con", "prn", "aux", "nul"} | {f"{d}{i}" for d in ("com", "lpt") for i in range(10)}
_TAKEN = {"grids", "index.json"}  # names this module writes beside the prompt folders


@dataclass
class PromptJob:
    """One prompt to render: as written, with {} filled in, and its folder name."""

    template: str
    prompt: str
    slug: str


@dataclass
class RenderOptions:
    """Sampling settings shared by every prompt of one call."""

    num_images_per_prompt: int = 16
    infer_batch_size: int = 8
    seed: int = 0  # image i of every prompt starts from the noise of seed + i
    num_inference_steps: int = SD_RENDER["num_inference_steps"]  # the paper's
    guidance_scale: float = SD_RENDER["guidance_scale"]
    negative_prompt: str | None = None
    height: int = 512
    width: int = 512
    save_attention_maps: bool = False


def read_prompt_file(path: str | Path) -> list[str]:
    """Non-blank lines that do not start with '#'; one clear error if there are none."""
    return read_prompt_lines(path, "--prompt_file")


def fill(template: str, tokens: list[str], category: str | None) -> str:
    """{} -> '<placeholder tokens> <category>' (either part may be absent)."""
    return template.replace("{}", " ".join([*tokens, *([category] if category else [])]))


def names_concept(prompt: str, tokens: list[str]) -> bool:
    """The prompt already holds a placeholder token, written out (as in 'a new_concept_v0 cup')."""
    words = set(re.findall(r"[^\s,.;:!?()\[\]\"']+", prompt))
    return any(t in words for t in tokens)


def prompt_slugs(prompts: list[str]) -> list[str]:
    """Folder names: the prompt with unsafe runs as '_', plus a hash where that is ambiguous.

    A hash suffix is added when the name is cut to MAX_SLUG, is a reserved device name or one
    of our own (grids, index.json), or would clash (case-insensitively) with another prompt's
    name in this call.
    """
    readable = [_UNSAFE.sub("_", p).strip("._-") or "prompt" for p in prompts]
    counts = Counter(r.casefold() for r in readable)
    out = []
    for p, r in zip(prompts, readable):
        clash = counts[r.casefold()] > 1 or r.casefold() in _TAKEN
        clash = clash or r.split(".")[0].casefold() in _RESERVED
        if len(r) > MAX_SLUG or clash:
            digest = hashlib.sha1(p.encode("utf-8")).hexdigest()[:8]
            r = r[: MAX_SLUG - 9].rstrip("._-") + "-" + digest
        out.append(r)
    return out


def make_jobs(templates: list[str], tokens: list[str], category: str | None) -> list[PromptJob]:
    """Fill every template, warn about those without {}, drop repeats, name the folders."""
    prompts: dict[str, str] = {}
    for t in templates:
        if "{}" not in t and not names_concept(t, tokens):
            log.warning("prompt without '{}' is rendered as written: %r", t)
        p = fill(t, tokens, category)
        if p in prompts:
            log.warning("repeated prompt rendered once: %r", p)
            continue
        prompts[p] = t
    slugs = prompt_slugs(list(prompts))
    return [PromptJob(t, p, s) for (p, t), s in zip(prompts.items(), slugs)]


def batch_spans(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, size) of each batch: exactly n images, the last batch holding the remainder."""
    return [(s, min(batch_size, n - s)) for s in range(0, n, batch_size)]


def initial_latents(seeds: list[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """(n, C, h, w) starting noise, image i from its own CPU generator seeded with seeds[i].

    Drawn on the CPU in fp32, so a seed gives the same noise on every device, dtype and
    batch size.
    """
    return torch.stack(
        [
            torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s), device="cpu")
            for s in seeds
        ]
    )


class Renderer:
    """Renders prompt jobs with one pipeline; placeholder ids and category for heatmaps."""

    def __init__(self, pipe, opts: RenderOptions, placeholder_ids: list[int], category: str | None):
        self.pipe, self.opts = pipe, opts
        self.placeholder_ids, self.category = placeholder_ids, category
        tokens = pipe.tokenizer.convert_ids_to_tokens(placeholder_ids)
        self.labels = {"placeholder": " ".join(tokens), "category": category or ""}
        scale = pipe.vae_scale_factor
        self.latent_shape = (
            pipe.unet.config.in_channels,
            opts.height // scale,
            opts.width // scale,
        )

    def _batch(self, prompt: str, seeds: list[int], columns: dict[str, list[int]]):
        """(images, {group: (n, h, w)} maps) of one batch."""
        o, pipe = self.opts, self.pipe
        latents = initial_latents(seeds, self.latent_shape)  # (n, C, h, w)
        # CPU generators on purpose: diffusers draws a stochastic scheduler's noise on the CPU with
        # them and moves it, so a seed means the same image on every device
        gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        guided = o.guidance_scale > 1.0
        ctrl = (
            HeatmapController(columns, self.latent_shape[1:], guided, device=pipe.device)
            if columns
            else None
        )
        wiring = capture_cross_attention(pipe.unet, ctrl) if ctrl else contextlib.nullcontext()
        with wiring:
            images = sample_images(  # the VAE in fp32 where fp16 overflows it (force_upcast)
                pipe,
                prompt=prompt,
                num_images_per_prompt=len(seeds),
                negative_prompt=o.negative_prompt,
                height=o.height,
                width=o.width,
                num_inference_steps=o.num_inference_steps,
                guidance_scale=o.guidance_scale,
                latents=latents.to(device=pipe.device, dtype=pipe.unet.dtype),
                generator=gens,
            )
        return images, (ctrl.maps() if ctrl else {})

    def _columns(self, job: PromptJob) -> dict[str, list[int]]:
        if not self.opts.save_attention_maps:
            return {}
        cols = token_columns(self.pipe.tokenizer, job.prompt, self.placeholder_ids, self.category)
        if not cols:
            log.warning("no placeholder or category token in %r: no attention maps", job.prompt)
        return cols

    def render(self, jobs: list[PromptJob], save_dir: Path, settings: dict) -> dict:
        """Write every prompt's folder and grid, then index.json; return the index."""
        save_dir = Path(save_dir)
        save_dir.mkdir(parents=True, exist_ok=True)
        (save_dir / "index.json").unlink(missing_ok=True)  # an unfinished run must not look done
        spans = batch_spans(self.opts.num_images_per_prompt, self.opts.infer_batch_size)
        with tqdm(total=len(jobs) * len(spans), desc="render", unit="batch") as bar:
            entries = {job.prompt: self._render_job(job, save_dir, spans, bar) for job in jobs}
        index = {"format": 1, "settings": {**settings, **asdict(self.opts)}, "prompts": entries}
        write_json_atomically(save_dir / "index.json", index)
        return index

    def _render_job(self, job: PromptJob, save_dir: Path, spans: list, bar) -> dict:
        """Write one prompt's folder (swapped in when complete) and grid; return its entry."""
        o = self.opts
        seeds = [o.seed + i for i in range(o.num_images_per_prompt)]
        columns = self._columns(job)
        images: list = []
        maps: dict[str, list[torch.Tensor]] = {}

        def write(tmp: Path) -> None:
            for start, size in spans:
                imgs, m = self._batch(job.prompt, seeds[start : start + size], columns)
                for j, img in enumerate(imgs):
                    img.save(tmp / f"{start + j}.png")
                images.extend(imgs)
                for k, v in m.items():
                    maps.setdefault(k, []).append(v)
                bar.update(1)
            (tmp / "prompt.txt").write_text(job.prompt + "\n", encoding="utf-8")
            if maps:
                stacked = {k: torch.cat(v) for k, v in maps.items()}  # (n, h, w)
                save_attention(tmp / "attention", images, stacked, self.labels)

        write_dir_atomically(save_dir / job.slug, write)
        grid = save_dir / "grids" / f"{job.slug}.png"
        grid.parent.mkdir(exist_ok=True)
        tmp_grid = grid.with_name(f".tmp-{grid.name}")
        image_grid(images).save(tmp_grid, format="PNG")
        tmp_grid.replace(grid)
        entry = {
            "template": job.template,
            "dir": job.slug,
            "files": [f"{job.slug}/{i}.png" for i in range(len(images))],
            "grid": f"grids/{job.slug}.png",
            "seed": o.seed,
            "image_seeds": seeds,
        }
        if maps:
            entry["attention_maps"] = {
                "figures": [f"{job.slug}/attention/{i}.png" for i in range(len(images))],
                "maps": f"{job.slug}/attention/maps.safetensors",
                "tokens": {k: columns[k] for k in maps},
            }
        return entry
