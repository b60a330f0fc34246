"""Cross-attention capture: explicit probabilities in attn2 layers only, always restored.

Self-attention (attn1) keeps whatever processor was installed (fused SDPA by default); only
the cross-attention layers, whose maps are (pixels x 77), compute explicit probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class Controller:
    """Decides what to keep from each cross-attention map; `active` False keeps nothing."""

    active = True

    def recorder(self, context: torch.Tensor) -> Controller | None:
        """Who records the maps of a forward whose text is `context` (B, T, D); None: the
        fused fallback. Gradient checkpointing reruns a forward in the backward pass, which
        must take the same path: here `active` must not change until that backward."""
        return self if self.active else None

    def record(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        raise NotImplementedError

    def reset(self) -> None:
        pass


class TokenStats(Controller):
    """Per-layer mean and unbiased variance over heads and pixels of selected token columns.

    `columns` (B, K) are token positions per sample: the placeholder(s) then the category.
    With `merge_last` m > 1, the last m columns (a category's sub-tokens) are averaged into
    one map before the statistics, so the output has K - m + 1 columns.
    Keyed by layer, so a gradient-checkpointing recompute overwrites instead of appending.
    """

    def __init__(self, merge_last: int = 1) -> None:
        self.columns: torch.Tensor | None = None
        self.merge_last = merge_last
        self.stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset(self) -> None:
        self.stats = {}

    def record(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        bh, n, t = probs.shape  # (B*H, N, T)
        b = bh // heads
        cols = self.columns.to(probs.device)
        if cols.shape[0] != b:
            cols = cols.expand(b, -1) if cols.shape[0] == 1 else cols
        idx = cols[:, None, None, :].expand(b, heads, n, cols.shape[1])
        sel = probs.view(b, heads, n, t).gather(-1, idx).float()  # (B, H, N, K)
        if self.merge_last > 1:
            m = self.merge_last
            sel = torch.cat([sel[..., :-m], sel[..., -m:].mean(-1, keepdim=True)], dim=-1)
        sel = sel.reshape(b, heads * n, -1)
        self.stats[layer] = (sel.mean(dim=1), sel.var(dim=1, unbiased=True))  # (B, K) each


class CrossAttnCaptureProcessor:
    """attn2 processor: softmax(QK^T)V with the probabilities handed to a controller."""

    def __init__(self, layer: str, controller: Controller, fallback) -> None:
        self.layer = layer
        self.controller = controller
        self.fallback = fallback  # the processor it replaced, used while the controller rests

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        temb=None,
        *args,
        **kwargs,
    ):
        ctx = encoder_hidden_states  # (B, T, D); None in self-attention
        recorder = None if ctx is None else self.controller.recorder(ctx)
        if recorder is None:
            return self.fallback(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        ndim = hidden_states.ndim
        if ndim == 4:
            b, ch, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, ch, h * w).transpose(1, 2)
        batch, seq, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query = attn.head_to_batch_dim(query)  # (B*H, N, d)
        key = attn.head_to_batch_dim(key)  # (B*H, T, d)
        value = attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)  # (B*H, N, T)
        recorder.record(self.layer, probs, attn.heads)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(b, ch, h, w)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def cross_attention_layers(unet) -> list[str]:
    """Processor keys of the cross-attention layers (attn2), in module order."""
    return [k for k in unet.attn_processors if ".attn2." in k or k.startswith("attn2.")]


@contextlib.contextmanager
def capture_cross_attention(unet, controller: Controller) -> Iterator[list[str]]:
    """Install capture processors on attn2 layers only; restore the previous ones on exit.

    With gradient checkpointing the backward pass reruns the forward: call backward inside
    this context, with each forward's Controller.recorder answer unchanged, or the
    recomputation takes the other path and torch refuses it.
    """
    previous = dict(unet.attn_processors)
    layers = cross_attention_layers(unet)
    if not layers:
        raise ValueError("this U-Net has no cross-attention (attn2) layers to capture")
    procs = dict(previous)
    for k in layers:
        procs[k] = CrossAttnCaptureProcessor(k.removesuffix(".processor"), controller, previous[k])
    unet.set_attn_processor(procs)
    try:
        yield layers
    finally:
        unet.set_attn_processor(previous)


def capture_if(wanted: bool, unet, controller: Controller):
    """capture_cross_attention when `wanted` (a regulariser weight is non-zero), else
    nothing: every layer keeps its fused kernel and no probabilities are materialised."""
    return capture_cross_attention(unet, controller) if wanted else contextlib.nullcontext([])
