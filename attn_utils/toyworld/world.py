"""The toy world: vocabulary, scene spec, seeded sampler, captions, one-token-a-word tokenizer."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CATEGORIES = ("toy", "ball", "cup", "house", "bird")
# Body colours, each a caption word.
COLOURS = {
    "red": (214, 40, 40),
    "orange": (245, 140, 30),
    "yellow": (245, 215, 40),
    "green": (50, 160, 60),
    "blue": (40, 80, 210),
    "purple": (140, 50, 170),
}
# Accent colours (pattern and rim) are never named in a caption, so white and black join them.
ACCENTS = {**COLOURS, "white": (245, 245, 245), "black": (25, 25, 25)}
SIZES = {"small": 0.15, "big": 0.22}  # half the object's height, as a fraction of the image
# Place -> how a caption says it.
PLACES = {
    "beach": "on the beach",
    "snow": "in the snow",
    "forest": "in the forest",
    "city": "in the city",
    "night": "at night",
    "desert": "in the desert",
}
STYLES = ("photo", "sketch", "painting")
# Patterns; only those with a word here are described by captions. Checker and two-tone (and
# rims) exist in the world but have no word: concepts are made of such features.
PATTERNS = ("plain", "striped", "dotted", "checker", "twotone")
PATTERN_WORDS = {"striped": "striped", "dotted": "dotted"}
# Words the prompt files use besides the caption words ({} is filled with the placeholder).
_GLUE = ("a", "an", "of", "next", "to", "the", "on", "in", "at", "and", "with")


@dataclass(frozen=True)
class Thing:
    """One object: what it is, how it looks, and where it stands (x, y: centre, in [0, 1])."""

    category: str
    colour: str
    pattern: str = "plain"
    accent: str = ""  # the pattern's second colour; "" for plain
    rim: str = ""  # an outline's colour; "" for none
    size: str = "small"
    x: float = 0.5
    y: float = 0.7
    rotation: float = 0.0  # degrees, counter-clockwise
    scale: float = 1.0  # jitter on top of the size word

    def look(self) -> tuple[str, str, str, str]:
        """The appearance that makes an individual: colour, pattern, accent, rim."""
        return (self.colour, self.pattern, self.accent, self.rim)


@dataclass(frozen=True)
class Scene:
    """A whole picture: a thing (and maybe a second one) in a place, in a style."""

    thing: Thing
    place: str
    style: str
    seed: int  # drives the render's noise and background features
    other: Thing | None = None


# The concept individuals (concepts.py poses and writes them). They live here so that the
# sampler can refuse their looks: the world never shows a concept, on any category.
INDIVIDUALS = {
    "checker_toy": Thing("toy", "red", "checker", "white", "yellow"),
    "dotted_cup": Thing("cup", "orange", "dotted", "blue", "purple"),
    "twotone_ball": Thing("ball", "green", "twotone", "purple", "white"),
    "masked_bird": Thing("bird", "yellow", "twotone", "black", "red"),
    "checker_house": Thing("house", "blue", "checker", "orange", "white"),
}
RESERVED_LOOKS = frozenset(t.look() for t in INDIVIDUALS.values())


def vocabulary() -> list[str]:
    """Every word a caption or a toy prompt file may use, sorted."""
    words = {*CATEGORIES, *COLOURS, *SIZES, *STYLES, *PATTERN_WORDS.values(), *_GLUE}
    for phrase in PLACES.values():
        words.update(phrase.split())
    return sorted(words)


def _sample_look(rng: random.Random) -> tuple[str, str, str, str]:
    colour = rng.choice(list(COLOURS))
    pattern = rng.choice(PATTERNS)
    others = [a for a in ACCENTS if a != colour]
    accent = rng.choice(others) if pattern != "plain" else ""
    rim = rng.choice(others) if rng.random() < 0.25 else ""
    return colour, pattern, accent, rim


def sample_thing(rng: random.Random, x: float) -> Thing:
    """A random non-concept thing standing on the ground near horizontal position x."""
    look = _sample_look(rng)
    while look in RESERVED_LOOKS:  # resample rather than recolour: keeps the odds uniform
        look = _sample_look(rng)
    size = rng.choice(list(SIZES))
    half = SIZES[size]
    return Thing(
        rng.choice(CATEGORIES),
        *look,
        size=size,
        x=x + rng.uniform(-0.04, 0.04),
        y=0.86 - half + rng.uniform(-0.04, 0.02),
        rotation=rng.uniform(-10, 10),
    )


def sample_scene(rng: random.Random) -> Scene:
    """A random world scene; about a third have a second thing beside the first."""
    place = rng.choice(list(PLACES))
    style = rng.choice(STYLES)
    seed = rng.randrange(2**31)
    if rng.random() < 1 / 3:
        left, right = (0.25, 0.75) if rng.random() < 0.5 else (0.75, 0.25)
        thing, other = sample_thing(rng, left), sample_thing(rng, right)
        return Scene(thing, place, style, seed, other)
    return Scene(sample_thing(rng, rng.uniform(0.35, 0.65)), place, style, seed)


def is_held_out(category: str, colour: str, place: str) -> bool:
    """Whether pretraining never shows a thing of this category and colour in this place.

    One (category, colour, place) triple in eight is held out, so that prompt following can be
    measured on combinations the base model has never seen (every word alone it has seen).
    """
    i, j, k = CATEGORIES.index(category), list(COLOURS).index(colour), list(PLACES).index(place)
    return (i + 2 * j + 3 * k) % 8 == 0


def held_out_triples() -> list[tuple[str, str, str]]:
    """Every held-out (category, colour, place), in vocabulary order."""
    return [
        (c, col, p) for c in CATEGORIES for col in COLOURS for p in PLACES if is_held_out(c, col, p)
    ]


def _shows_held_out(scene: Scene) -> bool:
    things = [t for t in (scene.thing, scene.other) if t is not None]
    return any(is_held_out(t.category, t.colour, scene.place) for t in things)


def scenes(seed: int, n: int, training: bool = False) -> list[Scene]:
    """n scenes, the same for the same seed; training=True resamples any scene that shows a
    held-out combination (pretraining's data)."""
    rng = random.Random(seed)
    out = []
    while len(out) < n:
        scene = sample_scene(rng)
        if not (training and _shows_held_out(scene)):
            out.append(scene)
    return out


def describe(thing: Thing) -> str:
    """'small red striped toy': size, colour, pattern word (if it has one), category."""
    words = [thing.size, thing.colour, PATTERN_WORDS.get(thing.pattern, ""), thing.category]
    return " ".join(w for w in words if w)


def caption(scene: Scene) -> str:
    """'a photo of a small red toy next to a big blue ball on the beach'."""
    text = f"a {scene.style} of a {describe(scene.thing)}"
    if scene.other is not None:
        text += f" next to a {describe(scene.other)}"
    return f"{text} {PLACES[scene.place]}"


def build_tokenizer(tok_dir: str | Path) -> CLIPTokenizer:
    """Write a CLIP tokenizer (vocab.json, merges.txt) where each vocabulary word is one token."""
    # Lazy: the tiny model's module imports torch, which drawing scenes does not need.
    from transformers import CLIPTokenizer

    from attn_utils.tiny import _EOW, _byte_chars, _piece_merges

    chars = _byte_chars()
    tokens = chars + [c + _EOW for c in chars]  # CLIP's layout: byte tokens first, "!" is 0
    seen, merges, seen_merges = set(tokens), [], set()
    for word in vocabulary():
        for merge in _piece_merges(word, final=True):
            joined = merge[0] + merge[1]
            if merge not in seen_merges:
                seen_merges.add(merge)
                merges.append(merge)
            if joined not in seen:
                seen.add(joined)
                tokens.append(joined)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    tok_dir = Path(tok_dir)
    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab = {t: i for i, t in enumerate(tokens)}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (tok_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # model_max_length=77 as SD's; the default (huge) length breaks truncation.
    return CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77, pad_token="!")
