"""Model configs for random-weight benchmarks: SD2.1-base shapes (docs/method.md), a small one.

Random weights have the real shapes, so step time and memory match the real model; nothing is
downloaded. `small` keeps SD2.1's structure (4 U-Net levels, 3 cross-attention down/up blocks,
linear projections, a 77-token CLIP text encoder with the full 49408 vocabulary, an 8x VAE) at a
size that runs a step in milliseconds on a CPU, for the smoke test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from attn_utils.tiny import SD_SCHEDULER

CLIP_VOCAB = 49408  # CLIP's BPE vocabulary; the placeholder token is appended as row 49408
MAX_POSITIONS = 77

# docs/method.md, "Architecture facts for random-weight benchmarks". 865.9 M parameters.
UNET_SD21 = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    attention_head_dim=(5, 10, 20, 20),  # legacy name: heads per block (head size 64)
    cross_attention_dim=1024,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    use_linear_projection=True,
    norm_num_groups=32,
    norm_eps=1e-5,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    downsample_padding=1,
    upcast_attention=False,
)
# 340.4 M parameters.
TEXT_SD21 = dict(
    vocab_size=CLIP_VOCAB,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=MAX_POSITIONS,
    hidden_act="gelu",
    projection_dim=512,
)
VAE_SD21 = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

# Scaled down for CPU smoke runs: same block types and depth of levels, tiny widths.
UNET_SMALL = {
    **UNET_SD21,
    "layers_per_block": 1,
    "block_out_channels": (32, 64, 64, 64),
    "attention_head_dim": (1, 2, 2, 2),  # head size 32
    "cross_attention_dim": 64,
    "norm_num_groups": 8,
}
TEXT_SMALL = {
    **TEXT_SD21,
    "hidden_size": 64,  # must equal the U-Net's cross_attention_dim
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "projection_dim": 64,
}
VAE_SMALL = {**VAE_SD21, "block_out_channels": (16, 32, 32, 32), "layers_per_block": 1}
VAE_SMALL["norm_num_groups"] = 8

CONFIGS = {
    "sd21": (UNET_SD21, TEXT_SD21, VAE_SD21),
    "small": (UNET_SMALL, TEXT_SMALL, VAE_SMALL),
}


@dataclass
class BenchModels:
    """Random-weight parts and the training prompt as ids, like Trainer holds them."""

    unet: torch.nn.Module
    text_encoder: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    input_ids: torch.Tensor  # (1, 77)
    token_ids: list[int]  # the placeholder token(s)
    columns: torch.Tensor  # (1, k + 1): placeholder position(s), then the category


def prompt_ids(placeholder_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """'<bos> a photo of a [V] dog <eos>' padded with '!' (id 0) like SD2.1's tokenizer."""
    bos, eos, a, photo, of, dog = 49406, 49407, 320, 1125, 539, 1929  # CLIP BPE ids
    row = [bos, a, photo, of, a, placeholder_id, dog, eos]
    ids = torch.tensor([row + [0] * (MAX_POSITIONS - len(row))], device="cpu")  # (1, 77)
    return ids, torch.tensor([[5, 6]], device="cpu")  # [V] at 5, its category at 6


def build_models(name: str, device: torch.device | str = "cpu", seed: int = 0) -> BenchModels:
    """Random-weight U-Net, text encoder, VAE and DDPM scheduler, built directly on `device`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_cfg, text_cfg, vae_cfg = CONFIGS[name]
    torch.manual_seed(seed)
    with torch.device(device):  # initialise in place: no host copy of 1.3 B parameters
        unet = UNet2DConditionModel(**unet_cfg)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(**text_cfg, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
        )
        vae = AutoencoderKL(**vae_cfg)
    # One placeholder row appended, as add_placeholder_tokens does with the real tokenizer.
    text_encoder.resize_token_embeddings(CLIP_VOCAB + 1, mean_resizing=False)
    ids, columns = prompt_ids(CLIP_VOCAB)
    ids, columns = ids.to(device), columns.to(device)  # as the Trainer places them
    for m in (unet, text_encoder, vae):
        m.requires_grad_(False)
    return BenchModels(
        unet, text_encoder.eval(), vae.eval(), DDPMScheduler(**SD_SCHEDULER), ids, [CLIP_VOCAB],
        columns,
    )  # fmt: skip


def bench_tokenizer():
    """A minimal CLIP tokenizer (bytes and specials only), for building pipelines offline."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    vocab = {t: i for i, t in enumerate(chars + [c + "</w>" for c in chars])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "vocab.json").write_text(json.dumps(vocab))
        (Path(d) / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer.from_pretrained(d, model_max_length=MAX_POSITIONS, pad_token="!")


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def save_pipeline(out_dir: str | Path, name: str = "sd21", seed: int = 0) -> Path:
    """A random-weight diffusers pipeline of CONFIGS[name] shapes on disk, for the real CLIs.

    The tokenizer is the tiny one of attn_utils.tiny (no download): prompts tokenise into
    fewer, different ids, which changes no shape and no cost. Reused when complete.
    """
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from attn_utils.tiny import _make_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = _make_tokenizer(tmp / "tokenizer")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    m = build_models(name, device, seed)  # initialised on the GPU: minutes faster than the CPU
    pipe = StableDiffusionPipeline(
        vae=m.vae, text_encoder=m.text_encoder, tokenizer=tokenizer, unet=m.unet,
        scheduler=DDPMScheduler(**SD_SCHEDULER), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(out_dir)
    return out_dir
