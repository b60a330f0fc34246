"""Issue 4, item 4: the fast training path computes what the plain path computes.

Fast path (the library, default settings): text states cached for stages 2-3 and at batch 1
in stage 1 (placeholder row only), fused self-attention, explicit maps on attn2 only.
Plain reference (written here): text encoder on B copies every step, explicit softmax in
EVERY attention layer, full maps kept, the regulariser written out from docs/method.md; stage 1
trains the whole embedding table and reads the placeholder row's gradient.

Tolerances: fp32 losses and gradients agree to rtol 1e-4 (fused vs explicit attention and
batch-1 vs B-copy text only reorder float sums: at most 3e-6 relative observed). bf16
autocast vs fp32: the denoising loss within 1 % and the regulariser within 5 % (observed
0.04 % and 1.6 %; bf16 keeps 8 mantissa bits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
import torch.utils.checkpoint

from attn_utils.config import PAPER_STAGES
from attn_utils.method.capture import TokenStats, capture_cross_attention
from attn_utils.method.step import denoise_losses, encode_latents
from attn_utils.method.tokens import add_placeholder_tokens, fill_prompt, prompt_positions
from attn_utils.models import load_base_model
from attn_utils.tiny import TINY_CATEGORY, TINY_RESOLUTION
from attn_utils.train.stages import finish_trainable, select_trainable

B = 2
TOKENS = ["new_concept_v0"]


class PlainAttention:
    """softmax(Q K^T / sqrt(d)) V with plain tensor ops; keeps cross-attention maps."""

    def __init__(self, layer: str, maps: dict) -> None:
        self.layer, self.maps = layer, maps

    def __call__(self, attn, x, encoder_hidden_states=None, attention_mask=None, temb=None):
        assert x.ndim == 3 and attention_mask is None and not attn.residual_connection
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        b, n, _ = x.shape
        h = attn.heads

        def split(t):  # (B, L, H*d) -> (B, H, L, d)
            return t.view(b, t.shape[1], h, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(x)), split(attn.to_k(ctx)), split(attn.to_v(ctx))
        probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)  # (B, H, N, T)
        if encoder_hidden_states is not None:
            self.maps[self.layer] = probs
        out = (probs @ v).transpose(1, 2).reshape(b, n, -1)
        return attn.to_out[1](attn.to_out[0](out)) / attn.rescale_output_factor


def plain_reg(maps: list[torch.Tensor], s: int, c: int, wm: float, wv: float) -> torch.Tensor:
    """docs/method.md's regulariser (k = 1): per sample, statistics over heads and pixels."""
    total = 0.0
    for p in maps:  # (B, H, N, T)
        x = p.permute(0, 3, 1, 2).reshape(p.shape[0], p.shape[-1], -1)  # (B, T, H*N)
        mean, var = x.mean(-1), x.var(-1, unbiased=True)  # (B, T)
        total = total + (wm * (mean[:, s] - mean[:, c]) ** 2).sum()
        total = total + (wv * (var[:, s] - var[:, c]) ** 2).sum()
    return total / len(maps)


@pytest.fixture(scope="module")
def parts(tiny_model):
    m = load_base_model(str(tiny_model))
    ids = add_placeholder_tokens(m.tokenizer, m.text_encoder, TOKENS, TINY_CATEGORY)
    prompt = fill_prompt(f"a photo of a {{}} {TINY_CATEGORY}", TOKENS)
    input_ids, s, c = prompt_positions(m.tokenizer, prompt, ids, TINY_CATEGORY)
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(B, 3, TINY_RESOLUTION, TINY_RESOLUTION, generator=g) * 2 - 1
    return m, ids, input_ids, s, c, pixels


