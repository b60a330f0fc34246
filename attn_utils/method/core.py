"""CoRe's context regularisation (Wu et al., arXiv 2408.15914): the math of its stage 1.

A regularisation prompt ("An impressionist painting of a {}") is filled twice: with the learned
token(s) [V] (prompt_v) and with the category word(s) (prompt_c). The *context* tokens, everything
but [V] or the category, up to and including the end-of-text token, should mean the same in both:

- context embedding loss: 1 - cosine similarity of the text encoder's outputs at the aligned
  context positions;
- context attention loss: MSE between the two prompts' per-token cross-attention means;
- norm hold: from step 120 to 180 the learned vectors are rescaled to their norm at step 120.

[V] may be k >= 1 tokens and the category c_len >= 1 tokens: after the span the context of
prompt_c sits shifted by c_len - k, which the alignment here accounts for.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from attn_utils.method.capture import Controller
from attn_utils.method.losses import denoising_loss
from attn_utils.method.step import noisy_latents

CLIP_EOT_ID = 49407  # <|endoftext|> of the CLIP tokenizer (SD 1.x also pads with it)
NORM_HOLD_START = 120  # the step whose norm is recorded (the authors' recipe)
NORM_HOLD_END = 180  # the last step after which the vectors are rescaled


def _ids(ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """Token ids as a 1-D LongTensor on the CPU (positions are found on the host, once)."""
    t = torch.as_tensor(ids, dtype=torch.long, device="cpu")
    if t.ndim != 1:
        raise ValueError(f"token ids must be one prompt (1-D), got shape {tuple(t.shape)}")
    return t


def context_positions(
    ids_v: torch.Tensor | Sequence[int],
    ids_c: torch.Tensor | Sequence[int],
    v_start: int,
    k: int,
    c_len: int,
    eot_v: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Aligned context positions (pos_v, pos_c), two LongTensors (P,), P = eot_v - k + 1.

    prompt_v holds [V] at v_start .. v_start+k-1 and its end-of-text token at eot_v; prompt_c
    holds the category at v_start .. v_start+c_len-1. Context: 0 .. v_start-1 (start-of-text
    included) and v_start+k .. eot_v in prompt_v; the same before the span and shifted by
    c_len - k after it in prompt_c. Raises ValueError unless ids_v[pos_v] == ids_c[pos_c].
    """
    ids_v, ids_c = _ids(ids_v), _ids(ids_c)
    if k < 1 or c_len < 1:
        raise ValueError(f"[V] and the category need at least one token (k={k}, c_len={c_len})")
    if not (1 <= v_start and v_start + k <= eot_v < len(ids_v)):
        raise ValueError(
            f"[V] at {v_start}..{v_start + k - 1} must lie between the start-of-text token (0) "
            f"and the end-of-text token ({eot_v}) of a {len(ids_v)}-token prompt"
        )
    before = torch.arange(v_start, device="cpu")  # host-side, as the ids: the caller moves them
    after_v = torch.arange(v_start + k, eot_v + 1, device="cpu")
    after_c = after_v + (c_len - k)
    if after_c[-1] >= len(ids_c):
        raise ValueError(
            f"prompt_c is cut short: its end-of-text token would sit at {int(after_c[-1])} "
            f"of {len(ids_c)} positions"
        )
    pos_v = torch.cat([before, after_v])  # (P,)
    pos_c = torch.cat([before, after_c])  # (P,)
    bad = (ids_v[pos_v] != ids_c[pos_c]).nonzero().flatten()
    if len(bad):
        i = int(bad[0])
        raise ValueError(
            f"context tokens differ: prompt_v[{int(pos_v[i])}] = {int(ids_v[pos_v[i]])} but "
            f"prompt_c[{int(pos_c[i])}] = {int(ids_c[pos_c[i]])}; the two prompts must be the "
            "same template filled with [V] and with the category"
        )
    return pos_v, pos_c


def find_span(ids: torch.Tensor | Sequence[int], span: Sequence[int]) -> int:
    """Index of the first occurrence of the contiguous token run `span` in `ids`."""
    seq, n = _ids(ids).tolist(), len(span)
    for i in range(len(seq) - n + 1):
        if seq[i : i + n] == list(span):
            return i
    raise ValueError(f"tokens {list(span)} do not occur in the prompt")


