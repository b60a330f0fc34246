"""Cross-attention heatmaps of chosen prompt tokens, aggregated over layers and steps.

The controller (what to keep) plugs into capture.capture_cross_attention (the wiring); the
drawing functions turn its maps into the paper's "image | [V] | category" figure.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from safetensors.torch import save_file

from attn_utils.method.capture import Controller
from attn_utils.method.tokens import category_token_ids


def token_columns(
    tokenizer, prompt: str, placeholder_ids: list[int], category: str | None
) -> dict[str, list[int]]:
    """Positions of the placeholder tokens and of the category's sub-tokens in the prompt.

    Tokenised exactly as the pipeline does (padded and truncated to the encoder's length);
    a group that does not occur (no '{}', cut by truncation) is left out.
    """
    row = tokenizer(
        prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True
    ).input_ids
    ph = set(placeholder_ids)
    groups = {"placeholder": [i for i, t in enumerate(row) if t in ph]}
    cat = category_token_ids(tokenizer, category) if category else []
    k = len(cat)
    groups["category"] = [
        i + j for i in range(len(row) - k + 1) if k and row[i : i + k] == cat for j in range(k)
    ]
    return {name: cols for name, cols in groups.items() if cols}


def layer_grid(n_pixels: int, latent_hw: tuple[int, int]) -> tuple[int, int]:
    """(h, w) of a layer's N pixels: the latent grid downsampled by 1, 2, 4, ... (ceil)."""
    lh, lw = latent_hw
    f = 1
    while f <= max(lh, lw):
        h, w = -(-lh // f), -(-lw // f)
        if h * w == n_pixels:
            return h, w
        f *= 2
    raise ValueError(f"{n_pixels} pixels do not fit a downsampled {lh}x{lw} latent grid")


class HeatmapController(Controller):
    """Mean attention probability on each token group, per image, over heads, layers, steps.

    A group's map is the sum of its columns (a 2-token placeholder counts as one concept);
    each layer's map is resized to the latent grid before averaging over layers and steps.
    """

    def __init__(
        self,
        columns: dict[str, list[int]],
        latent_hw: tuple[int, int],
        guided: bool,
        seq_len: int = 77,
        device: torch.device | str = "cpu",
    ) -> None:
        self.names = list(columns)
        # (T, G): 1 where a group's token is; on the U-Net's device, made once per batch
        self.select = torch.zeros(seq_len, len(columns), device=device)
        for g, name in enumerate(self.names):
            self.select[columns[name], g] = 1.0
        self.latent_hw = latent_hw
        self.guided = guided  # classifier-free guidance: batch = [uncond; cond]
        self.reset()

    def reset(self) -> None:
        self.total: torch.Tensor | None = None  # (B, G, h, w) running sum
        self.count = 0

    def record(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        bh, n, t = probs.shape  # (B*H, N, T)
        b = bh // heads
        p = probs.view(b, heads, n, t)
        if self.guided:
            p = p[b // 2 :]  # the conditional half
        sel = p.float() @ self.select  # (Bc, H, N, G)
        sel = sel.mean(1)  # (Bc, N, G)
        h, w = layer_grid(n, self.latent_hw)
        maps = sel.transpose(1, 2).reshape(sel.shape[0], len(self.names), h, w)  # (Bc, G, h, w)
        if (h, w) != tuple(self.latent_hw):
            maps = F.interpolate(maps, size=self.latent_hw, mode="bilinear", align_corners=False)
        self.total = maps if self.total is None else self.total + maps
        self.count += 1

    def maps(self) -> dict[str, torch.Tensor]:
        """{group: (B, h, w)} mean maps on the CPU; empty if nothing was recorded."""
        if self.total is None:
            return {}
        mean = (self.total / self.count).cpu()  # (B, G, h, w)
        return {name: mean[:, g] for g, name in enumerate(self.names)}


# Anchors of a jet-like colour map: low attention blue, high red.
_ANCHORS = np.array(
    [[0, 0, 128], [0, 0, 255], [0, 255, 255], [255, 255, 0], [255, 0, 0], [128, 0, 0]], float
)


def colorize(heat: np.ndarray) -> np.ndarray:
    """(h, w) values in [0, 1] -> (h, w, 3) uint8 colours."""
    x = np.clip(heat, 0.0, 1.0) * (len(_ANCHORS) - 1)
    stops = np.arange(len(_ANCHORS))
    rgb = [np.interp(x, stops, _ANCHORS[:, c]) for c in range(3)]
    return np.stack(rgb, axis=-1).astype(np.uint8)


def overlay(
    image: Image.Image, heat: torch.Tensor, lo: float, hi: float, alpha: float = 0.5
) -> Image.Image:
    """The map (h, w), scaled from [lo, hi] to the colour map, blended over the image."""
    m = (heat.float().numpy() - lo) / max(hi - lo, 1e-12)
    up = Image.fromarray((np.clip(m, 0.0, 1.0) * 255).astype(np.uint8)).resize(
        image.size, Image.BICUBIC
    )
    colour = Image.fromarray(colorize(np.asarray(up, dtype=np.float64) / 255.0))
    return Image.blend(image.convert("RGB"), colour, alpha)


def shared_range(maps: dict[str, torch.Tensor]) -> tuple[float, float]:
    """One [lo, hi] for every map of a figure, from 0: the groups' maps compare by colour, and
    a near-uniform map (attention spread over 77 tokens is about 0.013 everywhere) stays one
    flat colour rather than being stretched to look confident."""
    hi = max((float(m.max()) for m in maps.values()), default=0.0)
    return 0.0, max(hi, 1e-6)


def colour_bar(width: int, height: int, lo: float, hi: float) -> Image.Image:
    """A horizontal bar of the colour map from lo (left) to hi (right), with both values."""
    ramp = np.linspace(0.0, 1.0, width)[None, :].repeat(height, 0)
    bar = Image.new("RGB", (width, height * 2), "white")
    bar.paste(Image.fromarray(colorize(ramp)), (0, 0))
    draw, font = ImageDraw.Draw(bar), ImageFont.load_default()
    draw.text((2, height + 2), f"{lo:.3f}", fill="black", font=font)
    right = f"{hi:.3f} (attention probability; 1/77 = {1 / 77:.3f})"
    draw.text((max(2, width - 6 * len(right) - 2), height + 2), right, fill="black", font=font)
    return bar


def attention_figure(
    image: Image.Image, maps: dict[str, torch.Tensor], labels: dict[str, str]
) -> Image.Image:
    """One row: the image, then each group's overlay on one shared scale, each captioned with
    its mean and range; below, the colour bar of that scale."""
    side = max(256, image.width)
    h = round(image.height * side / image.width)
    base = image.convert("RGB").resize((side, h), Image.BICUBIC)
    lo, hi = shared_range(maps)
    tiles = [("image", base)]
    for name, m in maps.items():
        text = f"{labels.get(name, name)}  mean {float(m.mean()):.3f}, {float(m.min()):.3f}"
        tiles.append((f"{text}-{float(m.max()):.3f}", overlay(base, m, lo, hi)))
    font = ImageFont.load_default()
    cap, bar_h = 18, 12
    fig = Image.new("RGB", (side * len(tiles), h + cap + 2 * bar_h), "white")
    draw = ImageDraw.Draw(fig)
    for i, (text, tile) in enumerate(tiles):
        fig.paste(tile, (i * side, 0))
        draw.text((i * side + 4, h + 3), text, fill="black", font=font)
    if len(tiles) > 1:  # under the maps only: the photo has no scale
        fig.paste(colour_bar(side * (len(tiles) - 1), bar_h, lo, hi), (side, h + cap))
    return fig


def save_attention(
    folder: Path,
    images: list[Image.Image],
    maps: dict[str, torch.Tensor],
    labels: dict[str, str],
) -> list[str]:
    """Write <folder>/<i>.png figures and maps.safetensors {group: (n, h, w)}; return names."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous().float() for k, v in maps.items()}, str(folder / "maps.safetensors")
    )
    names = []
    for i, img in enumerate(images):
        attention_figure(img, {k: v[i] for k, v in maps.items()}, labels).save(folder / f"{i}.png")
        names.append(f"{i}.png")
    return names
