"""The toy world's concepts: individuals no caption word describes, and their photo folders."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

from attn_utils.toyworld.draw import render
from attn_utils.toyworld.world import INDIVIDUALS, PLACES, SIZES, Scene, Thing

# name -> {"spec": the individual (its look; pose fields are redrawn per photo), "category"}
CONCEPTS = {name: {"spec": t, "category": t.category} for name, t in INDIVIDUALS.items()}
PHOTOS = 5  # per concept folder, as DreamBench's smaller subjects


def concept(name: str) -> Thing:
    """The named individual; a ValueError listing the known names for any other name."""
    if name not in CONCEPTS:
        raise ValueError(f"unknown toy concept {name!r}; known: {', '.join(sorted(CONCEPTS))}")
    return CONCEPTS[name]["spec"]


def concept_scenes(name: str, seed: int = 0) -> list[Scene]:
    """The concept's photos: one per place (five of the six), each in its own pose."""
    spec = concept(name)
    rng = random.Random(f"{name}/{seed}")  # a string seed: each concept poses on its own
    places = rng.sample(list(PLACES), PHOTOS)
    out = []
    for place in places:
        size = rng.choice(list(SIZES))
        pose = dataclasses.replace(
            spec,
            size=size,
            x=rng.uniform(0.3, 0.7),
            y=0.86 - SIZES[size] + rng.uniform(-0.06, 0.02),
            rotation=rng.uniform(-20, 20),
            scale=rng.uniform(0.9, 1.15),
        )
        out.append(Scene(pose, place, "photo", rng.randrange(2**31)))
    return out


def write_concept(name: str, out_dir: str | Path, size: int = 128, seed: int = 0) -> Path:
    """Write the concept's photos as out_dir/<name>/00.png ... 04.png; return that folder."""
    folder = Path(out_dir) / name
    scenes = concept_scenes(name, seed)  # raises on an unknown name before making a folder
    folder.mkdir(parents=True, exist_ok=True)
    for i, scene in enumerate(scenes):
        render(scene, size).save(folder / f"{i:02d}.png")
    return folder