def context_positions_from_ids(
    ids_v: torch.Tensor | Sequence[int],
    ids_c: torch.Tensor | Sequence[int],
    v_ids: Sequence[int],
    c_ids: Sequence[int],
    eot_id: int = CLIP_EOT_ID,
) -> tuple[torch.Tensor, torch.Tensor]:
    """context_positions with the spans found from the ids: [V]'s token ids `v_ids` (k,),
    the category's sub-token ids `c_ids` (c_len,), both without start/end tokens.

    [V] is its first occurrence in prompt_v; the category must start at the same position in
    prompt_c; the end of text is the first `eot_id` after [V].
    """
    ids_v, ids_c = _ids(ids_v), _ids(ids_c)
    v_start, k, c_len = find_span(ids_v, v_ids), len(v_ids), len(c_ids)
    if ids_c[v_start : v_start + c_len].tolist() != list(c_ids):
        raise ValueError(
            f"prompt_c does not hold the category {list(c_ids)} at {v_start}, where prompt_v "
            "holds [V]"
        )
    eot_v = v_start + k + find_span(ids_v[v_start + k :], [eot_id])
    return context_positions(ids_v, ids_c, v_start, k, c_len, eot_v)


def _per_sample(pos: torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    """Positions (P,) or (1, P) or (B, P) as (B, P) on `device`."""
    pos = torch.as_tensor(pos, dtype=torch.long, device=device)
    pos = pos.unsqueeze(0) if pos.ndim == 1 else pos
    return pos.expand(batch, -1) if pos.shape[0] == 1 else pos


class ContextMeans(Controller):
    """Per attn2 layer, the mean over heads and pixels of the attention at `positions`.

    `positions` (P,) or (B, P): the context positions of the prompt in this forward (rows of a
    batch may differ, e.g. prompt_v and prompt_c stacked in one batch of 2B). `means[layer]`
    is (B, P) in fp32 with its graph kept (a training loss). Keyed by layer, so a
    gradient-checkpointing recompute overwrites. For the two forwards, use two instances or
    `take()` the first forward's means before the second.

    Several forwards before one backward (core_losses): `watch` each one's text tensor and
    set `active` False; only those forwards record, each into its own dict. The choice
    follows the forward's input, not the time it runs, so under gradient checkpointing the
    recompute of each block in the backward pass takes the path its forward took.
    """

    def __init__(self, positions: torch.Tensor | None = None) -> None:
        self.positions = positions
        self.means: dict[str, torch.Tensor] = {}
        self.watched: list[tuple[torch.Tensor, _Watched]] = []  # [(text (B, T, D), its recorder)]

    def reset(self) -> None:
        self.means, self.watched = {}, []

    def take(self) -> dict[str, torch.Tensor]:
        """The recorded means; the controller starts empty again."""
        means, self.means = self.means, {}
        return means

    def watch(self, context: torch.Tensor, positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Record every forward whose text is this very tensor `context` (B, T, D) at
        `positions` (P,) or (B, P); returns the dict its {layer: (B, P)} means fill."""
        watched = _Watched(positions)
        self.watched.append((context, watched))
        return watched.means

    def recorder(self, context: torch.Tensor) -> Controller | None:
        for text, watched in self.watched:
            if text is context:
                return watched
        return super().recorder(context)

    def record(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        if self.positions is None:
            raise ValueError("ContextMeans.positions is not set")
        self.means[layer] = _context_means(probs, heads, self.positions)


class _Watched(Controller):
    """The means of one watched forward. The loss holds the forward's own; a recompute's
    copy is dropped, or its graph (each layer's probabilities) would outlive the backward."""

    def __init__(self, positions: torch.Tensor) -> None:
        self.positions = positions
        self.means: dict[str, torch.Tensor] = {}

    def record(self, layer: str, probs: torch.Tensor, heads: int) -> None:
        mean = _context_means(probs, heads, self.positions)  # the recompute needs the same ops
        self.means.setdefault(layer, mean)


def _context_means(probs: torch.Tensor, heads: int, positions: torch.Tensor) -> torch.Tensor:
    """(B*H, N, T) attention probabilities -> (B, P) fp32 means over heads and pixels at
    `positions` (P,) or (B, P)."""
    bh, n, t = probs.shape  # (B*H, N, T)
    b = bh // heads
    pos = _per_sample(positions, b, probs.device)  # (B, P)
    idx = pos[:, None, None, :].expand(b, heads, n, pos.shape[1])
    sel = probs.view(b, heads, n, t).gather(-1, idx).float()  # (B, H, N, P)
    return sel.mean(dim=(1, 2))  # (B, P)


def context_embedding_loss(
    h_v: torch.Tensor, h_c: torch.Tensor, pos_v: torch.Tensor, pos_c: torch.Tensor
) -> torch.Tensor:
    """Mean over batch and context positions of 1 - cos(h_v[pos_v], h_c[pos_c]), in fp32.

    h_v, h_c (B, T, D): the text encoder's last hidden states of prompt_v and prompt_c;
    pos_v, pos_c (P,) or (B, P): aligned context positions (context_positions).
    """
    b, _, d = h_v.shape
    pv = _per_sample(pos_v, b, h_v.device)  # (B, P)
    pc = _per_sample(pos_c, b, h_c.device)  # (B, P)
    if pv.shape != pc.shape:
        raise ValueError(f"unaligned positions: {tuple(pv.shape)} vs {tuple(pc.shape)}")
    ev = h_v.float().gather(1, pv[..., None].expand(-1, -1, d))  # (B, P, D)
    ec = h_c.float().gather(1, pc[..., None].expand(-1, -1, d))  # (B, P, D)
    return (1 - F.cosine_similarity(ev, ec, dim=-1)).mean()  # (B, P) -> ()


def context_attention_loss(
    means_v: dict[str, torch.Tensor], means_c: dict[str, torch.Tensor]
) -> torch.Tensor:
    """CoRe's context attention loss from two ContextMeans recordings, each {layer: (B, P)}.

    Per layer and sample, the MSE over the P context positions; summed over the batch;
    averaged over layers. No stop-gradient on prompt_c: it holds no learned token.
    """
    if not means_v or set(means_v) != set(means_c):
        raise ValueError(
            f"the two forwards recorded different layers: {len(means_v)} vs {len(means_c)}"
        )
    total = sum(((means_v[k] - means_c[k]) ** 2).mean(dim=-1).sum() for k in means_v)
    return total / len(means_v)


def holds_norm(step: int, start: int = NORM_HOLD_START, end: int = NORM_HOLD_END) -> bool:
    """Whether the norm is held after optimiser step `step` (1-based): start <= step <= end.

    The norm is recorded after step `start` (where rescaling is then a no-op).
    """
    return start <= step <= end


def record_norm(vectors: torch.Tensor) -> torch.Tensor:
    """L2 norm of each learned vector: (k, D) -> (k,), detached."""
    return vectors.detach().float().norm(dim=-1)


@torch.no_grad()
def rescale_to(vectors: torch.Tensor, norms: torch.Tensor) -> None:
    """Scale each learned vector (k, D), in place, to its norm in `norms` (k,)."""
    now = vectors.float().norm(dim=-1).clamp_min(1e-12)  # (k,)
    scale = norms.to(now.device) / now  # (k,)
    vectors.mul_(scale.unsqueeze(-1).to(vectors.dtype))


class NormHold:
    """The norm hold as one call after each optimiser step: record at `start`, rescale
    after each step in [start, end].

    `norms` is state: a run resumed inside the window must restore it (or it holds nothing).
    """

    def __init__(self, start: int = NORM_HOLD_START, end: int = NORM_HOLD_END) -> None:
        self.start, self.end = start, end
        self.norms: torch.Tensor | None = None  # (k,), set after step `start`

    def after_step(self, step: int, vectors: torch.Tensor) -> None:
        """Call after optimiser step `step` (1-based) with the learned vectors (k, D)."""
        if step == self.start:
            self.norms = record_norm(vectors)
        if holds_norm(step, self.start, self.end) and self.norms is not None:
            rescale_to(vectors, self.norms)


def core_losses(
    unet, scheduler, latents: torch.Tensor, text: torch.Tensor, gen: torch.Generator,
    h_v: torch.Tensor, h_c: torch.Tensor, pos_v: torch.Tensor, pos_c: torch.Tensor,
    means: ContextMeans, embedding_weight: float, attention_weight: float,
    noise_offset: float = 0.0, channels_last: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """(denoising MSE, CoRe's regulariser) of one stage-1 micro-batch.

    latents (B, 4, h, w); text (1 or B, 77, D), the training prompt's encoding; h_v, h_c
    (1, 77, D), a regularisation prompt with [V] and with the category; pos_v, pos_c (P,) their
    aligned context positions. The same noisy latents and timesteps then go through the U-Net
    with h_v and with h_c, `means` (installed by capture_cross_attention; call the backward
    inside it too) recording their context tokens' attention. Regulariser = embedding_weight
    x context embedding loss + attention_weight x context attention loss.
    """
    b = latents.shape[0]
    noisy, t, target = noisy_latents(scheduler, latents, gen, noise_offset, channels_last)
    # Only the two watched forwards record; the denoising forward keeps the fused kernel. The
    # choice follows each forward's text, so a checkpointed block's recompute in the
    # backward pass takes its forward's path however the backward orders them.
    means.active = False
    means.reset()  # the last micro-step's forwards: their backward has run
    mse = denoising_loss(unet(noisy, t, text.expand(b, -1, -1)).sample, target)
    recorded = []
    for h, pos in ((h_v, pos_v), (h_c, pos_c)):
        context = h.expand(b, -1, -1)  # (B, 77, D), this forward's own tensor
        recorded.append(means.watch(context, pos))
        unet(noisy, t, context)  # only the attention maps are used
    reg = embedding_weight * context_embedding_loss(h_v, h_c, pos_v, pos_c)
    return mse, reg + attention_weight * context_attention_loss(*recorded)
