"""The pretraining's data: the rendered training scenes with their labels, as tensors, and the
captions as people shorten them."""

from __future__ import annotations

import os
import re
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from attn_utils.toyworld.nets import SIZE
from attn_utils.toyworld.world import CATEGORIES, COLOURS, PLACES, STYLES, Scene, caption, scenes


def labels(scene: Scene) -> tuple[int, int, np.ndarray, np.ndarray]:
    """(place index, style index, categories present, body colours present) of a scene."""
    cats, cols = np.zeros(len(CATEGORIES), np.uint8), np.zeros(len(COLOURS), np.uint8)
    for t in (scene.thing, scene.other):
        if t is not None:
            cats[CATEGORIES.index(t.category)] = 1
            cols[list(COLOURS).index(t.colour)] = 1
    return list(PLACES).index(scene.place), STYLES.index(scene.style), cats, cols


def _render_chunk(chunk: list[Scene]) -> np.ndarray:
    from attn_utils.toyworld.draw import render

    return np.stack([np.asarray(render(s, SIZE)) for s in chunk])


def render_data(path: Path, seed: int, n: int, workers: int = 2) -> None:
    """Render n training scenes (no held-out combination) to path (an .npz, no pickle)."""
    world = scenes(seed, n, training=True)
    chunks = [world[i : i + 500] for i in range(0, n, 500)]
    with get_context("fork").Pool(workers) as pool:
        parts = list(tqdm(pool.imap(_render_chunk, chunks), total=len(chunks), desc="render"))
    lab = [labels(s) for s in world]
    tmp = path.with_suffix(".tmp.npz")
    np.savez(
        tmp,
        images=np.concatenate(parts),
        captions=np.array([caption(s) for s in world]),
        place=np.array([x[0] for x in lab], np.int64),
        style=np.array([x[1] for x in lab], np.int64),
        category=np.stack([x[2] for x in lab]),
        colour=np.stack([x[3] for x in lab]),
    )
    os.replace(tmp, path)


def load_data(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float (B, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def mirror(x: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """x (B, ..., W) mirrored left-right where flip (B,) is true."""
    return torch.where(flip.view(-1, *[1] * (x.dim() - 1)), x.flip(-1), x)


def random_flip(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    return mirror(x, torch.from_numpy(rng.random(len(x)) < 0.5))


_SIZES = {"small", "big"}
_COLOURS = set(COLOURS)
_PATTERN_WORDS = {"striped", "dotted"}
_SECOND = re.compile(r" next to a [a-z ]*?\b(" + "|".join(CATEGORIES) + r")\b")


def shorten(text: str, rng: np.random.Generator) -> str:
    """A caption with words left out as people prompt: each size, colour and pattern word
    with p 0.5, the second thing ("next to a ...") with p 0.3; style, category, place stay."""
    if rng.random() < 0.3:
        text = _SECOND.sub("", text, count=1)
    drop = _SIZES | _COLOURS | _PATTERN_WORDS
    return " ".join(w for w in text.split() if not (w in drop and rng.random() < 0.5))


def caption_text(caption_: str, rng: np.random.Generator, short: float) -> str:
    """The caption, shortened with probability short (a draw only when 0 < short < 1)."""
    if short >= 1 or (short > 0 and rng.random() < short):
        return shorten(caption_, rng)
    return caption_
