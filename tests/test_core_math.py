"""CoRe's context regularisation against hand-written positions and slow, obvious references."""

import pytest
import torch
from test_math import KeepProbs, tiny_unet

from attn_utils.method.capture import capture_cross_attention
from attn_utils.method.core import (
    ContextMeans,
    NormHold,
    context_attention_loss,
    context_embedding_loss,
    context_positions,
    context_positions_from_ids,
    holds_norm,
    record_norm,
    rescale_to,
)

SOT, EOT = 49406, 49407
TEMPLATE = [10, 11, 12, 13, 14]  # "an impressionist painting of a" ... {} ... [15] "."
V1, V2 = 900, 901  # learned tokens
DOG, TEDDY, BEAR = 500, 600, 601


def prompt(span: list[int], before=TEMPLATE, after=(15,)) -> list[int]:
    """SOT, template, span, rest, EOT, padded with EOT to 77 (SD 1.x's CLIP tokenizer)."""
    ids = [SOT, *before, *span, *after, EOT]
    return ids + [EOT] * (77 - len(ids))


# (k, category, pos_v, pos_c), written out by hand for prompt(...) above: context is
# SOT and the template at 0..5, then "." and EOT.
HAND = [
    (1, [DOG], [0, 1, 2, 3, 4, 5, 7, 8], [0, 1, 2, 3, 4, 5, 7, 8]),
    (1, [TEDDY, BEAR], [0, 1, 2, 3, 4, 5, 7, 8], [0, 1, 2, 3, 4, 5, 8, 9]),
    (2, [DOG], [0, 1, 2, 3, 4, 5, 8, 9], [0, 1, 2, 3, 4, 5, 7, 8]),
    (2, [TEDDY, BEAR], [0, 1, 2, 3, 4, 5, 8, 9], [0, 1, 2, 3, 4, 5, 8, 9]),
]


@pytest.mark.parametrize("k, category, pos_v, pos_c", HAND)
def test_context_positions_by_hand(k, category, pos_v, pos_c):
    v = [V1, V2][:k]
    ids_v, ids_c = prompt(v), prompt(category)
    got_v, got_c = context_positions(torch.tensor(ids_v), ids_c, 6, k, len(category), 6 + k + 1)
    assert got_v.tolist() == pos_v and got_c.tolist() == pos_c
    derived = context_positions_from_ids(ids_v, ids_c, v, category, EOT)
    assert [t.tolist() for t in derived] == [pos_v, pos_c]


def test_context_positions_with_the_concept_first_and_a_longer_tail():
    # "[V] [V] on the beach" vs "teddy bear on the beach": nothing but SOT before the span
    ids_v = prompt([V1, V2], before=(), after=(20, 21, 22))
    ids_c = prompt([TEDDY, BEAR], before=(), after=(20, 21, 22))
    pos_v, pos_c = context_positions_from_ids(ids_v, ids_c, [V1, V2], [TEDDY, BEAR])
    assert pos_v.tolist() == [0, 3, 4, 5, 6] and pos_c.tolist() == [0, 3, 4, 5, 6]
    ids_c = prompt([DOG], before=(), after=(20, 21, 22))
    pos_v, pos_c = context_positions_from_ids(ids_v, ids_c, [V1, V2], [DOG])
    assert pos_v.tolist() == [0, 3, 4, 5, 6] and pos_c.tolist() == [0, 2, 3, 4, 5]


def test_mismatched_context_tokens_raise():
    ids_v, ids_c = prompt([V1]), prompt([TEDDY, BEAR])
    with pytest.raises(ValueError, match="context tokens differ"):  # the unshifted tail
        context_positions(ids_v, ids_c, 6, 1, 1, 8)
    with pytest.raises(ValueError, match="context tokens differ"):  # another template
        context_positions(ids_v, prompt([DOG], before=[10, 11, 99, 13, 14]), 6, 1, 1, 8)
    with pytest.raises(ValueError, match="context tokens differ"):  # "[V] dog" vs "dog"
        context_positions_from_ids(prompt([V1, DOG]), prompt([DOG]), [V1], [DOG])
    with pytest.raises(ValueError, match="does not hold the category"):
        context_positions_from_ids(ids_v, prompt([DOG]), [V1], [TEDDY, BEAR])
    with pytest.raises(ValueError, match="start-of-text"):
        context_positions(ids_v, ids_c, 0, 1, 2, 8)
    long_v = [SOT, *range(100, 174), V1, EOT]  # 77 tokens: a 2-token category no longer fits
    long_c = [SOT, *range(100, 174), TEDDY, BEAR]
    with pytest.raises(ValueError, match="cut short"):
        context_positions(long_v, long_c, 75, 1, 2, 76)


def slow_embedding_loss(h_v, h_c, pos_v, pos_c):
    """Explicit loops over samples and positions, 1 - cos written out."""
    total, count = 0.0, 0
    for b in range(h_v.shape[0]):
        for i, j in zip(pos_v.tolist(), pos_c.tolist()):
            x, y = h_v[b, i].tolist(), h_c[b, j].tolist()
            dot = sum(a * c for a, c in zip(x, y))
            nx, ny = sum(a * a for a in x) ** 0.5, sum(c * c for c in y) ** 0.5
            total += 1 - dot / (nx * ny)
            count += 1
    return total / count


