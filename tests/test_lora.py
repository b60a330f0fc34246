"""Issue 19: LoRA adapters for the U-Net stages (--attn_lora_rank, --unet_lora_rank).

Unit tests on the tiny model's U-Net (its trainable set, step 0, the capture through the
adapters, the regulariser's gradient), then short runs of every method with LoRA: rendered
by inference.py, loaded by plain diffusers, resumed bitwise, on two processes, bad flags.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import ROOT, cli_error, render_one, train_argv
from diffusers import DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

import attn_utils.train.checkpoint as ck
import train_attndreambooth
from attn_utils.config import STAGE_NAMES, StageConfig
from attn_utils.method.capture import TokenStats, capture_cross_attention
from attn_utils.method.step import denoise_losses
from attn_utils.render.export import load_concept, resolve_source
from attn_utils.runfiles import LORA_WEIGHTS
from attn_utils.tiny import TINY_CATEGORY, TINY_RESOLUTION
from attn_utils.train.lora import target_modules
from attn_utils.train.stages import finish_trainable, select_trainable
from attn_utils.train.trainer import Trainer

LORA = lambda stage, rank=4, **kw: StageConfig(  # noqa: E731
    index=stage, learning_rate=1e-4, train_steps=1, batch_size=2, reg_mean_weight=2.0,
    reg_var_weight=5.0, validation_steps=0, lora_rank=rank,
    lora_targets=kw.pop("targets", "attn2" if stage == 2 else "attention"), **kw,
)  # fmt: skip


@pytest.fixture
def unet(tiny_model):
    return UNet2DConditionModel.from_pretrained(tiny_model / "unet").eval()


def _inputs(unet, seed=0):
    """(latents (2, 4, h, w), text (1, 77, D), regulariser columns) for the tiny U-Net."""
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    latents = torch.randn(2, 4, size, size, generator=g)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=g)
    stats = TokenStats()
    stats.columns = torch.tensor([[5, 6]])
    return latents, text, stats


def _losses(unet, latents, text, stats, seed=7):
    sched = DDPMScheduler(num_train_timesteps=1000)
    with capture_cross_attention(unet, stats):
        gen = torch.Generator().manual_seed(seed)
        return denoise_losses(unet, sched, latents, text, gen, stats, 1, 2.0, 5.0)


def _randomise_up(unet, seed=1):
    """Give every adapter a non-zero B, so the adapted U-Net differs from the base."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- the adapters themselves


@pytest.mark.parametrize("stage,targets", [(2, "attn2"), (3, "attention"), (3, "all")])
def test_only_the_adapters_of_the_stage_targets_train(unet, tiny_model, stage, targets):
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(tiny_model / "text_encoder")
    base = {k: v.clone() for k, v in unet.state_dict().items()}
    modules = dict(unet.named_modules())
    wanted = target_modules(unet, targets)
    expected = 0  # r x (in + out) per Linear; r x in x k x k + out x r per Conv2d
    for name in wanted:
        m = modules[name]
        if isinstance(m, torch.nn.Conv2d):
            expected += 4 * m.in_channels * m.kernel_size[0] * m.kernel_size[1] + m.out_channels * 4
        else:
            expected += 4 * (m.in_features + m.out_features)
    params = select_trainable(stage, unet, te, [], lora=LORA(stage, targets=targets))
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == set(params.named) and all(".lora_" in n for n in trainable)
    assert {n.split(".lora_")[0] for n in trainable} == set(wanted)
    assert sum(p.numel() for p in params.named.values()) == expected
    if targets == "attn2":
        assert all(".attn2." in n for n in wanted) and len(wanted) == 4 * len(
            [n for n in modules if n.endswith(".attn2")]
        )
    if targets == "all":
        assert len(wanted) > 4 * len([n for n in modules if n.endswith(".attn1")]) * 2
    assert not any(p.requires_grad for p in te.parameters())
    state = finish_trainable(stage, params, te, unet)  # zero B: merging changes nothing
    assert state and all(k.startswith("unet.") for k in state)
    after = unet.state_dict()
    assert after.keys() == base.keys() and all(torch.equal(after[k], base[k]) for k in base)


