"""SDXL-base shapes with random weights, for the GPU end-to-end check (bench/gpu_e2e.py sdxl).

The configs are stable-diffusion-xl-base-1.0's (unet/, text_encoder/, text_encoder_2/, vae/
config.json): a 2.57 B-parameter U-Net of three levels (no attention at 128x128 latents,
transformer depths 2 and 10 at 64x64 and 32x32: 70 cross-attention layers), CLIP ViT-L
(123 M) and OpenCLIP bigG with projection (695 M), and SD's VAE at 1024 px. Random weights
have the real shapes, so step time and memory match the real model; nothing is downloaded.
The tokenizers are attn_utils.tiny's (fewer, different ids: no shape or cost changes).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from attn_utils.tiny import SD_SCHEDULER
from bench.sd21_configs import CLIP_VOCAB, MAX_POSITIONS, VAE_SD21

UNET_SDXL = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10),
    attention_head_dim=(5, 10, 20),  # heads per block (head size 64)
    cross_attention_dim=2048,  # 768 + 1280: both encoders' hidden states side by side
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,  # 6 time ids x 256 + pooled 1280
    norm_num_groups=32,
    act_fn="silu",
    flip_sin_to_cos=True,
    freq_shift=0,
    upcast_attention=False,
)
# Both text configs keep CLIP's legacy ids (eos 2), as the released files do.
_TEXT = dict(vocab_size=CLIP_VOCAB, max_position_embeddings=MAX_POSITIONS, bos_token_id=0,
             eos_token_id=2, pad_token_id=1)  # fmt: skip
TEXT_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768,
              **_TEXT)  # fmt: skip
TEXT_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, hidden_act="gelu", projection_dim=1280,
              **_TEXT)  # fmt: skip
VAE_SDXL = {**VAE_SD21, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True}
SCHEDULER_SDXL = {**SD_SCHEDULER, "timestep_spacing": "leading"}  # EulerDiscreteScheduler


def save_sdxl_pipeline(out_dir: str | Path, seed: int = 0) -> Path:
    """A random-weight StableDiffusionXLPipeline of SDXL-base shapes on disk (reused when
    complete), initialised on the GPU where there is one."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from attn_utils.tiny import _make_tokenizer

    out_dir = Path(out_dir)
    if (out_dir / "model_index.json").is_file():
        return out_dir
    tmp = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**UNET_SDXL)
        te1 = CLIPTextModel(CLIPTextConfig(**TEXT_L))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**TEXT_G))
        vae = AutoencoderKL(**VAE_SDXL)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=te1, text_encoder_2=te2,
        tokenizer=_make_tokenizer(tmp / "tokenizer", "<|endoftext|>"),
        tokenizer_2=_make_tokenizer(tmp / "tokenizer_2", "!"), unet=unet,
        scheduler=EulerDiscreteScheduler(**SCHEDULER_SDXL), add_watermarker=False,
    )  # fmt: skip
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    tmp.rename(out_dir)
    return out_dir
