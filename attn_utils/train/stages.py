"""What each stage trains, and the result it hands to the next."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from attn_utils.config import STAGE_TITLES, ConfigError, StageConfig
from attn_utils.method.tokens import (
    PlaceholderEmbedding,
    install_placeholder_embedding,
    remove_placeholder_embedding,
    set_embeddings,
    table_rows,
    table_width,
)
from attn_utils.render.lora import load_unet_lora
from attn_utils.runfiles import (
    EMBEDS_FILE,
    STAGE_INFO,
    TEXT_ENCODER_DIR,
    UNET_LORA_DIR,
    load_embeddings,
    load_text_encoder,
    load_weights_into,
    save_embeddings,
    save_text_encoder,
    stage_dir,
    stage_info,
    write_dir_atomically,
)
from attn_utils.train.lora import add_unet_lora, finish_lora, save_unet_lora


@dataclass
class StageParams:
    """The trainable tensors of one stage, by stable name, and the module DDP should wrap."""

    named: dict[str, torch.nn.Parameter]
    embedding: PlaceholderEmbedding | None  # stage 1 only
    lora: StageConfig | None = None  # the stage whose LoRA adapters the U-Net holds


def select_trainable(
    stage: int, unet, text_encoder, token_ids: list[int], tune_embedding: bool = False,
    lora: StageConfig | None = None, seed: int = 0,
) -> StageParams:  # fmt: skip
    """Freeze everything, then unfreeze exactly this stage's parameters (docs/method.md);
    `tune_embedding` adds [V]'s rows to a U-Net stage (TI+DB); `lora` (a stage with a
    LoRA rank) trains adapters on its targets instead of the weights (train/lora.py)."""
    for p in list(unet.parameters()) + list(text_encoder.parameters()):
        p.requires_grad_(False)
    emb = None
    if stage == 1 or tune_embedding:
        emb = install_placeholder_embedding(text_encoder, token_ids)
        emb.learned.requires_grad_(True)
    if stage == 1:
        return StageParams({"learned_embeds": emb.learned}, emb)
    if lora is not None and lora.lora_rank:
        named = add_unet_lora(unet, lora, seed)
    else:
        named = {
            n: p for n, p in unet.named_parameters() if stage == 3 or "attn2" in n
        }  # stage 2: to_q, to_k, to_v, to_out.0 of every cross-attention layer
        for p in named.values():
            p.requires_grad_(True)
        lora = None
    if emb is not None:
        named["learned_embeds"] = emb.learned
    return StageParams(named, emb, lora)


def finish_trainable(
    stage: int, params: StageParams, text_encoder, unet=None
) -> dict[str, torch.Tensor] | None:
    """Leave the models in their plain form, the stage's result folded in, all frozen.
    A LoRA stage's adapters are merged into the U-Net; returns them (diffusers' format)."""
    state = None
    if params.lora is not None:
        state = finish_lora(unet, params.lora)
    if params.embedding is not None:
        remove_placeholder_embedding(text_encoder, params.embedding)
    text_encoder.eval()  # --train_text_encoder put it in train mode
    for p in params.named.values():
        p.requires_grad_(False)
    return state


def save_stage_result(
    run_dir: Path,
    stage: int,
    tokens: list[str],
    unet,
    text_encoder,
    token_ids: list[int],
    info: dict,
    text_encoder_trained: bool = False,
    embedding_trained: bool = False,
    lora_state: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write stage_<k>/ atomically: the embedding file (stage 1, or a U-Net stage that trained
    it too), the U-Net or its LoRA (and the trained text encoder), then stage_info.json."""

    def write(tmp: Path) -> None:
        if stage == 1 or embedding_trained:
            rows = table_rows(text_encoder.get_input_embeddings(), token_ids)  # (k, dim)
            # SDXL: one row in each encoder's table, written as clip_l / clip_g
            save_embeddings(tmp / EMBEDS_FILE, tokens, rows, getattr(text_encoder, "widths", None))
        if lora_state is not None:  # diffusers' LoRA file, a few MB
            save_unet_lora(tmp / UNET_LORA_DIR, lora_state)
        elif stage != 1:
            unet.save_pretrained(tmp / "unet", safe_serialization=True)
            if text_encoder_trained:
                save_text_encoder(tmp, text_encoder)
        (tmp / STAGE_INFO).write_text(json.dumps({"stage": stage, **info}, indent=2))

    return write_dir_atomically(stage_dir(run_dir, stage), write)


def load_stage_result(
    run_dir: Path, stage: int, tokens: list[str], unet, text_encoder, token_ids: list[int]
) -> None:
    """Fold a completed stage's result into the resident models."""
    d = stage_dir(run_dir, stage)
    if stage == 1 or (d / EMBEDS_FILE).is_file():  # a U-Net stage's: the embedding trained too
        dim = table_width(text_encoder.get_input_embeddings())
        data = load_embeddings(d / EMBEDS_FILE, dim, getattr(text_encoder, "widths", None))
        missing = [t for t in tokens if t not in data]
        if missing:
            raise ConfigError(f"{d / EMBEDS_FILE}: has no entry for {missing[0]!r}")
        set_embeddings(text_encoder, token_ids, torch.stack([data[t] for t in tokens]))
    if stage == 1:
        return
    if (d / UNET_LORA_DIR).is_dir():  # adapters trained on the U-Net before this stage
        load_unet_lora(unet, d / UNET_LORA_DIR)
        return
    weights = d / "unet" / "diffusion_pytorch_model.safetensors"
    load_weights_into(unet, weights, "U-Net", f"stage {stage} result")
    if (d / TEXT_ENCODER_DIR).is_dir():  # --train_text_encoder
        load_text_encoder(d / TEXT_ENCODER_DIR, text_encoder)


def superseded(run_dir: Path, stage: int) -> bool:
    """Does a later completed stage hold a full U-Net (which contains this stage's)? A later
    LoRA stage does not: its adapters stack on this stage's U-Net."""
    return stage >= 2 and any(
        stage_info(run_dir, j) is not None and (stage_dir(run_dir, j) / "unet").is_dir()
        for j in range(stage + 1, 4)
    )


def missing_stage_message(run_dir: Path, needed: int, requested: list[int]) -> str:
    stages = ",".join(map(str, requested))
    return (
        f"--stages {stages}: needs the {STAGE_TITLES[needed]} stage's result in "
        f"{stage_dir(run_dir, needed)}, which is missing; run stage {needed} first "
        f"(e.g. --stages {needed},{stages})"
    )
