"""The judge's data: each concept posed anywhere, its lookalikes, and the degradations generated
images have (attn_utils/toyworld/judge.py trains and measures on these).

Every scene comes from a string-seeded generator of its own split ("train", "heldout"), and a
scene whose render seed is one of the concept photos' (concepts.concept_scenes, photo seeds
0-9) is redrawn, so the judge never sees a concept's training photo.
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
from torch.nn import functional as F

from attn_utils.toyworld.concepts import CONCEPTS, concept_scenes
from attn_utils.toyworld.world import (
    ACCENTS,
    CATEGORIES,
    COLOURS,
    PATTERNS,
    PLACES,
    SIZES,
    STYLES,
    Scene,
    Thing,
    sample_scene,
    sample_thing,
)

NAMES = sorted(CONCEPTS)
# What a concept is tested against (docs/toyworld.md, "The judge").
KINDS = ("same_body", "same_pattern", "other_concept", "ordinary")
PHOTO_SEEDS = range(10)  # write_concept's --seed values whose photos are kept out


def photo_render_seeds() -> frozenset[int]:
    """The render seeds of every concept's photos for write_concept seeds 0-9."""
    return frozenset(s.seed for n in NAMES for k in PHOTO_SEEDS for s in concept_scenes(n, k))


def is_concept(thing: Thing | None, name: str) -> bool:
    """Whether the thing is the named individual: its category and its whole look."""
    spec = CONCEPTS[name]["spec"]
    return thing is not None and (thing.category, thing.look()) == (spec.category, spec.look())


def labels(scene: Scene) -> np.ndarray:
    """(len(NAMES),) float32: 1 for each concept the scene shows."""
    return np.array([is_concept(scene.thing, n) or is_concept(scene.other, n) for n in NAMES],
                    np.float32)  # fmt: skip


def _pose(rng: random.Random, thing: Thing, x: float) -> Thing:
    """The thing in a random size, place on the ground near x, turn and scale."""
    size = rng.choice(list(SIZES))
    return dataclasses.replace(
        thing,
        size=size,
        x=min(0.85, max(0.15, x + rng.uniform(-0.06, 0.06))),
        y=0.86 - SIZES[size] + rng.uniform(-0.06, 0.03),
        rotation=rng.uniform(-25, 25),
        scale=rng.uniform(0.85, 1.2),
    )


def _lookalike(rng: random.Random, name: str, kind: str) -> Thing:
    """An unposed thing of the kind that is not the concept: same_body keeps category and
    colour with another (or no) pattern; same_pattern keeps pattern and accent on another
    category or colour; other_concept is another individual."""
    spec = CONCEPTS[name]["spec"]
    while True:
        if kind == "same_body":
            pattern = rng.choice([p for p in PATTERNS if p != spec.pattern])
            others = [a for a in ACCENTS if a != spec.colour]
            accent = rng.choice(others) if pattern != "plain" else ""
            rim = rng.choice(["", spec.rim, rng.choice(others)])
            t = Thing(spec.category, spec.colour, pattern, accent, rim)
        elif kind == "same_pattern":
            category = rng.choice(CATEGORIES)
            colour = rng.choice([c for c in COLOURS if c not in (spec.accent, spec.colour)])
            if category != spec.category:  # another category may keep the colour
                colour = rng.choice([colour, spec.colour])
            rim = rng.choice(["", spec.rim, rng.choice([a for a in ACCENTS if a != colour])])
            t = Thing(category, colour, spec.pattern, spec.accent, rim)
        elif kind == "other_concept":
            t = CONCEPTS[rng.choice([n for n in NAMES if n != name])]["spec"]
        else:
            raise ValueError(f"unknown lookalike kind {kind!r}")
        if not any(is_concept(t, n) for n in NAMES) or kind == "other_concept":
            return t


def _stage(rng: random.Random, thing: Thing, seeds: frozenset[int]) -> Scene:
    """The thing posed in a random place and style, alone or beside an ordinary thing."""
    while True:
        seed = rng.randrange(2**31)
        if seed not in seeds:
            break
    place, style = rng.choice(list(PLACES)), rng.choice(STYLES)
    if rng.random() < 1 / 3:
        left, right = (0.25, 0.75) if rng.random() < 0.5 else (0.75, 0.25)
        return Scene(_pose(rng, thing, left), place, style, seed, sample_thing(rng, right))
    return Scene(_pose(rng, thing, rng.uniform(0.3, 0.7)), place, style, seed)


def concept_set(split: str, name: str, n: int) -> list[Scene]:
    """n scenes of the named concept anywhere (split: "train" or "heldout")."""
    rng, seeds = random.Random(f"judge/{split}/{name}/concept"), photo_render_seeds()
    return [_stage(rng, CONCEPTS[name]["spec"], seeds) for _ in range(n)]


def lookalike_set(split: str, name: str, kind: str, n: int) -> list[Scene]:
    """n scenes of the kind for the named concept, none showing it."""
    rng, seeds = random.Random(f"judge/{split}/{name}/{kind}"), photo_render_seeds()
    if kind == "ordinary":  # world scenes: the sampler never draws a concept's look
        out = []
        while len(out) < n:
            scene = sample_scene(rng)
            if scene.seed not in seeds:
                out.append(scene)
        return out
    return [_stage(rng, _lookalike(rng, name, kind), seeds) for _ in range(n)]


def degrade(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> the same with a random blur and colour noise each (some
    images left as they are): what a diffusion model's samples look like."""
    out = []
    for img in x:
        if rng.random() < 0.6:
            sigma = rng.uniform(0.3, 1.5)
            k = np.exp(-0.5 * (np.arange(-3, 4) / sigma) ** 2)
            k = torch.tensor(k / k.sum(), dtype=img.dtype)
            img = F.pad(img[:, None], (3, 3, 3, 3), mode="replicate")
            img = F.conv2d(F.conv2d(img, k.view(1, 1, 1, 7)), k.view(1, 1, 7, 1))[:, 0]
        if rng.random() < 0.6:
            tint = torch.from_numpy(rng.normal(0, 0.06, (3, 1, 1)).astype(np.float32))
            grain = rng.normal(0, rng.uniform(0.01, 0.08), tuple(img.shape)).astype(np.float32)
            img = img + tint + torch.from_numpy(grain)
        out.append(img)
    return torch.stack(out).clamp(-1, 1)
