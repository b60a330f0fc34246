"""The regulariser and the capture against slow, obvious references on a tiny U-Net."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

from attn_utils.method.capture import (
    Controller,
    TokenStats,
    capture_cross_attention,
    cross_attention_layers,
)
from attn_utils.method.losses import attention_reg_loss


def tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=(2, 4),
        cross_attention_dim=16,
        norm_num_groups=8,
        use_linear_projection=True,
    )


class KeepProbs(Controller):
    """Reference recorder: keeps every full probability tensor (B, H, N, T) per layer."""

    def __init__(self):
        self.maps = {}

    def reset(self):
        self.maps = {}

    def record(self, layer, probs, heads):
        self.maps[layer] = probs.view(-1, heads, *probs.shape[1:])


def slow_reg(maps, s, k, c, wm, wv):
    """docs/method.md's formula with explicit loops over layers, samples and tokens."""
    total = 0.0
    for P in maps:  # (B, H, N, T)
        for b in range(P.shape[0]):
            vals = P[b].reshape(-1, P.shape[-1])  # heads and pixels jointly
            n = vals.shape[0]
            mean = [sum(vals[:, t].tolist()) / n for t in range(P.shape[-1])]
            var = [
                sum((x - mean[t]) ** 2 for x in vals[:, t].tolist()) / (n - 1)
                for t in range(P.shape[-1])
            ]
            m_err = sum((mean[s[b] + j] - mean[c[b]]) ** 2 for j in range(k)) / k
            v_err = sum((var[s[b] + j] - var[c[b]]) ** 2 for j in range(k)) / k
            total += wm * m_err + wv * v_err
    return total / len(maps)


def _inputs(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, 8, 8, generator=g)
    t = torch.tensor([10, 500][:b])
    ehs = torch.randn(b, 77, 16, generator=g)
    return x, t, ehs


@pytest.mark.parametrize("k", [1, 2])
def test_regulariser_matches_slow_reference(k):
    unet = tiny_unet()
    x, t, ehs = _inputs()
    s = [3, 5]  # per-sample placeholder positions
    c = [si + k for si in s]
    ref = KeepProbs()
    with torch.no_grad(), capture_cross_attention(unet, ref):
        unet(x, t, ehs)
    expected = slow_reg(list(ref.maps.values()), s, k, c, 2.0, 5.0)
    stats = TokenStats()
    stats.columns = torch.tensor([[si + j for j in range(k)] + [ci] for si, ci in zip(s, c)])
    with torch.no_grad(), capture_cross_attention(unet, stats):
        unet(x, t, ehs)
    got = attention_reg_loss(list(stats.stats.values()), k, 2.0, 5.0)
    assert len(stats.stats) == len(ref.maps) == len(cross_attention_layers(unet)) == 4
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-12)


def test_all_category_sub_tokens_target_their_mean_map():
    """--reg_category_target all: the category's map is the mean of its sub-tokens' maps."""
    unet = tiny_unet()
    x, t, ehs = _inputs()
    s, k, m = [3, 5], 1, 2  # one placeholder, a category of two sub-tokens
    c = [si + k for si in s]
    ref = KeepProbs()
    with torch.no_grad(), capture_cross_attention(unet, ref):
        unet(x, t, ehs)
    merged = []
    for P in ref.maps.values():  # (B, H, N, T): write the mean map into column c_b
        P = P.clone()
        for b in range(P.shape[0]):
            P[b, :, :, c[b]] = sum(P[b, :, :, c[b] + j] for j in range(m)) / m
        merged.append(P)
    expected = slow_reg(merged, s, k, c, 2.0, 5.0)
    stats = TokenStats(merge_last=m)
    stats.columns = torch.tensor([[si, si + 1, si + 2] for si in s])  # placeholder, 2 sub-tokens
    with torch.no_grad(), capture_cross_attention(unet, stats):
        unet(x, t, ehs)
    assert all(v[0].shape == (2, 2) for v in stats.stats.values())  # (B, k + 1)
    got = attention_reg_loss(list(stats.stats.values()), k, 2.0, 5.0)
    assert got.item() == pytest.approx(expected, rel=1e-4, abs=1e-12)
    first = slow_reg(list(ref.maps.values()), s, k, c, 2.0, 5.0)
    assert abs(first - expected) > 1e-6 * abs(expected)  # the option changes the target


def test_regulariser_sums_over_batch_and_has_gradient_to_category():
    mean = torch.tensor([[0.2, 0.1], [0.4, 0.1]], requires_grad=True)
    var = torch.zeros(2, 2)
    loss = attention_reg_loss([(mean, var)], 1, 1.0, 0.0)
    assert loss.item() == pytest.approx(0.1**2 + 0.3**2)  # summed, not averaged
    loss.backward()
    assert mean.grad[:, 1].abs().sum() > 0  # no stop-gradient on the category column


def test_capture_output_equals_fused_output_and_restores():
    unet = tiny_unet()
    x, t, ehs = _inputs()
    before = dict(unet.attn_processors)
    with torch.no_grad():
        plain = unet(x, t, ehs).sample
    stats = TokenStats()
    stats.columns = torch.tensor([[3, 4]])
    with torch.no_grad(), capture_cross_attention(unet, stats) as layers:
        now = unet.attn_processors
        assert layers and all(".attn2." in k for k in layers)
        # self-attention keeps the fused processor it had; only attn2 is replaced
        for key, proc in now.items():
            if ".attn1." in key:
                assert proc is before[key]
            else:
                assert type(proc).__name__ == "CrossAttnCaptureProcessor"
        captured = unet(x, t, ehs).sample
    torch.testing.assert_close(captured, plain, rtol=1e-4, atol=1e-5)
    assert unet.attn_processors == before


def test_processors_restored_on_exception():
    unet = tiny_unet()
    unet.set_attn_processor(AttnProcessor())  # a non-default setting must come back too
    before = dict(unet.attn_processors)
    with pytest.raises(RuntimeError), capture_cross_attention(unet, TokenStats()):
        raise RuntimeError("boom")
    assert unet.attn_processors == before
    assert cross_attention_layers(unet)


def test_inactive_capture_records_nothing():
    unet = tiny_unet()
    x, t, ehs = _inputs()
    stats = TokenStats()
    stats.columns = torch.tensor([[3, 4]])
    stats.active = False
    with torch.no_grad(), capture_cross_attention(unet, stats):
        unet(x, t, ehs)
    assert stats.stats == {}
