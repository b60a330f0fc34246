"""The toy world's networks: SD-shaped VAE, text encoder and U-Net, the toy CLIP, and the
oracle's heads (attn_utils/toyworld/pretrain.py trains them)."""

from __future__ import annotations

from attn_utils.toyworld.world import CATEGORIES, COLOURS, PLACES, STYLES

SIZE = 64  # the world's image side; the VAE downsamples 4x to 16x16x4 latents


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,  # 3 levels -> 4x downsampling
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=SIZE,
        mid_block_add_attention=False,
    )


def _text_tower(tokenizer) -> dict:
    """The text transformer both the base model's encoder and the toy CLIP use."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def make_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(**_text_tower(tokenizer), hidden_act="gelu", projection_dim=64)
    )


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=SIZE // 4,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4, 4),  # head counts, as SD 2.1 names them
        cross_attention_dim=64,
        use_linear_projection=True,
        norm_num_groups=16,
        flip_sin_to_cos=True,
        freq_shift=0,
    )


def make_clip(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = _text_tower(tokenizer)  # CLIP's own activation (quick_gelu), unlike the base's
    vision = dict(
        image_size=SIZE,
        patch_size=8,
        hidden_size=96,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))


ORACLE_HEADS = {
    "place": list(PLACES),
    "style": list(STYLES),
    "category": list(CATEGORIES),
    "colour": list(COLOURS),
}
ORACLE_DENSE = ("category", "colour")  # detector-style heads (attn_utils/evaluate/oracle.py)