def fast_path(
    parts, stage: int, seed: int, autocast: torch.dtype | None = None, reg_only: bool = False
):
    """The library's step math, as Trainer runs it: (mse, reg, {name: grad})."""
    m, ids, input_ids, s, c, pixels = parts
    sc = PAPER_STAGES[stage]
    params = select_trainable(stage, m.unet, m.text_encoder, ids)
    stats = TokenStats()
    stats.columns = torch.tensor([[s, c]])
    gen = torch.Generator().manual_seed(seed)
    amp = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
    # As in Trainer: capture around forward AND backward (gradient checkpointing recomputes
    # the forward during backward), autocast around the forward only.
    with capture_cross_attention(m.unet, stats):
        with amp:
            if stage >= 2:
                with torch.no_grad():
                    text = m.text_encoder(input_ids)[0].float()  # (1, 77, D), once per stage
            else:
                text = m.text_encoder(input_ids)[0]  # batch 1, grad to the placeholder row
            latents = encode_latents(m.vae, pixels, gen)
            mse, reg = denoise_losses(
                m.unet, m.noise_scheduler, latents, text, gen, stats, 1,
                sc["reg_mean_weight"], sc["reg_var_weight"],
            )  # fmt: skip
        (reg if reg_only else mse + reg).backward()
    # a parameter the loss does not reach (the regulariser alone: layers after the last
    # cross-attention) has no gradient: zero
    grads = {
        n: torch.zeros_like(p) if p.grad is None else p.grad.detach().clone()
        for n, p in params.named.items()
    }
    finish_trainable(stage, params, m.text_encoder)
    for p in params.named.values():
        p.grad = None
    return mse.detach(), reg.detach(), grads


