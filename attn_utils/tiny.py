"""Tiny random-weight Stable Diffusion pipeline and a procedural concept, for offline tests.

The model mirrors the *structure* of SD2.1-base (linear-projection transformer blocks, a
CLIP text encoder, a byte-level BPE CLIP tokenizer, an 8x VAE) at a size that runs on a CPU
in well under a second per step, so the whole AttnDreamBooth pipeline can be exercised
without downloading anything. `family` picks the traits of SD 2.1 (v-prediction) or SD 1.5
instead (FAMILIES).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageChops, ImageDraw

from attn_utils.argparsing import Parser

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

TINY_RESOLUTION = 128
TINY_CATEGORY = "sloth"
# Stable Diffusion's DDPM training schedule (docs/method.md), shared with the SD2.1-shape benchmark.
SD_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    prediction_type="epsilon",
    clip_sample=False,
    steps_offset=1,
)


@dataclass(frozen=True)
class Family:
    """The traits that tell a base family apart, as overrides of the tiny SD2.1-base model."""

    unet: dict = field(default_factory=dict)
    text: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)  # scheduler_config.json keys, _class_name too
    pad_token: str = "!"  # SD 2's tokenizer pads with "!"
    sdxl: bool = False  # two text encoders and a text_time U-Net (_build_sdxl)


# The real models' values are in the comments; widths are scaled down like the rest.
FAMILIES = {
    # stable-diffusion-2-1-base, the paper's: 512 px, epsilon, OpenCLIP ViT-H (gelu),
    # linear projections, heads per block (5, 10, 20, 20).
    "sd21-base": Family(),
    # stable-diffusion-2-1: the same networks trained at 768 px for v-prediction, with attention
    # upcast to fp32 and a DDIM scheduler config.
    "sd21-v": Family(
        unet={"upcast_attention": True},
        scheduler={
            "_class_name": "DDIMScheduler",
            "prediction_type": "v_prediction",
            "skip_prk_steps": True,
        },
    ),
    # stable-diffusion-v1-5: CLIP ViT-L text encoder (768 wide, quick_gelu, pads with its
    # end token), 8 heads in every block (an int), 1x1-conv projections, a PNDM config.
    "sd15": Family(
        unet={"attention_head_dim": 8, "use_linear_projection": False, "cross_attention_dim": 24},
        text={"hidden_size": 24, "hidden_act": "quick_gelu", "projection_dim": 24},
        scheduler={"_class_name": "PNDMScheduler", "skip_prk_steps": True},
        pad_token="<|endoftext|>",
    ),
    # stable-diffusion-xl-base-1.0 (_build_sdxl): CLIP ViT-L (768, quick_gelu, pads with its
    # end token) and OpenCLIP bigG (1280, gelu, projection 1280, pads with "!"), CLIP's legacy
    # eos_token_id 2 in both; a 3-level U-Net (transformer depths 1, 2, 10 -> 1, 1, 2) with
    # addition_embed_type "text_time"; an Euler scheduler config, VAE scaling 0.13025.
    "sdxl": Family(
        scheduler={"_class_name": "EulerDiscreteScheduler", "timestep_spacing": "leading"},
        pad_token="<|endoftext|>",
        sdxl=True,
    ),
}
SDXL_WIDTHS = (24, 40)  # the two text encoders' hidden sizes (real: 768, 1280)
SDXL_POOLED = 32  # the second encoder's projection (real: 1280)
SDXL_TIME_DIM = 8  # addition_time_embed_dim (real: 256)

# Whole words that become single tokens, so prompts like "a photo of a sloth" tokenise as in SD.
_WORDS = (
    "a photo of an the in on with painting watercolor sloth toy teddy bear dog cat knight armor "
    "wearing hat beach forest city sitting sketch oil drawing style red blue green by and at "
    "picture front top snow mountain pencil art portrait background rendering is"
).split()
# Categories that deliberately split into several sub-tokens (prefix pieces + final piece),
# to exercise code that must handle multi-token class nouns.
_SPLIT_WORDS = {"wombat": ("wom", "bat"), "hedgehog": ("hedge", "hog")}
_EOW = "</w>"


def _byte_chars() -> list[str]:
    """The 256 characters byte-level BPE uses for bytes, in CLIP's vocab order ("!" first)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    # The other bytes (controls, space, ...) are mapped to code points from 256 upward.
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(256 - len(printable))]


