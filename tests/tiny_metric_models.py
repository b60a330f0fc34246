"""Tiny random-weight CLIP and DINO (ViT) models, saved with their processors: no download."""

from __future__ import annotations

from pathlib import Path

import torch

from attn_utils.tiny import _make_tokenizer

SIZE = 32  # pixels the tiny models see; their processors resize to it


def build_tiny_clip(path: Path, seed: int = 0) -> Path:
    """CLIPModel (hidden 32, 2 layers, 32 px, patch 8) + tokenizer + CLIPImageProcessor."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    if (path / "config.json").is_file():
        return path
    tok = _make_tokenizer(path / "_tok")
    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=len(tok),
            max_position_embeddings=77,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
            **small,
        ),
        vision_config=dict(image_size=SIZE, patch_size=8, **small),
        projection_dim=16,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(cfg)
    model.save_pretrained(str(path), safe_serialization=True)
    tok.save_pretrained(str(path))
    CLIPImageProcessor(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}
    ).save_pretrained(str(path))
    return path


def build_tiny_dino(path: Path, seed: int = 1) -> Path:
    """ViTModel (hidden 32, 2 layers, 32 px, patch 8) + a ViTImageProcessor config, as DINO is
    shipped on the Hub (the metrics ignore that config: docs/evaluation.md, Preprocessing)."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    if (path / "config.json").is_file():
        return path
    cfg = ViTConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=SIZE,
        patch_size=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ViTModel(cfg, add_pooling_layer=False)
    model.save_pretrained(str(path), safe_serialization=True)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}).save_pretrained(str(path))
    return path