def plain_path(parts, stage: int, seed: int):
    """Written out: B-copy text, explicit attention everywhere, whole-table stage 1."""
    m, ids, input_ids, s, c, pixels = parts
    sc = PAPER_STAGES[stage]
    table = m.text_encoder.get_input_embeddings().weight
    named = dict(m.unet.named_parameters())
    if stage == 1:
        train = {"learned_embeds": table}
    else:
        train = {n: p for n, p in named.items() if stage == 3 or "attn2" in n}
    for p in train.values():
        p.requires_grad_(True)
    maps: dict[str, torch.Tensor] = {}
    previous = dict(m.unet.attn_processors)
    m.unet.set_attn_processor({k: PlainAttention(k, maps) for k in previous})
    try:
        gen = torch.Generator().manual_seed(seed)  # the same draws in the same order
        with torch.no_grad():
            dist = m.vae.encode(pixels).latent_dist
            latents = dist.sample(generator=gen) * m.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, 1000, (B,), generator=gen)
        noisy = m.noise_scheduler.add_noise(latents, noise, t)
        text = m.text_encoder(input_ids.expand(B, -1))[0]  # B copies, every step
        pred = m.unet(noisy, t, text).sample
        mse = F.mse_loss(pred, noise)
        reg = plain_reg(list(maps.values()), s, c, sc["reg_mean_weight"], sc["reg_var_weight"])
        (mse + reg).backward()
    finally:
        m.unet.set_attn_processor(previous)
    if stage == 1:
        grads = {"learned_embeds": table.grad[ids].clone()}  # (k, D) of the full-table grad
    else:
        grads = {n: p.grad.clone() for n, p in train.items()}
    for p in train.values():
        p.requires_grad_(False)
        p.grad = None
    return mse.detach(), reg.detach(), grads


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_fast_path_matches_plain_reference_fp32(parts, stage):
    mse_f, reg_f, g_f = fast_path(parts, stage, seed=stage)
    mse_p, reg_p, g_p = plain_path(parts, stage, seed=stage)
    torch.testing.assert_close(mse_f, mse_p, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(reg_f, reg_p, rtol=1e-4, atol=0)
    assert reg_p > 0 and set(g_f) == set(g_p)
    if stage == 2:
        assert g_f and all("attn2" in n for n in g_f)
    for name, ref in g_p.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(g_f[name], ref, rtol=1e-4, atol=1e-4 * scale + 1e-12)
    total = sum(g.abs().sum() for g in g_p.values())
    assert total > 0  # the comparison is not vacuous


def test_fast_path_trainable_sets_are_the_papers(parts):
    m = parts[0]
    counts = {}
    for stage in (1, 2, 3):
        _, _, grads = fast_path(parts, stage, seed=0)
        counts[stage] = sum(g.numel() for g in grads.values())
    dim = m.text_encoder.config.hidden_size
    attn2 = sum(p.numel() for n, p in m.unet.named_parameters() if "attn2" in n)
    assert counts == {1: dim, 2: attn2, 3: sum(p.numel() for p in m.unet.parameters())}


@pytest.mark.parametrize("stage", [1, 3])
def test_bf16_autocast_losses_close_to_fp32(parts, stage):
    mse32, reg32, _ = fast_path(parts, stage, seed=10 + stage)
    mse16, reg16, _ = fast_path(parts, stage, seed=10 + stage, autocast=torch.bfloat16)
    torch.testing.assert_close(mse16, mse32, rtol=1e-2, atol=0)
    torch.testing.assert_close(reg16, reg32, rtol=5e-2, atol=0)


@contextlib.contextmanager
def counted_checkpoints() -> Iterator[list[int]]:
    """[n]: the torch.utils.checkpoint.checkpoint calls made inside (diffusers checkpoints
    through it whenever gradients are on and checkpointing is enabled, in either mode)."""
    calls, real = [0], torch.utils.checkpoint.checkpoint

    def counting(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(torch.utils.checkpoint, "checkpoint", counting)
        yield calls


@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_checkpointing_keeps_the_regulariser_gradient(parts, stage):
    """The attention statistics leave the checkpointed blocks through the capture processor;
    their gradient must survive the recomputation (diffusers' non-reentrant checkpointing).
    The regulariser alone is compared: its gradient is tiny next to the MSE's."""
    unet = parts[0].unet
    _, reg_a, g_a = fast_path(parts, stage, seed=20, reg_only=True)
    unet.enable_gradient_checkpointing()
    try:
        with counted_checkpoints() as calls:  # in eval mode, as the trainer's U-Net
            _, reg_b, g_b = fast_path(parts, stage, seed=20, reg_only=True)
    finally:
        unet.disable_gradient_checkpointing()
    assert calls[0] > 0
    torch.testing.assert_close(reg_b, reg_a, rtol=1e-5, atol=0)
    assert sum(g.abs().sum() for g in g_a.values()) > 0
    for name, ref in g_a.items():
        scale = ref.abs().max().item()
        torch.testing.assert_close(g_b[name], ref, rtol=1e-4, atol=1e-4 * scale + 1e-20)


STAGES_123 = ["--ti_train_steps", "1", "--attn_train_steps", "2", "--unet_train_steps", "2"]


@pytest.mark.parametrize(
    "extra",
    [
        ["--method", "core", "--stages", "1", "--ti_train_steps", "2", "--ti_bs", "2"],
        [*STAGES_123, "--unet_lora_rank", "4", "--attn_lora_rank", "4", "--unet_lora_dropout",
         "0.1"],
        ["--method", "dreambooth", "--unet_train_steps", "2", "--with_prior_preservation",
         "--num_class_images", "2", "--sample_batch_size", "2", "--class_inference_steps", "2"],
    ],
    ids=["core", "lora", "prior"],
)  # fmt: skip
def test_each_path_trains_with_gradient_checkpointing(tiny_model, concept, tmp_path, extra):
    """--gradient_checkpointing with CoRe's three forwards a micro-step, the adapters (with
    dropout, whose masks the recompute must draw again) and the (instance, class) batch."""
    import train_attndreambooth

    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
            str(concept), "--category", TINY_CATEGORY, "--output_dir", str(tmp_path / "run"),
            "--resolution", str(TINY_RESOLUTION), "--gradient_checkpointing", *extra]  # fmt: skip
    with counted_checkpoints() as calls:
        assert train_attndreambooth.main(argv) == 0
    assert calls[0] > 0
