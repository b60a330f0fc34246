"""Render a toy-world scene to a PIL image: a procedural place, patterned things, a style."""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from attn_utils.toyworld.world import ACCENTS, CATEGORIES, COLOURS, SIZES, Scene, Thing

IGNORE = 255  # thing_labels: a cell the oracle is not taught
HORIZON = 0.55  # where the ground starts, as a fraction of the height
# Place -> (sky, ground) colours; features are drawn on top by _FEATURES.
_PLACE_COLOURS = {
    "beach": ((135, 200, 240), (235, 210, 150)),
    "snow": ((195, 205, 220), (250, 250, 252)),
    "forest": ((165, 205, 165), (60, 110, 45)),
    "city": ((175, 175, 185), (90, 90, 95)),
    "night": ((15, 20, 55), (30, 35, 50)),
    "desert": ((250, 200, 120), (225, 180, 100)),
}


def _beach(d: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    d.rectangle([0, 0.45 * s, s, 0.6 * s], fill=(30, 110, 190))  # the sea, between sky and sand
    for _ in range(6):
        x, y = rng.uniform(0, s), rng.uniform(0.47, 0.57) * s
        d.arc([x - 0.06 * s, y, x + 0.06 * s, y + 0.04 * s], 180, 360, (240, 250, 255), s // 64)


def _snow(d: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    for _ in range(45):  # flakes over sky and ground alike
        x, y, r = rng.uniform(0, s), rng.uniform(0, s), rng.uniform(0.008, 0.018) * s
        d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 255, 255))


def _forest(d: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    for x in np.sort(rng.uniform(0, 1, 7)) * s:
        top = rng.uniform(0.12, 0.3) * s
        d.rectangle([x - 0.015 * s, 0.45 * s, x + 0.015 * s, 0.6 * s], fill=(100, 65, 30))
        d.polygon([(x - 0.08 * s, 0.5 * s), (x + 0.08 * s, 0.5 * s), (x, top)], fill=(25, 85, 35))


def _city(d: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    x = -rng.uniform(0, 0.1) * s
    while x < s:
        w, top = rng.uniform(0.12, 0.22) * s, rng.uniform(0.12, 0.4) * s
        grey = int(rng.integers(95, 150))
        d.rectangle([x, top, x + w, HORIZON * s], fill=(grey, grey, grey + 10))
        for wy in np.arange(top + 0.03 * s, HORIZON * s - 0.04 * s, 0.07 * s):
            for wx in np.arange(x + 0.025 * s, x + w - 0.03 * s, 0.06 * s):
                d.rectangle([wx, wy, wx + 0.025 * s, wy + 0.03 * s], fill=(250, 220, 90))
        x += w + rng.uniform(0.0, 0.03) * s


def _night(d: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    for _ in range(35):
        x, y, r = rng.uniform(0, s), rng.uniform(0, HORIZON) * s, rng.uniform(0.004, 0.01) * s
        d.ellipse([x - r, y - r, x + r, y + r], fill=(255, 250, 210))
    x, r = rng.uniform(0.15, 0.85) * s, 0.07 * s
    d.ellipse([x - r, 0.08 * s, x + r, 0.08 * s + 2 * r], fill=(240, 240, 200))


def _desert(d: ImageDraw.ImageDraw, s: int, rng: np.random.Generator) -> None:
    x, r = rng.uniform(0.15, 0.85) * s, 0.08 * s
    d.ellipse([x - r, 0.08 * s, x + r, 0.08 * s + 2 * r], fill=(255, 240, 150))
    for x in rng.uniform(0, 1, 3) * s:
        top = rng.uniform(0.33, 0.45) * s
        d.rectangle([x - 0.02 * s, top, x + 0.02 * s, 0.62 * s], fill=(60, 140, 60))
        d.rectangle([x - 0.06 * s, top + 0.06 * s, x - 0.02 * s, top + 0.09 * s], (60, 140, 60))


_FEATURES = {
    "beach": _beach,
    "snow": _snow,
    "forest": _forest,
    "city": _city,
    "night": _night,
    "desert": _desert,
}


def _background(place: str, s: int, rng: np.random.Generator) -> Image.Image:
    sky, ground = _PLACE_COLOURS[place]
    img = Image.new("RGB", (s, s), sky)
    d = ImageDraw.Draw(img)
    d.rectangle([0, HORIZON * s, s, s], fill=ground)
    _FEATURES[place](d, s, rng)
    return img


def _shape(d: ImageDraw.ImageDraw, category: str, cx: float, cy: float, h: float) -> None:
    """Draw the category's silhouette (fill 255) centred at (cx, cy), half-height h."""

    def circle(x: float, y: float, r: float) -> None:
        d.ellipse([x - r, y - r, x + r, y + r], fill=255)

    if category == "toy":  # a teddy: body, head, two ears
        d.ellipse([cx - 0.6 * h, cy - 0.3 * h, cx + 0.6 * h, cy + h], fill=255)
        circle(cx, cy - 0.45 * h, 0.45 * h)
        circle(cx - 0.38 * h, cy - 0.82 * h, 0.18 * h)
        circle(cx + 0.38 * h, cy - 0.82 * h, 0.18 * h)
    elif category == "ball":
        circle(cx, cy, 0.9 * h)
    elif category == "cup":  # a tapered mug with a handle on the right
        d.polygon([(cx - 0.65 * h, cy - 0.8 * h), (cx + 0.65 * h, cy - 0.8 * h),
                   (cx + 0.5 * h, cy + h), (cx - 0.5 * h, cy + h)], fill=255)  # fmt: skip
        d.ellipse([cx + 0.3 * h, cy - 0.45 * h, cx + 1.0 * h, cy + 0.35 * h],
                  outline=255, width=max(1, int(0.18 * h)))  # fmt: skip
    elif category == "house":  # a box under a pitched roof
        d.rectangle([cx - 0.75 * h, cy - 0.1 * h, cx + 0.75 * h, cy + h], fill=255)
        d.polygon([(cx - h, cy - 0.1 * h), (cx + h, cy - 0.1 * h), (cx, cy - h)], fill=255)
    elif category == "bird":  # body, head, beak to the right, tail to the left
        d.ellipse([cx - 0.8 * h, cy - 0.35 * h, cx + 0.6 * h, cy + 0.55 * h], fill=255)
        circle(cx + 0.55 * h, cy - 0.45 * h, 0.35 * h)
        d.polygon([(cx + 0.85 * h, cy - 0.6 * h), (cx + 1.2 * h, cy - 0.42 * h),
                   (cx + 0.85 * h, cy - 0.3 * h)], fill=255)  # fmt: skip
        d.polygon([(cx - 0.7 * h, cy), (cx - 1.2 * h, cy - 0.4 * h), (cx - 1.1 * h, cy + 0.2 * h)],
                  fill=255)  # fmt: skip
    else:
        raise ValueError(f"unknown category {category!r}")


def _pattern(t: Thing, s: int, cx: float, cy: float, h: float) -> Image.Image:
    """The thing's surface as a full-canvas image, in the thing's own (unrotated) frame."""
    body, accent = ACCENTS[t.colour], ACCENTS.get(t.accent, ACCENTS[t.colour])
    img = Image.new("RGB", (s, s), body)
    d = ImageDraw.Draw(img)
    step = 0.4 * h  # pattern period: a few repeats across any thing
    ks = np.arange(-4, 5)
    if t.pattern == "striped":
        for k in ks:
            y = cy + k * step
            d.rectangle([0, y, s, y + step / 2], fill=accent)
    elif t.pattern == "dotted":
        for i in ks:
            for j in ks:
                x, y, r = cx + i * step + (j % 2) * step / 2, cy + j * step, 0.12 * h
                d.ellipse([x - r, y - r, x + r, y + r], fill=accent)
    elif t.pattern == "checker":
        for i in ks:
            for j in ks:
                if (i + j) % 2:
                    x, y = cx + i * step, cy + j * step
                    d.rectangle([x, y, x + step, y + step], fill=accent)
    elif t.pattern == "twotone":  # the upper half in the accent colour
        d.rectangle([0, 0, s, cy - 0.1 * h], fill=accent)
    return img


def _geometry(t: Thing, s: int) -> tuple[float, float, float]:
    """The thing's centre and half-height in pixels of an s x s canvas."""
    return t.x * s, t.y * s, SIZES[t.size] * t.scale * s


def _silhouette(t: Thing, s: int) -> Image.Image:
    """The thing's unrotated silhouette (L, 255 inside)."""
    cx, cy, h = _geometry(t, s)
    mask = Image.new("L", (s, s), 0)
    _shape(ImageDraw.Draw(mask), t.category, cx, cy, h)
    return mask


def _inside_rim(mask: Image.Image, h: float) -> Image.Image:
    """The silhouette mask less a rim about a tenth of the thing's size (half-height h) wide."""
    return mask.filter(ImageFilter.MinFilter(max(3, 2 * round(0.07 * h) + 1)))  # an odd width


def _placed(img: Image.Image, t: Thing, s: int) -> Image.Image:
    """An image in the thing's own frame, turned by its rotation about its centre, as render
    places it."""
    cx, cy, _ = _geometry(t, s)
    return img.rotate(t.rotation, Image.Resampling.BICUBIC, center=(cx, cy))


def _thing_layer(t: Thing, s: int, photo: bool) -> Image.Image:
    """The thing as an RGBA layer over the whole canvas (rotated, rimmed, shaded for photos)."""
    cx, cy, h = _geometry(t, s)
    mask = _silhouette(t, s)
    surface = _pattern(t, s, cx, cy, h)
    if t.rim:
        inner = _inside_rim(mask, h)
        ring = Image.fromarray(np.asarray(mask) - np.asarray(inner))
        surface.paste(ACCENTS[t.rim], mask=ring)
    if t.category in ("toy", "bird"):  # eyes, so the head reads as a head
        ex, ey, r = (
            (cx + 0.6 * h, cy - 0.5 * h, 0.07 * h)
            if t.category == "bird"
            else (cx, cy - 0.5 * h, 0.07 * h)
        )
        for dx in (0,) if t.category == "bird" else (-0.17 * h, 0.17 * h):
            ImageDraw.Draw(surface).ellipse(
                [ex + dx - r, ey - r, ex + dx + r, ey + r], (20, 20, 20)
            )
    if photo:  # soft light from the upper left
        yy, xx = np.mgrid[0:s, 0:s]
        dist = np.hypot(xx - (cx - 0.4 * h), yy - (cy - 0.5 * h)) / (2 * h)
        shade = np.clip(1.15 - 0.45 * dist, 0.55, 1.15)[..., None]
        rgb = np.clip(np.asarray(surface, np.float32) * shade, 0, 255).astype(np.uint8)
        surface = Image.fromarray(rgb)
    layer = surface.convert("RGBA")
    layer.putalpha(mask)
    return _placed(layer, t, s)


def _stylise(img: Image.Image, style: str, rng: np.random.Generator) -> Image.Image:
    x = np.asarray(img, np.float32)  # (H, W, 3)
    s = x.shape[0]
    if style == "photo":  # slight sensor noise
        x = x + rng.normal(0, 4, x.shape)
    elif style == "painting":  # blotchy low-frequency colour, then few levels per channel
        blotch = rng.normal(0, 12, (6, 6, 3)).astype(np.float32)
        up = [np.asarray(Image.fromarray(blotch[..., c]).resize((s, s), Image.Resampling.BILINEAR))
              for c in range(3)]  # fmt: skip
        x = np.round((x + np.stack(up, -1)) / 48) * 48
    elif style == "sketch":  # lines where the image changes, inked in its darkened colours
        grey = x @ np.array([0.299, 0.587, 0.114], np.float32)
        gy, gx = np.gradient(grey)
        ink = np.clip(np.hypot(gx, gy) * 4 * 64 / s / 255, 0, 1)[..., None]
        paper = np.array([250, 247, 240], np.float32)
        wash = 0.6 * paper + 0.4 * x  # a pale wash of the colours, so they survive
        x = wash * (1 - ink) + 0.6 * x * ink
    else:
        raise ValueError(f"unknown style {style!r}")
    return Image.fromarray(np.clip(x, 0, 255).astype(np.uint8))


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB image of size x size pixels; the same scene gives the same bytes."""
    rng = np.random.default_rng(scene.seed)
    big = 2 * size  # drawn at twice the size and box-filtered down, for smooth edges
    img = _background(scene.place, big, rng).convert("RGBA")
    for t in (scene.thing, scene.other):
        if t is not None:
            img = Image.alpha_composite(img, _thing_layer(t, big, scene.style == "photo"))
    img = img.convert("RGB").resize((size, size), Image.Resampling.BOX)
    return _stylise(img, scene.style, rng)


def object_mask(scene: Scene, size: int = 64) -> np.ndarray:
    """(size, size) float32 in [0, 1]: where the scene's things are (render's geometry)."""
    big = 2 * size
    total = np.zeros((big, big), np.float32)
    for t in (scene.thing, scene.other):
        if t is not None:
            placed = _placed(_silhouette(t, big), t, big)
            total = np.maximum(total, np.asarray(placed, np.float32) / 255)
    img = Image.fromarray((total * 255).astype(np.uint8)).resize((size, size), Image.Resampling.BOX)
    return np.asarray(img, np.float32) / 255


def _body(t: Thing, s: int, silhouette: Image.Image) -> Image.Image:
    """Where the thing shows its body colour (not its pattern's accent, rim or eyes), in its
    own frame like silhouette (_silhouette's); L, 255 there."""
    cx, cy, h = _geometry(t, s)
    body = np.all(np.asarray(_pattern(t, s, cx, cy, h)) == ACCENTS[t.colour], axis=-1)
    inside = np.asarray(_inside_rim(silhouette, h) if t.rim else silhouette)
    return Image.fromarray(np.where(body, inside, 0).astype(np.uint8))


def thing_labels(scene: Scene, size: int = 64, grid: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """(category map, colour map), each (grid, grid) uint8: 0 where no thing is, 1 + the
    index in CATEGORIES where a thing covers at least half of the cell, IGNORE where one
    covers 15-50 % (the oracle is not taught edges). The colour map names the body colour
    (1 + its index in COLOURS) only where the body colour itself covers 40 % of the cell;
    cells of the thing that its pattern's accent or rim dominates are IGNORE there. A
    later-drawn thing covers an earlier one, as in render."""
    big = 2 * size
    cat = np.zeros((grid, grid), np.uint8)
    col = np.zeros((grid, grid), np.uint8)
    seen = np.zeros((grid, grid), np.float32)
    for t in (scene.thing, scene.other):
        if t is None:
            continue
        silhouette = _silhouette(t, big)
        m = _placed(silhouette, t, big).resize((grid, grid), Image.Resampling.BOX)
        cover = np.asarray(m, np.float32) / 255
        body = _placed(_body(t, big, silhouette), t, big).resize((grid, grid), Image.Resampling.BOX)
        body_on = np.asarray(body, np.float32) / 255 >= 0.4
        on = cover >= 0.5
        cat[on] = 1 + CATEGORIES.index(t.category)
        col[on] = np.where(body_on[on], 1 + list(COLOURS).index(t.colour), IGNORE)
        seen = np.maximum(seen, cover)
    edge = (seen >= 0.15) & (cat == 0)
    cat[edge] = col[edge] = IGNORE
    return cat, col
