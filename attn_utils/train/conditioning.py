"""What the U-Net is conditioned on in a micro-step: the text, and on SDXL the pooled text
embedding and the per-image time ids (docs/sdxl.md). SD 1.x / 2.x use the text alone."""

from __future__ import annotations

import torch

from attn_utils.sdxl import added_cond, is_sdxl


def encode_text(text_encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden (B, 77, D), pooled (B, P) on SDXL, else None) of the ids."""
    out = text_encoder(ids)
    return out[0], (out[1] if is_sdxl(text_encoder) else None)


def split_batch(batch) -> tuple[object, torch.Tensor | None]:
    """(pixels or pool indices, SDXL time ids (B, 6) or None) of a loader batch."""
    if isinstance(batch, dict):
        return batch["pixels"], batch["time_ids"]
    return batch, None


def unet_cond(pooled, time_ids, pool, batch, n: int) -> dict | None:
    """The U-Net's added_cond_kwargs (SDXL) for n samples, None for SD: the time ids come
    with the batch, or from the latent pool's entries (`batch` holds their indices)."""
    if pooled is None:
        return None
    if time_ids is None:
        time_ids = pool.time_ids[batch.to(pool.time_ids.device)]
    return added_cond(pooled, time_ids, n)