def test_context_embedding_loss_against_loops():
    torch.manual_seed(0)
    h_v, h_c = torch.randn(3, 77, 16), torch.randn(3, 77, 16)
    pos_v, pos_c = context_positions(prompt([V1, V2]), prompt([DOG]), 6, 2, 1, 9)
    h_c[:, pos_c] = 0.1 * h_c[:, pos_c] + h_v[:, pos_v]  # near-aligned: a small, exact loss
    got = context_embedding_loss(h_v, h_c, pos_v, pos_c)
    assert got.item() == pytest.approx(slow_embedding_loss(h_v, h_c, pos_v, pos_c), rel=1e-5)
    per_sample = context_embedding_loss(h_v, h_c, pos_v.expand(3, -1), pos_c.expand(3, -1))
    assert per_sample.item() == pytest.approx(got.item(), rel=1e-6)
    assert context_embedding_loss(h_v, h_v, pos_v, pos_v).item() == pytest.approx(0, abs=1e-6)


def slow_means(maps, positions):
    """{layer: [[mean over heads and pixels of P[b, :, :, t] for t in positions[b]] per b]}."""
    out = {}
    for layer, P in maps.items():  # (B, H, N, T)
        rows = []
        for b in range(P.shape[0]):
            row = []
            for t in positions[b].tolist():
                vals = [P[b, h, n, t].item() for h in range(P.shape[1]) for n in range(P.shape[2])]
                row.append(sum(vals) / len(vals))
            rows.append(row)
        out[layer] = rows
    return out


def slow_attention_loss(means_v, means_c):
    """Per layer: sum over samples of the mean over positions of the squared difference."""
    per_layer = []
    for layer in means_v:
        total = 0.0
        for mv, mc in zip(means_v[layer], means_c[layer]):
            total += sum((a - c) ** 2 for a, c in zip(mv, mc)) / len(mv)
        per_layer.append(total)
    return sum(per_layer) / len(per_layer)


def run(unet, controller, latents, t, text):
    with capture_cross_attention(unet, controller) as layers:
        unet(latents, t, encoder_hidden_states=text)
    return layers


def test_context_means_and_attention_loss_against_full_maps_and_loops():
    unet = tiny_unet()
    torch.manual_seed(1)
    latents, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])  # the same for both prompts
    text_v = torch.randn(2, 77, 16, requires_grad=True)
    text_c = torch.randn(2, 77, 16)
    # per-sample positions: sample 0 has k=1 and a 2-token category, sample 1 the reverse
    pv0, pc0 = context_positions(prompt([V1]), prompt([TEDDY, BEAR]), 6, 1, 2, 8)
    pv1, pc1 = context_positions(prompt([V1, V2]), prompt([DOG]), 6, 2, 1, 9)
    pos_v, pos_c = torch.stack([pv0, pv1]), torch.stack([pc0, pc1])  # (2, 8)

    ctrl = ContextMeans()
    ctrl.positions = pos_v
    layers = run(unet, ctrl, latents, t, text_v)
    means_v = ctrl.take()
    ctrl.positions = pos_c
    run(unet, ctrl, latents, t, text_c)
    means_c = ctrl.take()
    assert len(layers) == len(means_v) == len(means_c) >= 3 and ctrl.means == {}
    assert all(m.shape == (2, 8) and m.requires_grad for m in means_v.values())

    full_v, full_c = KeepProbs(), KeepProbs()
    with torch.no_grad():
        run(unet, full_v, latents, t, text_v)
        run(unet, full_c, latents, t, text_c)
    slow_v, slow_c = slow_means(full_v.maps, pos_v), slow_means(full_c.maps, pos_c)
    for layer in means_v:
        torch.testing.assert_close(means_v[layer], torch.tensor(slow_v[layer]))
        torch.testing.assert_close(means_c[layer], torch.tensor(slow_c[layer]))

    loss = context_attention_loss(means_v, means_c)
    assert loss.item() == pytest.approx(slow_attention_loss(slow_v, slow_c), rel=1e-4)
    assert loss.item() > 0
    loss.backward()
    assert text_v.grad is not None and torch.isfinite(text_v.grad).all()
    assert text_v.grad.abs().sum() > 0


def test_context_means_overwrites_per_layer_and_losses_refuse_unmatched_layers():
    unet = tiny_unet()
    ctrl = ContextMeans(torch.arange(8))  # (P,) shared by the batch
    latents, text = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 16)
    layers = run(unet, ctrl, latents, torch.tensor([5]), text)
    run(unet, ctrl, latents, torch.tensor([5]), text)  # a recompute: the same keys again
    assert len(ctrl.means) == len(layers)
    with pytest.raises(ValueError, match="different layers"):
        context_attention_loss(ctrl.means, {})


def test_norm_hold_records_at_start_and_rescales_through_end():
    assert [holds_norm(s) for s in (119, 120, 150, 180, 181)] == [False, True, True, True, False]
    assert holds_norm(3, start=2, end=3) and not holds_norm(4, start=2, end=3)

    torch.manual_seed(0)
    vectors = torch.nn.Parameter(torch.randn(2, 16))  # k = 2 learned vectors
    hold, recorded = NormHold(), None
    for step in range(1, 201):
        with torch.no_grad():
            vectors.mul_(torch.tensor([[1.01], [0.98]]))  # an optimiser step that moves the norm
        hold.after_step(step, vectors)
        if step == 120:
            recorded = record_norm(vectors).clone()
        if step in (120, 150, 180):
            torch.testing.assert_close(record_norm(vectors), recorded)
        if step == 181:
            assert not torch.allclose(record_norm(vectors), recorded)
    torch.testing.assert_close(hold.norms, recorded)

    v = torch.randn(3, 16)
    norms = record_norm(v)
    direction = v / v.norm(dim=-1, keepdim=True)
    v.mul_(torch.tensor([[2.0], [0.5], [3.0]]))
    rescale_to(v, norms)
    torch.testing.assert_close(v.norm(dim=-1), norms)
    torch.testing.assert_close(v / v.norm(dim=-1, keepdim=True), direction)  # only the length
