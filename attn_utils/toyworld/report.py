"""How good the pretrained toy models are: the VAE on world scenes and on the concepts' photos,
and the base model's prompt following on held-out captions, judged by the oracle."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from attn_utils.evaluate.oracle import Oracle
from attn_utils.runfiles import write_json_atomically
from attn_utils.toyworld.concepts import CONCEPTS, concept_scenes
from attn_utils.toyworld.draw import render
from attn_utils.toyworld.world import PLACES, SIZES, STYLES, held_out_triples, scenes

# The sampler settings the base model's prompt following is measured with; the export writes
# them into base/attndreambooth_defaults.json, so inference.py renders as it was measured.
MEASURED_WITH = {"scheduler": "ddim", "num_inference_steps": 30, "guidance_scale": 4.0}

REPORT = "report.json"


def _unit(images: list[Image.Image]) -> torch.Tensor:
    x = torch.from_numpy(np.stack([np.asarray(im, np.float32) for im in images]))
    return x.permute(0, 3, 1, 2) / 127.5 - 1


def _images(x: torch.Tensor) -> list[Image.Image]:
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in arr]


@torch.no_grad()
def vae_errors(base: Path, dino: Path, seed: int) -> dict:
    """MSE (pixels in [0, 1]) of reconstructing 256 unseen world scenes and every concept
    photo, and the toy DINO cosine between each concept photo and its reconstruction."""
    from diffusers import AutoencoderKL

    from attn_utils.evaluate.metrics import MetricModels

    vae = AutoencoderKL.from_pretrained(str(base / "vae")).eval()

    def recon(images):
        x = _unit(images)
        return x, vae.decode(vae.encode(x).latent_dist.mean).sample

    world = [render(s, 64) for s in scenes(seed + 1, 256)]
    x, r = recon(world)
    out = {"world_mse": float(((r.clamp(-1, 1) - x) / 2).pow(2).mean())}
    models = MetricModels.load(str(dino.parent / "clip"), str(dino), "cpu", "no", 32)
    per = {}
    for name in CONCEPTS:
        photos = [render(s, 64) for s in concept_scenes(name)]
        x, r = recon(photos)
        mse = float(((r.clamp(-1, 1) - x) / 2).pow(2).mean())
        a, b = models.dino_image(photos), models.dino_image(_images(r))
        per[name] = {
            "mse": round(mse, 5),
            "dino_photo_vs_recon": round(float((a * b).sum(1).mean()), 4),
        }
    out["concepts"] = per
    out["concept_mse_mean"] = float(np.mean([v["mse"] for v in per.values()]))
    return out


def _tally(oracle: Oracle, images: list, texts: list[str], hits: dict[str, list[bool]]) -> None:
    """Append, per head, whether the oracle sees what each image's text names."""
    probs = oracle.predict(images)
    for row, text in enumerate(texts):
        for head, ok in oracle.checks(probs, row, text).items():
            hits.setdefault(head, []).append(ok)


def _rates(hits: dict[str, list[bool]]) -> dict[str, float]:
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items()}


@torch.no_grad()
def prompt_following(
    base: Path, oracle_dir: Path, seed: int, per_caption: int, short: bool = False
) -> dict:
    """Oracle accuracy per attribute on images of held-out (category, colour, place) captions,
    in every style, sampled with MEASURED_WITH (DDIM 30 steps, guidance 4). short: without
    size and colour ("a photo of a toy at night"), as prompt files write them."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None)
    assert MEASURED_WITH["scheduler"] == "ddim"
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    oracle = Oracle.load(oracle_dir)
    rng = random.Random(seed)
    prompts = []
    for category, colour, place in held_out_triples():
        for style in STYLES:
            size = rng.choice(list(SIZES))
            what = category if short else f"{size} {colour} {category}"
            prompts.append(f"a {style} of a {what} {PLACES[place]}")
    hits: dict[str, list[bool]] = {}
    images_all = []
    for i in range(0, len(prompts), 16):
        batch = prompts[i : i + 16]
        g = torch.Generator().manual_seed(seed + i)
        images = pipe(
            batch, num_inference_steps=MEASURED_WITH["num_inference_steps"],
            guidance_scale=MEASURED_WITH["guidance_scale"], height=64, width=64,
            num_images_per_prompt=per_caption, generator=g,
        ).images  # fmt: skip
        _tally(oracle, images, [p for p in batch for _ in range(per_caption)], hits)
        images_all += images
    return (
        {
            "captions": len(prompts),
            "images": len(images_all),
            "accuracy": _rates(hits),
        },
        images_all,
        prompts,
    )


def oracle_accuracy(oracle_dir: Path, seed: int, n: int = 600) -> dict:
    """The oracle on unseen rendered scenes (its own accuracy: the ceiling of its scores)."""
    from attn_utils.toyworld.world import caption

    oracle = Oracle.load(oracle_dir)
    world = scenes(seed + 2, n)
    images = [render(s, 64) for s in world]
    hits: dict[str, list[bool]] = {}
    for i in range(0, n, 100):
        _tally(oracle, images[i : i + 100], [caption(s) for s in world[i : i + 100]], hits)
    return _rates(hits)


def report(out: Path, work: Path, seed: int, budget) -> dict:
    """Measure, write out/report.json and work/base_samples.png; return the report."""
    t0 = time.time()
    result = {"seed": seed}
    result["vae"] = vae_errors(out / "base", out / "dino", seed)
    result["oracle_on_rendered_scenes"] = oracle_accuracy(out / "oracle", seed)
    follow, images, prompts = prompt_following(
        out / "base", out / "oracle", seed, budget.report_images
    )
    result["prompt_following_held_out"] = follow
    short, _, _ = prompt_following(
        out / "base", out / "oracle", seed, budget.report_images, short=True
    )
    result["prompt_following_short_prompts"] = short
    result["seconds"] = round(time.time() - t0, 1)
    write_json_atomically(out / REPORT, result)
    cols = 12
    rows = -(-len(images) // cols)
    grid = Image.new("RGB", (64 * cols, 64 * rows), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * 64, (i // cols) * 64))
    grid.save(work / "base_samples.png")
    (work / "base_samples.txt").write_text(
        "".join(f"{p}\n" for p in prompts for _ in range(budget.report_images))
    )
    print(json.dumps(result, indent=2))
    return result
