"""--method core: CoRe's recipe, its micro-step on the tiny model, its prompts and its norm hold."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_error, render_one
from diffusers import DDPMScheduler
from safetensors.torch import load_file
from test_math import KeepProbs, tiny_unet
from test_numerics import counted_checkpoints

import train_attndreambooth
from attn_utils.method import core as core_math
from attn_utils.method.capture import capture_cross_attention
from attn_utils.method.core import ContextMeans, core_losses
from attn_utils.method.step import denoise_losses
from attn_utils.tiny import TINY_CATEGORY, TINY_RESOLUTION
from attn_utils.train.core import core_state, read_core_prompts
from attn_utils.train.trainer import Trainer

BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--output_dir", "o",
        "--category", "sloth"]  # fmt: skip
STEPS = ["--ti_train_steps", "6", "--ti_bs", "2", "--unet_train_steps", "2", "--unet_bs", "2"]


def _plan(capsys, *argv) -> dict:
    assert train_attndreambooth.main([*BASE, "--dry_run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_the_recipe_is_the_authors(capsys):
    plan = _plan(capsys, "--method", "core")
    s1, s3 = plan["stages"]
    assert (s1["index"], s1["learning_rate"], s1["batch_size"], s1["train_steps"]) == (
        1, 5e-3, 6, 300)  # fmt: skip
    assert (s1["context_embedding_weight"], s1["context_attention_weight"]) == (1.5e-4, 0.05)
    assert (s1["norm_hold_start"], s1["norm_hold_end"]) == (120, 180)
    assert (s3["index"], s3["learning_rate"], s3["batch_size"], s3["train_steps"]) == (
        3, 2e-6, 4, 1000)  # fmt: skip
    assert s1["reg_mean_weight"] == s3["reg_var_weight"] == 0.0  # not AttnDreamBooth's
    assert plan["instance_prompt"] == "a photo of a {}" and plan["token_alone"]
    assert plan["core_prompts"].endswith("dataset/prompts/core_universal.txt")
    assert "CoRe" in plan["method_source"]
    own = _plan(capsys, "--method", "core", "--core_embedding_weight", "0.1",
                "--core_attention_weight", "0", "--core_norm_hold", "0", "0")  # fmt: skip
    s1 = own["stages"][0]
    assert (s1["context_embedding_weight"], s1["context_attention_weight"]) == (0.1, 0.0)
    assert s1["norm_hold_end"] == 0


def test_the_shipped_prompt_files_hold_one_placeholder_a_line():
    for name in ("core_universal", "core_animate", "core_inanimate"):
        prompts = read_core_prompts(f"dataset/prompts/{name}.txt")
        assert len(prompts) >= 20 and all(p.count("{}") == 1 for p in prompts)


@pytest.mark.parametrize("content,why", [
    (None, "not found"),
    ("# only a comment\n\n", "has no prompts"),
    ("a photo of a {}\na painting without a placeholder\n", "line 2 needs {} exactly once"),
    ("a {} and a {}\n", "line 1 needs {} exactly once"),
])  # fmt: skip
def test_a_bad_prompt_file_is_one_line_before_any_model_loads(
    run_train, capsys, tmp_path, content, why
):
    f = tmp_path / "prompts.txt"
    if content is not None:
        f.write_text(content)
    argv = [*BASE, "--method", "core", "--core_prompts", str(f)]  # the model "m" is never read
    line, _ = cli_error(run_train, capsys, argv)
    assert line.startswith(f"error: --core_prompts: {f}") and why in line


@pytest.mark.parametrize("argv,flag", [
    (["--core_prompts", "x.txt"], "--core_prompts"),
    (["--method", "ti", "--core_attention_weight", "1"], "--core_attention_weight"),
    (["--method", "core", "--core_norm_hold", "5", "2"], "--core_norm_hold"),
    (["--method", "core", "--core_embedding_weight", "-1"], "--core_embedding_weight"),
])  # fmt: skip
def test_core_flags_mean_nothing_elsewhere(run_train, capsys, argv, flag):
    line, _ = cli_error(run_train, capsys, [*BASE, *argv])
    assert line.startswith(f"error: {flag}")


def test_a_multi_token_category_aligns_the_context(tiny_model, tmp_path):
    """'sloth sloth' is two tokens where [V] is one: the context after them is shifted."""
    from attn_utils.models import load_base_model
    from attn_utils.train.prompts import concept_token_ids
    from train_attndreambooth import parse_args

    f = tmp_path / "p.txt"
    f.write_text("a watercolor painting of a {} on the beach\n")
    cfg, _ = parse_args([*BASE[:-1], "sloth sloth", "--method", "core", "--core_prompts", str(f)])
    m = load_base_model(str(tiny_model))
    ids = concept_token_ids(cfg, m.tokenizer, m.text_encoder)
    (cp,) = core_state(cfg, cfg.stage(1), m.tokenizer, ids, "cpu").prompts
    assert torch.equal(cp.ids_v[0, cp.pos_v], cp.ids_c[0, cp.pos_c])  # the same context tokens
    assert cp.pos_c[-1] - cp.pos_v[-1] == 1  # shifted by the category's extra token
    assert ids[0] not in cp.ids_v[0, cp.pos_v].tolist()


def test_core_losses_are_the_denoising_loss_plus_the_two_context_terms():
    """One micro-step against its parts computed separately: the denoising MSE of the training
    prompt, and the context losses of two separately captured forwards."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    unet = tiny_unet()
    g = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text, h_c = torch.randn(1, 77, 16, generator=g), torch.randn(1, 77, 16, generator=g)
    h_v = torch.randn(1, 77, 16, generator=g).requires_grad_(True)
    pos_v, pos_c = torch.tensor([0, 1, 2, 4, 5]), torch.tensor([0, 1, 2, 5, 6])
    means = ContextMeans()
    with capture_cross_attention(unet, means):
        mse, reg = core_losses(unet, sched, latents, text, torch.Generator().manual_seed(9),
                               h_v, h_c, pos_v, pos_c, means, 0.3, 2.0)  # fmt: skip
    stats = KeepProbs()
    with torch.no_grad():
        ref_mse, _ = denoise_losses(unet, sched, latents, text, torch.Generator().manual_seed(9),
                                    stats, 1, 0.0, 0.0)  # fmt: skip
    torch.testing.assert_close(mse.detach(), ref_mse, rtol=1e-5, atol=1e-6)
    noisy, t, _ = core_math.noisy_latents(sched, latents, torch.Generator().manual_seed(9))
    recorded = []
    for h, pos in ((h_v, pos_v), (h_c, pos_c)):
        m = ContextMeans(pos)
        with capture_cross_attention(unet, m):
            unet(noisy, t, h.expand(2, -1, -1))
        recorded.append(m.take())
    expected = 0.3 * core_math.context_embedding_loss(h_v, h_c, pos_v, pos_c)
    expected = expected + 2.0 * core_math.context_attention_loss(*recorded)
    torch.testing.assert_close(reg, expected, rtol=1e-5, atol=1e-7)
    (reg + mse).backward()
    assert h_v.grad is not None and torch.isfinite(h_v.grad).all() and h_v.grad.abs().sum() > 0
    assert not means.active  # the denoising forward of the next step is fused again