@pytest.mark.parametrize("stage,targets,alpha", [(2, "attn2", 2.0), (3, "attention", 8.0),
                                                 (3, "all", None)])  # fmt: skip
def test_the_written_adapters_are_what_trained(unet, stage, targets, alpha):
    """The stage's end merges the written file (scale folded in) into the weights: the U-Net
    then computes what it computed with the live adapters."""
    lora = LORA(stage, targets=targets, lora_alpha=alpha)
    params = select_trainable(stage, unet, torch.nn.Embedding(1, 1), [], lora=lora)
    _randomise_up(unet)
    latents, text, _ = _inputs(unet)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        live = unet(latents, t, text.expand(2, -1, -1)).sample
    state = finish_trainable(stage, params, torch.nn.Embedding(1, 1), unet)
    assert all(".lora_A." in k or ".lora_B." in k for k in state)
    assert not any("lora" in n for n, _ in unet.named_modules())
    with torch.no_grad():
        merged = unet(latents, t, text.expand(2, -1, -1)).sample
    torch.testing.assert_close(merged, live, rtol=1e-4, atol=1e-4)


def test_losses_at_step_0_equal_the_full_weight_path(unet):
    latents, text, stats = _inputs(unet)
    mse, reg = _losses(unet, latents, text, stats)
    select_trainable(3, unet, torch.nn.Embedding(1, 1), [], lora=LORA(3))  # B = 0
    assert any(".lora_A." in n for n, _ in unet.named_parameters())
    mse_l, reg_l = _losses(unet, latents, text, stats)
    assert torch.equal(mse, mse_l) and torch.equal(reg, reg_l) and reg > 0


@pytest.mark.parametrize("stage", [2, 3])
def test_the_capture_sees_the_adapted_projections(unet, stage):
    latents, text, stats = _inputs(unet)
    with torch.no_grad():
        _losses(unet, latents, text, stats)
    base_stats = {k: v[0].clone() for k, v in stats.stats.items()}
    select_trainable(stage, unet, torch.nn.Embedding(1, 1), [], lora=LORA(stage))
    _randomise_up(unet)
    merged = copy.deepcopy(unet)
    merged.fuse_lora()
    merged.unload_lora()
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        _losses(unet, latents, text, stats)
        adapted = {k: (m.clone(), v.clone()) for k, (m, v) in stats.stats.items()}
        _losses(merged, latents, text, stats)
    assert adapted.keys() == stats.stats.keys() == base_stats.keys()
    for layer, (mean, var) in adapted.items():
        torch.testing.assert_close(mean, stats.stats[layer][0], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(var, stats.stats[layer][1], rtol=1e-4, atol=1e-8)
    # the adapters changed the maps: a capture that bypassed them would fail the above
    moved = max((adapted[k][0] - base_stats[k]).abs().max().item() for k in base_stats)
    assert moved > 1e-3


def test_the_regulariser_gradient_reaches_every_cross_attention_adapter(unet):
    latents, text, stats = _inputs(unet)
    params = select_trainable(2, unet, torch.nn.Embedding(1, 1), [], lora=LORA(2))
    _randomise_up(unet)  # with B = 0, A's gradient is 0 by construction
    _, reg = _losses(unet, latents, text, stats)
    reg.backward()
    assert len(params.named) == 2 * 4 * len(stats.stats)  # A and B of 4 projections per layer
    qk = {n: p for n, p in params.named.items() if ".to_q." in n or ".to_k." in n}
    assert len(qk) == 2 * 2 * len(stats.stats)
    for name, p in qk.items():  # every map depends on its layer's queries and keys
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ---------------------------------------------------------------- runs of every method

PRIOR = ["--num_class_images", "2", "--sample_batch_size", "2", "--class_inference_steps", "2"]
RUNS = {  # name: (method, extra flags); 2 steps a stage
    "attndreambooth": ("attndreambooth", ["--attn_lora_rank", "4", "--unet_lora_rank", "4",
                                          "--unet_lora_alpha", "8"]),
    "attn_lora_full_unet": ("attndreambooth", ["--attn_lora_rank", "2"]),
    "full_attn_unet_lora": ("attndreambooth", ["--unet_lora_rank", "2",
                                               "--unet_lora_targets", "all"]),
    "dreambooth": ("dreambooth", ["--unet_lora_rank", "4", *PRIOR]),
    "ti_db": ("ti_db", ["--unet_lora_rank", "4", "--no-with_prior_preservation"]),
    "no_stage1": ("no_stage1", ["--attn_lora_rank", "4", "--unet_lora_rank", "4"]),
    "no_reg": ("no_reg", ["--unet_lora_rank", "4", "--unet_lora_dropout", "0.1"]),
    "core": ("core", ["--unet_lora_rank", "4"]),
}  # fmt: skip


def _run_argv(model, data, out, method, extra):
    """The tiny run's flags, for the stages the method has: 2 steps, batch 2 (1 with prior)."""
    from attn_utils.train.methods import RECIPES

    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
            "--category", TINY_CATEGORY, "--output_dir", str(out), "--resolution",
            str(TINY_RESOLUTION), "--method", method, *extra]  # fmt: skip
    for idx in RECIPES[method].stages:
        pre = STAGE_NAMES[idx]
        argv += [f"--{pre}_train_steps", "2", f"--{pre}_batch_size", "1" if idx == 3 else "2"]
    return argv


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, concept) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("lora_runs")
    out = {}
    for name, (method, extra) in RUNS.items():
        out[name] = root / name
        assert train_attndreambooth.main(_run_argv(tiny_model, concept, out[name], method,
                                                   extra)) == 0, name  # fmt: skip
    return out