def _piece_merges(piece: str, final: bool) -> list[tuple[str, str]]:
    """Merges joining every substring of `piece`, for every split point.

    With all splits present, BPE can always finish merging a word into one token whatever
    other merges fire first, so no careful ordering of merge ranks is needed.
    """
    merges = []
    n = len(piece)
    for length in range(2, n + 1):
        for i in range(n - length + 1):
            j = i + length
            for k in range(i + 1, j):
                right = piece[k:j] + (_EOW if final and j == n else "")
                merges.append((piece[i:k], right))
    return merges


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Build a CLIP-style vocab (bytes, bytes</w>, merged tokens, specials) and its merges."""
    chars = _byte_chars()
    tokens = chars + [c + _EOW for c in chars]  # same layout as CLIP, so "!" has id 0
    pieces = [(w, True) for w in _WORDS]
    for parts in _SPLIT_WORDS.values():
        pieces += [(p, False) for p in parts[:-1]] + [(parts[-1], True)]
    merges: list[tuple[str, str]] = []
    seen_merges: set[tuple[str, str]] = set()
    seen_tokens = set(tokens)
    for piece, final in pieces:
        for merge in _piece_merges(piece, final):
            if merge in seen_merges:
                continue
            seen_merges.add(merge)
            merges.append(merge)
            if merge[0] + merge[1] not in seen_tokens:
                seen_tokens.add(merge[0] + merge[1])
                tokens.append(merge[0] + merge[1])
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, merges


def _make_tokenizer(tok_dir: Path, pad_token: str = "!") -> CLIPTokenizer:
    """Write vocab.json + merges.txt to tok_dir and load a CLIPTokenizer from them."""
    # Heavy libraries are imported lazily so that draw_concept stays cheap to import.
    from transformers import CLIPTokenizer

    vocab, merges = _vocab_and_merges()
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (tok_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    # model_max_length=77 is needed: the default (huge) max length breaks truncation.
    return CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=77, pad_token=pad_token)


def _build_into(path: Path, seed: int, family: Family) -> None:
    """Construct all components with fixed seeds and save the pipeline to `path`."""
    import diffusers
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = _make_tokenizer(path / "tokenizer", family.pad_token)
    if family.sdxl:
        return _build_sdxl(path, seed, family, tokenizer)
    # Each component gets its own seed so its weights do not depend on the others' sizes.
    torch.manual_seed(seed)
    unet_keys = dict(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),  # legacy name: these are head counts, as in SD2.1
        cross_attention_dim=32,
        use_linear_projection=True,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    unet = UNet2DConditionModel(**{**unet_keys, **family.unet})
    torch.manual_seed(seed + 1)
    vae = _tiny_vae()
    torch.manual_seed(seed + 2)
    text_keys = dict(
        vocab_size=len(tokenizer),
        hidden_size=32,  # must equal the U-Net's cross_attention_dim
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**text_keys, **family.text}))
    sched_keys = {**SD_SCHEDULER, **family.scheduler}
    sched_cls = getattr(diffusers, sched_keys.pop("_class_name", "DDPMScheduler"))
    scheduler = sched_cls.from_config(sched_keys)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(path), safe_serialization=True)
    # Schedulers drop keys they do not take; keep the real configs' full sets for sampler swaps.
    sched_cfg_path = path / "scheduler" / "scheduler_config.json"
    sched_cfg = json.loads(sched_cfg_path.read_text())
    sched_cfg.update({**sched_keys, "set_alpha_to_one": False})
    sched_cfg_path.write_text(json.dumps(sched_cfg, indent=2, sort_keys=True) + "\n")


def _tiny_vae(scaling_factor: float = 0.18215, **extra):
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # 4 levels -> 8x downsampling like SD
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_RESOLUTION,
        scaling_factor=scaling_factor,
        **extra,
    )


def _build_sdxl(path: Path, seed: int, family: Family, tokenizer) -> None:
    """The SDXL-shaped tiny pipeline (FAMILIES["sdxl"]), saved to `path`."""
    import diffusers
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer_2 = _make_tokenizer(path / "tokenizer_2", "!")
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=TINY_RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(16, 32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 1, 2),
        attention_head_dim=(2, 2, 4),  # head counts, as SDXL's (5, 10, 20)
        cross_attention_dim=sum(SDXL_WIDTHS),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=SDXL_TIME_DIM,
        projection_class_embeddings_input_dim=6 * SDXL_TIME_DIM + SDXL_POOLED,
        norm_num_groups=8,
        flip_sin_to_cos=True,
        freq_shift=0,
    )
    torch.manual_seed(seed + 1)
    vae = _tiny_vae(scaling_factor=0.13025, force_upcast=True)
    common = dict(vocab_size=len(tokenizer), max_position_embeddings=77, num_hidden_layers=2,
                  num_attention_heads=2, bos_token_id=0, eos_token_id=2,
                  pad_token_id=1)  # fmt: skip
    torch.manual_seed(seed + 2)
    w1, w2 = SDXL_WIDTHS
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=w1, intermediate_size=2 * w1, hidden_act="quick_gelu", projection_dim=w1,
        **common,
    ))  # fmt: skip
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        hidden_size=w2, intermediate_size=2 * w2, hidden_act="gelu", projection_dim=SDXL_POOLED,
        **common,
    ))  # fmt: skip
    sched_keys = {**SD_SCHEDULER, **family.scheduler}
    scheduler = getattr(diffusers, sched_keys.pop("_class_name")).from_config(sched_keys)
    StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler, add_watermarker=False,
    ).save_pretrained(str(path), safe_serialization=True)  # fmt: skip


def build_tiny_model(out_dir: str | Path, seed: int = 0, family: str = "sd21-base") -> Path:
    """Write a tiny random diffusers pipeline shaped like a FAMILIES entry to out_dir (reused
    if complete; the family is not checked then)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {sorted(FAMILIES)}, got {family!r}")
    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()
    elif out_dir.exists():
        raise FileExistsError(f"{out_dir} exists but holds no complete model")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build in a sibling temp dir and rename, so readers never see a half-written model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state untouched
            _build_into(tmp, seed, FAMILIES[family])
        try:
            os.rename(tmp, out_dir)
        except OSError:
            # Another process may have finished the same model first; theirs is as good.
            if not (out_dir / "model_index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _draw_creature(px: int) -> Image.Image:
    """Draw the concept (grey striped blob with a round head and two dark eyes) on RGBA."""
    layer = Image.new("RGBA", (px, px), (0, 0, 0, 0))
    d = ImageDraw.Draw(layer)
    u = px / 100  # drawing units: the creature is designed on a 100x100 grid
    grey, dark = (128, 126, 132, 255), (70, 66, 74, 255)
    for fx in (32, 58):  # feet
        d.ellipse([fx * u, 84 * u, (fx + 12) * u, 94 * u], fill=dark)
    body = [22 * u, 38 * u, 78 * u, 90 * u]
    d.ellipse(body, fill=grey)
    # Stripes: a stripe mask clipped to the body ellipse, then filled with the dark colour.
    stripes, body_mask = Image.new("L", (px, px), 0), Image.new("L", (px, px), 0)
    for y in range(46, 90, 9):
        ImageDraw.Draw(stripes).rectangle([0, y * u, px, (y + 4) * u], fill=255)
    ImageDraw.Draw(body_mask).ellipse(body, fill=255)
    layer.paste(dark, mask=ImageChops.multiply(stripes, body_mask))
    for ex in (30, 60):  # ears
        d.ellipse([ex * u, 8 * u, (ex + 10) * u, 20 * u], fill=dark)
    d.ellipse([27 * u, 12 * u, 73 * u, 52 * u], fill=grey)  # head
    for ex in (37, 55):  # eyes with a small highlight
        d.ellipse([ex * u, 24 * u, (ex + 9) * u, 34 * u], fill=(20, 18, 22, 255))
        d.ellipse([(ex + 2) * u, 26 * u, (ex + 4.5) * u, 28.5 * u], fill=(235, 235, 235, 255))
    d.ellipse([46 * u, 38 * u, 54 * u, 43 * u], fill=(200, 120, 130, 255))  # nose
    return layer


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A random two-colour gradient with noise and a few faint shapes, like a varied scene."""
    c0, c1 = rng.uniform(40, 240, 3), rng.uniform(40, 240, 3)
    t = np.linspace(0.0, 1.0, size)[:, None, None]
    img = c0 * (1 - t) + c1 * t + rng.normal(0, 6, (size, size, 3))
    bg = Image.fromarray(np.clip(np.broadcast_to(img, (size, size, 3)), 0, 255).astype(np.uint8))
    d = ImageDraw.Draw(bg)
    for _ in range(int(rng.integers(2, 6))):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(size / 16, size / 5)
        color = tuple(int(v) for v in rng.uniform(30, 230, 3))
        d.ellipse([x - r, y - r, x + r, y + r], fill=color)
    return bg


def draw_concept(out_dir: str | Path, n_images: int = 5, size: int = 160, seed: int = 0) -> Path:
    """Write n_images JPEGs (0.jpg ...) of one procedural creature in varied poses and scenes."""
    if size < TINY_RESOLUTION:
        raise ValueError(f"size must be >= {TINY_RESOLUTION}, got {size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_images):
        img = _background(rng, size)
        px = int(size * rng.uniform(0.45, 0.75))  # scale of the subject
        creature = _draw_creature(px).rotate(
            float(rng.uniform(-25, 25)), resample=Image.BICUBIC, expand=True
        )
        x = int(rng.integers(0, max(1, size - creature.width + 1)))
        y = int(rng.integers(0, max(1, size - creature.height + 1)))
        img.paste(creature, (x, y), creature)
        img.convert("RGB").save(out_dir / f"{i}.jpg", quality=95)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """CLI: write DIR/base_model and DIR/concept and print both paths."""
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--images", type=int, default=5, help="number of concept images")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--family", choices=sorted(FAMILIES), default="sd21-base")
    args = parser.parse_args(argv)
    print(build_tiny_model(args.out / "base_model", seed=args.seed, family=args.family))
    print(draw_concept(args.out / "concept", n_images=args.images, seed=args.seed))


if __name__ == "__main__":
    main()