def _core_micro_step(unet) -> tuple[torch.Tensor, ...]:
    """One core_losses micro-step and its backward, as the trainer runs them (the backward
    inside the capture): (mse, reg, text's gradient, h_v's gradient)."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    text, h_v, h_c = (torch.randn(1, 77, 16, generator=g) for _ in range(3))
    text.requires_grad_(True), h_v.requires_grad_(True)  # stage 1: both reach [V]
    pos_v, pos_c = torch.tensor([0, 1, 2, 4, 5]), torch.tensor([0, 1, 2, 5, 6])
    means = ContextMeans()
    with capture_cross_attention(unet, means):
        # the embedding term off: h_v's gradient then comes from the attention maps alone
        mse, reg = core_losses(unet, sched, latents, text, torch.Generator().manual_seed(9),
                               h_v, h_c, pos_v, pos_c, means, 0.0, 2.0)  # fmt: skip
        (mse + reg).backward()
    return mse.detach(), reg.detach(), text.grad, h_v.grad


def test_core_losses_under_gradient_checkpointing_give_the_same_gradients():
    """Each checkpointed block of the three forwards reruns in the backward pass, after
    the last forward: the recompute must take its own forward's path (fused for the
    denoising forward, recording at prompt_v's or prompt_c's positions for the others)."""
    unet = tiny_unet().requires_grad_(False).eval()  # as in stage 1
    ref = _core_micro_step(unet)
    unet.enable_gradient_checkpointing()
    with counted_checkpoints() as calls:
        got = _core_micro_step(unet)
    assert calls[0] > 0 and ref[3].abs().sum() > 0
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


@pytest.fixture(scope="module")
def core_run(tiny_model, concept, tmp_path_factory):
    out = tmp_path_factory.mktemp("core") / "run"
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
            str(concept), "--category", TINY_CATEGORY, "--output_dir", str(out),
            "--resolution", str(TINY_RESOLUTION), "--method", "core", *STEPS,
            "--core_norm_hold", "2", "4"]  # fmt: skip
    held = []
    real = core_math.rescale_to

    def recording(vectors, norms):
        real(vectors, norms)
        held.append((vectors.detach().norm(dim=-1).clone(), norms.clone()))

    with pytest.MonkeyPatch.context() as m:
        m.setattr(core_math, "rescale_to", recording)
        assert train_attndreambooth.main(argv) == 0
    return out, held


def test_core_trains_both_stages_holds_the_norm_and_renders(core_run, tmp_path):
    out, held = core_run
    assert len(held) == 3  # after steps 2, 3 and 4
    for after, norms in held:
        torch.testing.assert_close(after, norms)  # rescaled to the norm of step 2
    assert all(torch.equal(n, held[0][1]) for _, n in held)
    emb = load_file(str(out / "stage_1" / "learned_embeds.safetensors"))
    assert list(emb) == ["new_concept_v0"] and (out / "stage_3" / "unet").is_dir()
    prompt = render_one(out, "a photo of {} on the beach", tmp_path / "render")
    assert prompt == "a photo of new_concept_v0 on the beach"  # CoRe writes [V] alone


def test_a_resumed_core_stage_keeps_its_held_norm(tiny_model, concept, tmp_path, monkeypatch):
    """The norm recorded at the window's start is in the checkpoint: a run resumed inside the
    window holds the same norm, and ends bitwise where an uninterrupted run ends."""
    argv = lambda out: ["--pretrained_model_name_or_path", str(tiny_model),  # noqa: E731
                        "--instance_data_dir", str(concept), "--category", TINY_CATEGORY,
                        "--output_dir", str(out), "--resolution", str(TINY_RESOLUTION),
                        "--method", "core", "--stages", "1", "--ti_train_steps", "6",
                        "--ti_bs", "2", "--core_norm_hold", "2", "6",
                        "--ti_checkpointing_steps", "3"]  # fmt: skip
    whole = tmp_path / "whole"
    assert train_attndreambooth.main(argv(whole)) == 0
    cut = tmp_path / "cut"
    real, calls = Trainer._optimizer_step, [0]

    def crash_at_5(self, *a, **k):
        calls[0] += 1
        if calls[0] == 5:
            raise KeyboardInterrupt
        return real(self, *a, **k)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_optimizer_step", crash_at_5)
        with pytest.raises(KeyboardInterrupt):
            train_attndreambooth.main(argv(cut))
    state = json.loads((cut / "checkpoints" / "checkpoint-s1-000003" / "state.json").read_text())
    assert len(state["norm_hold"]) == 1
    assert train_attndreambooth.main(argv(cut)) == 0  # continues from step 3
    a = load_file(str(whole / "stage_1" / "learned_embeds.safetensors"))
    b = load_file(str(cut / "stage_1" / "learned_embeds.safetensors"))
    assert torch.equal(a["new_concept_v0"], b["new_concept_v0"])