def _stage_folders(run: Path) -> dict[int, set[str]]:
    return {k: {p.name for p in (run / f"stage_{k}").iterdir()}
            for k in (1, 2, 3) if (run / f"stage_{k}").is_dir()}  # fmt: skip


def test_lora_stages_write_only_the_adapters(runs, tiny_model):
    want = {
        "attndreambooth": {2: "unet_lora", 3: "unet_lora"},
        "attn_lora_full_unet": {2: "unet_lora", 3: "unet"},
        "full_attn_unet_lora": {2: "unet", 3: "unet_lora"},
        "dreambooth": {3: "unet_lora"},
        "ti_db": {3: "unet_lora"},
        "no_stage1": {2: "unet_lora", 3: "unet_lora"},
        "no_reg": {2: "unet", 3: "unet_lora"},
        "core": {3: "unet_lora"},
    }
    unet_bytes = (tiny_model / "unet" / "diffusion_pytorch_model.safetensors").stat().st_size
    for name, stages in want.items():
        folders = _stage_folders(runs[name])
        for k, kind in stages.items():
            assert kind in folders[k] and ({"unet", "unet_lora"} - {kind}).isdisjoint(folders[k])
            info = json.loads((runs[name] / f"stage_{k}" / "stage_info.json").read_text())
            if kind == "unet_lora":
                f = runs[name] / f"stage_{k}" / "unet_lora" / LORA_WEIGHTS
                state = load_file(str(f))
                assert f.stat().st_size < unet_bytes / 4, name
                ups = [v for n, v in state.items() if ".lora_B." in n]
                assert ups and any(v.abs().sum() > 0 for v in ups), name  # it trained
                assert info["lora"]["trainable_params"] == sum(v.numel() for v in state.values())
    assert "learned_embeds.safetensors" in _stage_folders(runs["ti_db"])[3]  # [V] trained too


