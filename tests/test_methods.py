"""The baselines (--method) and prior preservation: plans, losses, class images, end to end."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import cli_error
from device_emulation import ForeignDefaultDevice
from diffusers import DDPMScheduler
from PIL import Image
from safetensors.torch import load_file
from test_math import KeepProbs, slow_reg, tiny_unet

import inference
import train_attndreambooth
from attn_utils.config import ConfigError
from attn_utils.method.capture import TokenStats, capture_cross_attention, capture_if
from attn_utils.method.step import denoise_losses
from attn_utils.method.templates import TI_OBJECT_TEMPLATES
from attn_utils.tiny import TINY_CATEGORY, TINY_RESOLUTION
from attn_utils.train.prior import class_image_files, generate_class_images

BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--output_dir", "o"]


def _plan(capsys, *argv) -> dict:
    assert train_attndreambooth.main([*BASE, "--category", "sloth", "--dry_run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def _stages(plan) -> dict:
    keys = ("learning_rate", "train_steps", "batch_size", "gradient_accumulation_steps")
    return {
        s["index"]: tuple(s[k] for k in keys) + (s["reg_mean_weight"], s["reg_var_weight"])
        for s in plan["stages"]
    }


def test_dry_run_prints_each_recipe(capsys):
    adb = _plan(capsys)
    assert adb["method"] == "attndreambooth" and adb["run_stages"] == [1, 2, 3]
    assert _stages(adb)[3] == (2e-6, 500, 8, 1, 2.0, 5.0) and not adb["with_prior_preservation"]
    ti = _plan(capsys, "--method", "ti")
    assert _stages(ti) == {1: (5e-4 * 4, 3000, 1, 4, 0.0, 0.0)} and ti["run_stages"] == [1]
    assert ti["prompt_templates"] == [t.replace("{}", "{} sloth") for t in TI_OBJECT_TEMPLATES]
    assert len(ti["prompt_templates"]) == 27 and "textual_inversion" in ti["method_source"]
    db = _plan(capsys, "--method", "dreambooth")
    assert _stages(db) == {3: (5e-6, 800, 1, 1, 0.0, 0.0)} and db["run_stages"] == [3]
    assert db["placeholder_tokens"] == ["sks"] and db["instance_prompt"] == "a photo of {} sloth"
    assert db["with_prior_preservation"] and db["num_class_images"] == 200
    assert db["prior_loss_weight"] == 1.0 and db["class_prompt"] == "a photo of sloth"
    assert db["class_data_dir"] == "o/class_images" and "dreambooth" in db["method_source"]
    # the paper's TI+DB: the ti recipe, then the dreambooth recipe on [V], [V] still training
    tidb = _plan(capsys, "--method", "ti_db")
    assert _stages(tidb) == {1: _stages(ti)[1], 3: _stages(db)[3]}
    s1, s3 = tidb["stages"]
    assert s1["templates"] and not s3["templates"] and s3["tune_embedding"]
    assert s3["embedding_learning_rate"] is None  # the stage's rate
    assert (s1["flip_p"], s1["max_grad_norm"], s3["flip_p"], s3["max_grad_norm"]) == (
        0.5, None, 0.0, 1.0)  # fmt: skip
    assert tidb["with_prior_preservation"] and tidb["num_class_images"] == 200
    assert tidb["instance_prompt"] == "a photo of {} sloth" and tidb["identifier"] is None
    assert "textual_inversion" in tidb["method_source"] and "dreambooth" in tidb["method_source"]
    frozen = _plan(capsys, "--method", "ti_db", "--no-tune_embedding",
                   "--embedding_learning_rate", "1e-4")  # fmt: skip
    assert not frozen["stages"][1]["tune_embedding"]
    assert frozen["stages"][1]["embedding_learning_rate"] == 1e-4


def test_stage_flags_override_presets_and_the_authors_switches(capsys):
    plan = _plan(capsys, "--method", "ti", "--ti_learning_rate", "1e-4", "--ti_ga", "1")
    assert _stages(plan)[1][:4] == (1e-4, 3000, 1, 1)
    plan = _plan(capsys, "--method", "dreambooth", "--unet_attn_mean", "2", "--identifier", "zwx")
    assert _stages(plan)[3][4] == 2.0 and plan["placeholder_tokens"] == ["zwx"]
    plan = _plan(
        capsys,
        "--with_prior_preservation",
        "--class_prompt",
        "a sloth",
        "--prior_loss_weight",
        "0.5",
    )
    assert plan["with_prior_preservation"] and plan["class_prompt"] == "a sloth"
    assert plan["prior_loss_weight"] == 0.5 and plan["num_class_images"] == 100
    plan = _plan(capsys, "--initialize_token", "toy", "--offset_noise", "--flip_p", "0.5")
    assert (plan["category"], plan["initializer_token"]) == ("sloth", "toy")
    assert plan["noise_offset"] == 0.1 and {s["flip_p"] for s in plan["stages"]} == {0.5}
    plan = _plan(capsys, "--method", "dreambooth", "--no-with_prior_preservation")
    assert not plan["with_prior_preservation"]


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--method", "ti", "--attn_learning_rate", "1"], "--attn_learning_rate"),
        (["--method", "ti", "--with_prior_preservation"], "--with_prior_preservation"),
        (["--method", "dreambooth", "--stages", "1"], "--stages"),
        (["--method", "dreambooth", "--fast"], "--fast"),
        (["--class_prompt", "a sloth"], "--class_prompt"),
        (["--identifier", "sks"], "--identifier"),
        (["--with_prior_preservation", "--class_data_dir", "d/sub"], "--class_data_dir"),
        (["--flip_p", "2"], "--flip_p"),
        (["--rotate_p", "-0.1"], "--rotate_p"),
        (["--rotate_degrees", "200"], "--rotate_degrees"),
        (["--center_crop", "--crop", "resize"], "--center_crop"),
        (["--method", "ti_db", "--fast"], "--fast"),
        (["--tune_embedding"], "--tune_embedding"),
        (
            ["--method", "dreambooth", "--embedding_learning_rate", "1e-4"],
            "--embedding_learning_rate",
        ),
        (["--method", "ti_db", "--embedding_learning_rate", "0"], "--embedding_learning_rate"),
        (["--max_grad_norm", "-1"], "--max_grad_norm"),
    ],
)
def test_bad_method_flags_are_one_line(argv, flag, run_train, capsys):
    line, _ = cli_error(run_train, capsys, [*BASE, "--category", "sloth", *argv])
    assert line.startswith(f"error: {flag}")


def test_prior_loss_matches_slow_reference():
    """One forward over instance + class; instance MSE + W x class MSE; reg on instances."""
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    unet = tiny_unet()
    g = torch.Generator().manual_seed(3)
    latents = torch.randn(4, 4, 8, 8, generator=g)  # 2 instance, then 2 class samples
    inst_text = torch.randn(1, 77, 16, generator=g)
    class_text = torch.randn(1, 77, 16, generator=g)
    text = torch.cat([inst_text.expand(2, -1, -1), class_text.expand(2, -1, -1)])
    stats = TokenStats()
    stats.columns = torch.tensor([[5, 6]])  # placeholder at 5, category at 6
    with torch.no_grad(), capture_cross_attention(unet, stats):
        mse, reg = denoise_losses(
            unet, sched, latents, text, torch.Generator().manual_seed(9), stats, 1, 2.0, 5.0,
            n_instance=2, prior_loss_weight=0.7,
        )  # fmt: skip
    g = torch.Generator().manual_seed(9)  # the same draws, in the same order
    noise = torch.randn(latents.shape, generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    noisy = sched.add_noise(latents, noise, t)
    ref = KeepProbs()
    with torch.no_grad(), capture_cross_attention(unet, ref):  # the halves run separately
        pred_i = unet(noisy[:2], t[:2], text[:2]).sample
    with torch.no_grad():
        pred_c = unet(noisy[2:], t[2:], text[2:]).sample
    expected = F.mse_loss(pred_i, noise[:2]) + 0.7 * F.mse_loss(pred_c, noise[2:])
    torch.testing.assert_close(mse, expected, rtol=1e-5, atol=1e-6)
    expected_reg = slow_reg(list(ref.maps.values()), [5, 5], 1, [6, 6], 2.0, 5.0)
    assert reg.item() == pytest.approx(expected_reg, rel=1e-4, abs=1e-12)


class _TinyTextEncoder(torch.nn.Module):
    """(ids (B, 77)) -> ((B, 77, 16),): the interface prior_losses uses."""

    def __init__(self):
        super().__init__()
        self.table = torch.nn.Embedding(64, 16)

    def forward(self, ids):
        return (self.table(ids),)


def test_prior_losses_match_separate_instance_and_class_forwards():
    """prior_losses: VAE latents of both halves, the class prompt's encoding, one joint forward;
    checked against an instance forward and a class forward written out here."""
    from types import SimpleNamespace

    from diffusers import AutoencoderKL

    from attn_utils.train.prior import prior_losses

    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=8, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",)).eval()  # fmt: skip
    unet, encoder = tiny_unet(), _TinyTextEncoder()
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear")
    class_ids = torch.randint(0, 64, (1, 77))
    tr = SimpleNamespace(
        vae=vae, pool=None, text_encoder=encoder, noise_scheduler=sched, token_ids=[5],
        device=torch.device("cpu"), prior=SimpleNamespace(input_ids=class_ids, text=None),
        cfg=SimpleNamespace(train_text_encoder=False, noise_offset=0.0, channels_last=False,
                            prior_loss_weight=0.7),
    )  # fmt: skip
    sc = SimpleNamespace(reg_mean_weight=2.0, reg_var_weight=5.0)
    inst, cls = torch.rand(2, 3, 8, 8) * 2 - 1, torch.rand(3, 3, 8, 8) * 2 - 1  # Bi=2, Bc=3
    text = torch.randn(1, 77, 16)
    stats = TokenStats()
    stats.columns = torch.tensor([[5, 6]])
    with torch.no_grad(), capture_cross_attention(unet, stats):
        mse, reg = prior_losses(tr, unet, (inst, cls), text, torch.Generator().manual_seed(4),
                                stats, sc)  # fmt: skip
    g = torch.Generator().manual_seed(4)  # the same draws in the same order, written out
    sf = vae.config.scaling_factor
    with torch.no_grad():
        li = vae.encode(inst).latent_dist.sample(generator=g) * sf
        lc = vae.encode(cls).latent_dist.sample(generator=g) * sf
        class_text = encoder(class_ids)[0]
    noise = torch.randn(5, 4, 8, 8, generator=g)  # a one-block VAE keeps 8x8
    t = torch.randint(0, 1000, (5,), generator=g)
    ref = KeepProbs()
    with torch.no_grad(), capture_cross_attention(unet, ref):  # the instance half alone
        pred_i = unet(sched.add_noise(li, noise[:2], t[:2]), t[:2], text.expand(2, -1, -1)).sample
    with torch.no_grad():
        noisy_c = sched.add_noise(lc, noise[2:], t[2:])
        pred_c = unet(noisy_c, t[2:], class_text.expand(3, -1, -1)).sample
    expected = F.mse_loss(pred_i, noise[:2]) + 0.7 * F.mse_loss(pred_c, noise[2:])
    torch.testing.assert_close(mse, expected, rtol=1e-5, atol=1e-6)
    expected_reg = slow_reg(list(ref.maps.values()), [5, 5], 1, [6, 6], 2.0, 5.0)
    assert reg.item() == pytest.approx(expected_reg, rel=1e-4, abs=1e-12)
    torch.testing.assert_close(tr.prior.text, class_text)  # encoded once, kept for the run


def test_regulariser_off_installs_no_capture():
    unet = tiny_unet()
    before = dict(unet.attn_processors)
    stats = TokenStats()
    with capture_if(False, unet, stats):
        assert dict(unet.attn_processors) == before  # fused kernels everywhere
        mse, reg = denoise_losses(
            unet, DDPMScheduler(), torch.zeros(2, 4, 8, 8), torch.zeros(1, 77, 16),
            torch.Generator().manual_seed(0), stats, 1, 0.0, 0.0,
        )  # fmt: skip
    assert stats.stats == {} and reg.item() == 0.0 and mse.item() > 0
    with capture_if(True, unet, stats):
        assert dict(unet.attn_processors) != before


def _fake_sampler(calls: list, fail_on: int | None = None):
    def sample(seeds):
        calls.append(list(seeds))
        if fail_on is not None and len(calls) == fail_on:
            raise KeyboardInterrupt
        return [
            Image.new("RGB", (8, 8), tuple(s % 251 for s in (x, x // 7, x // 13))) for x in seeds
        ]

    return sample


def test_class_generation_resumes_after_an_interruption(tmp_path):
    whole, part = tmp_path / "whole", tmp_path / "part"
    calls: list = []
    assert generate_class_images(whole, 5, _fake_sampler(calls), 2, seed=0, show_bar=False) == 5
    assert [len(c) for c in calls] == [2, 2, 1]  # batched
    interrupted: list = []
    with pytest.raises(KeyboardInterrupt):
        generate_class_images(part, 5, _fake_sampler(interrupted, 2), 2, seed=0, show_bar=False)
    assert [p.name for p in class_image_files(part)] == ["class_00000.png", "class_00001.png"]
    (part / ".tmp-class_00002.png").write_bytes(b"half")  # a write cut short
    again: list = []
    assert generate_class_images(part, 5, _fake_sampler(again), 2, seed=0, show_bar=False) == 3
    assert again == calls[1:]  # resumed at image 2 with the same per-image seeds
    assert not list(part.glob(".tmp-*"))
    assert [p.read_bytes() for p in class_image_files(part)] == [
        p.read_bytes() for p in class_image_files(whole)
    ]
    assert generate_class_images(part, 5, _fake_sampler([]), 2, seed=0, show_bar=False) == 0


def test_unreadable_class_image_is_one_clear_line(tmp_path, tiny_model, concept, capsys):
    bad = tmp_path / "classes"
    bad.mkdir()
    (bad / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ConfigError, match="broken.png"):
        generate_class_images(bad, 3, _fake_sampler([]), 2, seed=0, show_bar=False)
    argv = _argv(tiny_model, concept, tmp_path / "run", "dreambooth", "--class_data_dir", str(bad))
    line, _ = cli_error(train_attndreambooth.main, capsys, argv)
    assert line.startswith("error: --class_data_dir:") and "broken.png" in line
    assert not (tmp_path / "run" / "stage_3").exists()


def _argv(model, data, out, method, *extra) -> list[str]:
    steps = {
        "ti": ["--ti_train_steps", "2", "--ti_ga", "2"],
        "dreambooth": ["--unet_train_steps", "2", "--unet_bs", "2"],
        "ti_db": ["--ti_train_steps", "2", "--ti_bs", "2", "--unet_train_steps", "2"],
    }[method]
    prior = ["--num_class_images", "3", "--sample_batch_size", "2", "--class_inference_steps", "2"]
    if method == "ti_db":
        prior = ["--with_prior_preservation", *prior, "--unet_bs", "1"]
    if method == "ti":  # also: the authors' validation before training, and only that
        prior = ["--validation_prompt", "a photo of {}", "--validate_before_training"]
        prior += ["--ti_validation_steps", "0", "--validation_inference_steps", "1"]
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
        "--category", TINY_CATEGORY, "--output_dir", str(out), "--resolution",
        str(TINY_RESOLUTION), "--method", method, *steps, *prior, *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, concept) -> dict:
    root = tmp_path_factory.mktemp("methods")
    out = {}
    from attn_utils.train import trainer as trainer_module

    real_step, clips = trainer_module.optimizer_step, {}

    def recording(optimizer, scaler, params, max_grad_norm):  # the clip each update gets
        clips.setdefault(method, set()).add(max_grad_norm)
        return real_step(optimizer, scaler, params, max_grad_norm)

    # Under the device emulation (tests/test_device.py): no project tensor without a device.
    with ForeignDefaultDevice() as mode, pytest.MonkeyPatch.context() as m:
        m.setattr(trainer_module, "optimizer_step", recording)
        for method in ("ti", "dreambooth", "ti_db"):
            out[method] = root / method
            argv = _argv(tiny_model, concept, out[method], method)
            assert train_attndreambooth.main(argv) == 0
    assert mode.redirected == []
    # dreambooth clips at 1.0 as its example; ti never; ti_db as each recipe it combines
    assert clips == {"ti": {None}, "dreambooth": {1.0}, "ti_db": {None, 1.0}}
    return out


def _unet(path):
    return load_file(str(path / "unet" / "diffusion_pytorch_model.safetensors"))


def test_each_method_trains_its_set_and_leaves_the_same_layout(runs, tiny_model):
    base = _unet(tiny_model)
    ti, db, tidb = runs["ti"], runs["dreambooth"], runs["ti_db"]
    assert (ti / "stage_1" / "learned_embeds.safetensors").is_file()
    assert not (ti / "stage_2").exists() and not (ti / "stage_3").exists()
    assert [p.name for p in (ti / "validation" / "stage_1").iterdir()] == ["step_0.png"]
    assert not (db / "stage_1").exists() and (db / "stage_3" / "stage_info.json").is_file()
    changed = {k for k, v in _unet(db / "stage_3").items() if not torch.equal(v, base[k])}
    assert len(changed) > 0.9 * len(base)  # the whole U-Net trains
    assert len(class_image_files(db / "class_images")) == 3
    cfg = json.loads((db / "run_config.json").read_text())
    assert cfg["method"] == "dreambooth" and cfg["placeholder_tokens"] == ["sks"]
    assert (tidb / "stage_1").is_dir() and (tidb / "stage_3").is_dir()
    assert not (tidb / "stage_2").exists()
    # TI+DB: [V] kept training with the U-Net; stage 3 holds its own copy of the embedding
    first = load_file(str(tidb / "stage_1" / "learned_embeds.safetensors"))["new_concept_v0"]
    later = load_file(str(tidb / "stage_3" / "learned_embeds.safetensors"))["new_concept_v0"]
    assert not torch.equal(first, later) and torch.isfinite(later).all()
    changed = {k for k, v in _unet(tidb / "stage_3").items() if not torch.equal(v, base[k])}
    assert len(changed) > 0.9 * len(base)
    emb = load_file(str(ti / "stage_1" / "learned_embeds.safetensors"))
    assert list(emb) == ["new_concept_v0"]


def test_a_finished_dreambooth_run_is_reused(runs, tiny_model, concept, capsys):
    files = class_image_files(runs["dreambooth"] / "class_images")
    mtimes = [p.stat().st_mtime_ns for p in files]
    argv = _argv(tiny_model, concept, runs["dreambooth"], "dreambooth")
    assert train_attndreambooth.main(argv) == 0
    assert "stage 3: already complete" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in files] == mtimes  # nothing regenerated


@pytest.mark.parametrize("method", ["ti", "dreambooth", "ti_db"])
def test_inference_renders_every_method(runs, method, tmp_path):
    save = tmp_path / "out"
    argv = ["--run_dir", runs[method], "--prompt", "a photo of {} on the beach",
            "--save_dir", save, "--num_images_per_prompt", "1", "--num_inference_steps", "2",
            "--seed", "0"]  # fmt: skip
    assert inference.main([str(a) for a in argv]) == 0
    index = json.loads((save / "index.json").read_text())
    (entry,) = index["prompts"].values()
    prompt = (save / entry["dir"] / "prompt.txt").read_text().strip()
    concept = "sks sloth" if method == "dreambooth" else "new_concept_v0 sloth"
    assert prompt == f"a photo of {concept} on the beach"
    from attn_utils.evaluate.scoring import placeholder_words  # what CLIP-T leaves out

    assert placeholder_words(index["settings"]) == [concept.split()[0]]
    if method != "dreambooth":  # the newest embedding: stage 3's for ti_db
        stage = "stage_3" if method == "ti_db" else "stage_1"
        assert index["settings"]["embedding_path"].endswith(f"{stage}/learned_embeds.safetensors")
    assert (save / entry["files"][0]).is_file()


def test_dreambooth_adds_no_token_and_ti_draws_a_template_per_sample(tiny_model):
    from types import SimpleNamespace

    from attn_utils.models import load_base_model
    from attn_utils.train.prompts import concept_token_ids, prompt_ids, training_prompts
    from train_attndreambooth import parse_args

    m = load_base_model(str(tiny_model))
    rows = m.text_encoder.get_input_embeddings().weight.shape[0]
    db, _ = parse_args([*BASE, "--category", "sloth", "--method", "dreambooth"])
    ids = concept_token_ids(db, m.tokenizer, m.text_encoder)
    assert ids == m.tokenizer("sks", add_special_tokens=False).input_ids
    assert m.text_encoder.get_input_embeddings().weight.shape[0] == rows  # nothing added
    ti, _ = parse_args([*BASE, "--category", "sloth", "--method", "ti", "--ti_bs", "4"])
    ids = concept_token_ids(ti, m.tokenizer, m.text_encoder)
    input_ids, columns = training_prompts(ti, m.tokenizer, ids, templates=True)
    assert input_ids.shape == (27, 77) and columns.shape == (27, 2)
    fake = SimpleNamespace(
        input_ids=input_ids, columns=columns, cfg=ti,
        acc=SimpleNamespace(num_processes=1, process_index=0),
    )  # fmt: skip
    stats = SimpleNamespace(columns=None)
    picks = [prompt_ids(fake, 1, micro, stats) for micro in range(8)]
    assert picks[0].shape == (4, 77)
    assert torch.equal(picks[3], prompt_ids(fake, 1, 3, stats))  # a resumed stage draws the same
    drawn = {tuple(r.tolist()) for p in picks for r in p}
    assert len(drawn) > 10  # the templates vary across samples
    for row, cols in zip(prompt_ids(fake, 1, 0, stats), stats.columns):  # columns follow the row
        assert row[cols[0]].item() == ids[0]