def _plain_unet(run: Path, stage: int, tiny_model: Path):
    """The U-Net a user gets with plain diffusers, following docs/methods.md: the base (or
    the newest full unet/), then pipe.load_lora_weights of each LoRA stage after it."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    names = []
    warnings.filterwarnings("ignore", "Already found a `peft_config`")  # stacking: intended
    for k in range(2, stage + 1):
        d = run / f"stage_{k}"
        if (d / "unet").is_dir():
            pipe.unet = UNet2DConditionModel.from_pretrained(d / "unet")
            names = []
        elif (d / "unet_lora").is_dir():
            pipe.load_lora_weights(str(d / "unet_lora"), adapter_name=f"stage_{k}")
            names.append(f"stage_{k}")
    if names:
        pipe.set_adapters(names, [1.0] * len(names))
    return pipe.unet.eval()


@pytest.mark.parametrize("name", list(RUNS))
def test_plain_diffusers_loads_what_inference_renders(runs, tiny_model, name, tmp_path):
    run = runs[name]
    concept = load_concept(resolve_source(run_dir=str(run)))
    stage = 3
    plain = _plain_unet(run, stage, tiny_model)
    latents, text, _ = _inputs(plain, seed=3)
    t = torch.tensor([500, 20])
    with torch.no_grad():
        ours = concept.unet(latents, t, text.expand(2, -1, -1)).sample
        theirs = plain(latents, t, text.expand(2, -1, -1)).sample
        base = UNet2DConditionModel.from_pretrained(tiny_model / "unet")(
            latents, t, text.expand(2, -1, -1)
        ).sample
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(ours, base, rtol=0, atol=1e-6)  # the concept is in it
    prompt = render_one(run, "a photo of {} on the beach", tmp_path / "render")
    assert "on the beach" in prompt


def test_export_writes_the_merged_pipeline(runs, tmp_path):
    import inference

    run, out = runs["attndreambooth"], tmp_path / "exported"
    assert inference.main(["--run_dir", str(run), "--export_pipeline", str(out)]) == 0
    exported = UNet2DConditionModel.from_pretrained(out / "unet")
    merged = load_concept(resolve_source(run_dir=str(run))).unet
    assert not any("lora" in k for k in exported.state_dict())
    assert all(torch.equal(v, merged.state_dict()[k]) for k, v in exported.state_dict().items())


def test_a_lora_stage_2_result_renders_alone(runs, tmp_path):
    src = resolve_source(run_dir=str(runs["attndreambooth"]), stage=2)
    assert src.unet_path is None and [Path(p).parent.name for p in src.unet_loras] == ["stage_2"]
    src = resolve_source(run_dir=str(runs["full_attn_unet_lora"]))
    assert Path(src.unet_path).parent.name == "stage_2"
    assert [Path(p).parent.name for p in src.unet_loras] == ["stage_3"]


# ---------------------------------------------------------------- resume, processes, flags


class Crash(RuntimeError):
    pass


def test_resume_mid_stage_is_bitwise_exact_with_adapters(
    run_train, capsys, monkeypatch, tmp_path, tiny_model, concept
):
    """Stage 2 LoRA (alpha != rank: the written adapters are folded), then stage 3 LoRA with
    dropout, crashed after its step-2 checkpoint and launched again."""
    flags = ["--attn_lora_rank", "4", "--attn_lora_alpha", "2", "--unet_lora_rank", "4",
             "--unet_lora_dropout", "0.2", "--unet_train_steps", "4"]  # fmt: skip
    full = tmp_path / "a"
    assert run_train(train_argv(tiny_model, concept, full, *flags)) == 0
    out = tmp_path / "b"
    argv = train_argv(tiny_model, concept, out, *flags, "--unet_checkpointing_steps", "2")
    real, calls = Trainer._optimizer_step, [0]

    def crashing(self, *args, **kwargs):
        calls[0] += self.stage_cfg.index == 3
        if calls[0] == 3:
            raise Crash("simulated crash in stage 3 step 3")
        return real(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_optimizer_step", crashing)
        with pytest.raises(Crash):
            run_train(argv)
    assert [p.name for p in ck.list_checkpoints(out)] == ["checkpoint-s3-000002"]
    capsys.readouterr()
    assert run_train(argv) == 0
    assert "resumed from" in capsys.readouterr().out
    for k in (2, 3):
        a = load_file(str(full / f"stage_{k}" / "unet_lora" / LORA_WEIGHTS))
        b = load_file(str(out / f"stage_{k}" / "unet_lora" / LORA_WEIGHTS))
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
    # and the dropout really drew masks: without it the adapters end elsewhere
    other = tmp_path / "c"
    no_drop = [f if f != "0.2" else "0.0" for f in flags]
    assert run_train(train_argv(tiny_model, concept, other, *no_drop)) == 0
    c = load_file(str(other / "stage_3" / "unet_lora" / LORA_WEIGHTS))
    a = load_file(str(full / "stage_3" / "unet_lora" / LORA_WEIGHTS))
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_two_processes_hold_the_same_adapters(tmp_path, tiny_model, concept):
    out = tmp_path / "ddp"
    flags = ["--attn_lora_rank", "2", "--unet_lora_rank", "2", "--unet_lora_dropout", "0.1"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "train_attndreambooth.py"),
           *train_argv(tiny_model, concept, out, *flags)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for k in (2, 3):
        info = json.loads((out / f"stage_{k}" / "stage_info.json").read_text())
        sums = info["rank_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], (k, sums)
        assert info["lora"]["rank"] == 2 and (out / f"stage_{k}" / "unet_lora").is_dir()


@pytest.mark.parametrize(
    "extra,line",
    [
        (["--unet_lora_rank", "0"], "--unet_lora_rank: must be >= 1, got 0"),
        (["--attn_lora_rank", "-2"], "--attn_lora_rank: must be >= 1, got -2"),
        (["--unet_lora_rank", "4", "--unet_lora_alpha", "0"], "--unet_lora_alpha: must be > 0"),
        (["--attn_lora_rank", "4", "--attn_lora_dropout", "1"], "--attn_lora_dropout: must be"),
        (["--unet_lora_alpha", "8"], "--unet_lora_alpha: only means something with"),
        (["--unet_lora_targets", "all"], "--unet_lora_targets: only means something with"),
        (["--method", "dreambooth", "--attn_lora_rank", "4"],
         "--attn_lora_rank: --method dreambooth has no stage 2"),
        (["--method", "ti", "--unet_lora_rank", "4"],
         "--unet_lora_rank: --method ti has no stage 3"),
        (["--method", "no_stage2", "--attn_lora_rank", "4"],
         "--attn_lora_rank: --method no_stage2 has no stage 2"),
        (["--method", "dreambooth", "--train_text_encoder", "--unet_lora_rank", "4"],
         "--train_text_encoder: not with --unet_lora_rank"),
    ],
)  # fmt: skip
def test_bad_lora_flags_are_one_line(run_train, capsys, tmp_path, extra, line):
    argv = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
            "--output_dir", str(tmp_path / "o"), "--category", "sloth", *extra]  # fmt: skip
    err, _ = cli_error(run_train, capsys, argv)
    assert err.startswith(f"error: {line}"), err


def test_dry_run_shows_the_adapters(capsys):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d",
            "--output_dir", "o", "--category", "sloth", "--dry_run"]  # fmt: skip
    assert train_attndreambooth.main([*base, "--unet_lora_rank", "8", "--attn_lora_rank",
                                      "4", "--attn_learning_rate", "3e-5"]) == 0  # fmt: skip
    stages = {s["index"]: s for s in json.loads(capsys.readouterr().out)["stages"]}
    assert "lora_rank" not in stages[1]
    assert stages[2]["lora_rank"] == 4 and stages[2]["lora_targets"] == "attn2"
    assert stages[2]["learning_rate"] == 3e-5  # given: kept
    assert stages[3]["lora_rank"] == 8 and stages[3]["lora_targets"] == "attention"
    assert stages[3]["learning_rate"] == 1e-4  # the LoRA default
    assert stages[3]["lora_alpha"] is None and stages[3]["lora_dropout"] == 0.0
