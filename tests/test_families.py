"""Each supported base family (SD 2.1-base, SD 2.1 v-prediction, SD 1.5) trains and renders;
the family and the default resolution come from the model's files, never from its name.

The tiny models carry each family's distinguishing traits (attn_utils.tiny.FAMILIES).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import train_argv
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

import inference
import train_attndreambooth
from attn_utils.families import native_resolution
from attn_utils.tiny import build_tiny_model

FAST_RENDER = ["--num_inference_steps", "2", "--resolution", "64", "--num_images_per_prompt", "1"]


def _spy(monkeypatch, cls, name: str, seen: list) -> None:
    """Record self.config.prediction_type each time cls.<name> runs."""
    original = getattr(cls, name)

    def wrapper(self, *args, **kwargs):
        seen.append(self.config.prediction_type)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, name, wrapper)


@pytest.mark.parametrize(
    "family, prediction_type, linear_projection, text_act",
    [
        ("sd21-base", "epsilon", True, "gelu"),
        ("sd21-v", "v_prediction", True, "gelu"),
        ("sd15", "epsilon", False, "quick_gelu"),
    ],
)
def test_family_trains_three_stages_and_renders(
    family, prediction_type, linear_projection, text_act, concept, tmp_path, monkeypatch
):
    model = build_tiny_model(tmp_path / family, family=family)
    unet_cfg = json.loads((model / "unet" / "config.json").read_text())
    text_cfg = json.loads((model / "text_encoder" / "config.json").read_text())
    assert unet_cfg["use_linear_projection"] is linear_projection
    assert text_cfg["hidden_act"] == text_act

    velocity, samples = [], []  # the training target's and the sampler's prediction types
    _spy(monkeypatch, DDPMScheduler, "get_velocity", velocity)
    _spy(monkeypatch, DPMSolverMultistepScheduler, "convert_model_output", samples)
    run = tmp_path / "run"
    assert train_attndreambooth.main(train_argv(model, concept, run)) == 0
    for k in (1, 2, 3):
        assert (run / f"stage_{k}" / "stage_info.json").is_file(), k
    # v-prediction trains on the velocity target; epsilon never asks for it
    assert bool(velocity) == (prediction_type == "v_prediction")

    samples.clear()
    save = tmp_path / "images"
    argv = ["--run_dir", run, "--prompt", "a photo of {}", "--save_dir", save, *FAST_RENDER]
    assert inference.main([str(a) for a in argv]) == 0
    assert list(save.rglob("*.png"))
    assert samples and set(samples) == {prediction_type}


def _bare(model: Path, concept: Path, out: Path, *extra: str) -> list[str]:
    """train_argv without --resolution: the default shows."""
    argv = train_argv(model, concept, out, *extra)
    i = argv.index("--resolution")
    return argv[:i] + argv[i + 2 :]


def _plan(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert train_attndreambooth.main([*argv, "--dry_run"]) == 0
    return json.loads(capsys.readouterr().out)


def _copy_with_sample_size(model: Path, out: Path, sample_size: int) -> Path:
    """A copy of `model` whose U-Net config says sample_size (its weights do not depend on it)."""
    shutil.copytree(model, out)
    cfg_path = out / "unet" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "sample_size": sample_size}))
    return out


@pytest.mark.parametrize(
    "unet, vae, expected",
    [
        ({"sample_size": 64}, {"block_out_channels": [128, 256, 512, 512]}, 512),  # SD 2.1-base
        ({"sample_size": 96}, {"block_out_channels": [128, 256, 512, 512]}, 768),  # SD 2.1
        ({"sample_size": 128}, {"block_out_channels": [128, 256, 512, 512]}, 1024),  # SDXL
        ({"sample_size": [96, 96]}, {"block_out_channels": [1, 2, 3]}, 384),
        ({"sample_size": 96}, None, None),  # unread: the family's default applies
        (None, {"block_out_channels": [1, 2]}, None),
    ],
)
def test_native_resolution_is_sample_size_times_the_vae_factor(unet, vae, expected):
    assert native_resolution(unet, vae) == expected


def test_sd21_v_plans_at_its_native_768(tmp_path, concept, capsys):
    """SD 2.1 (v-prediction) has sample_size 96: 768 px, as inference renders, not SD's 512."""
    model = _copy_with_sample_size(
        build_tiny_model(tmp_path / "sd21-v", family="sd21-v"),
        tmp_path / "stable-diffusion-2-1",
        96,
    )
    argv = _bare(model, concept, tmp_path / "run")
    plan = _plan(capsys, argv)
    assert (plan["family"], plan["resolution"], plan["family_guess"]) == ("sd2", 768, None)
    assert _plan(capsys, [*argv, "--resolution", "512"])["resolution"] == 512  # it overrides


def test_a_run_trains_at_the_models_native_size_and_records_it(tiny_model, concept, tmp_path):
    model = _copy_with_sample_size(tiny_model, tmp_path / "m", 8)  # 8 x the VAE's 8 = 64 px
    out = tmp_path / "run"
    argv = _bare(model, concept, out, "--stages", "1", "--ti_train_steps", "1")
    assert train_attndreambooth.main(argv) == 0
    assert json.loads((out / "run_config.json").read_text())["resolution"] == 64


@pytest.mark.parametrize(
    "family, name, expected",
    [("sdxl", "RealVisXL_V4.0", "sdxl"), ("sdxl", "SSD-1B", "sdxl"),
     ("sd21-base", "tiny-xl-sd", "sd2"), ("sd15", "sdxl", "sd1")],
)  # fmt: skip
def test_a_local_folder_is_told_by_its_files_not_its_name(
    family, name, expected, tiny_model, tiny_sdxl, concept, tmp_path, capsys
):
    known = {"sdxl": tiny_sdxl, "sd21-base": tiny_model}
    src = known.get(family) or build_tiny_model(tmp_path / family, family=family)
    model = shutil.copytree(src, tmp_path / name)
    plan = _plan(capsys, _bare(model, concept, tmp_path / "run"))
    assert plan["family"] == expected and plan["family_guess"] is None
    accumulation = {s["gradient_accumulation_steps"] for s in plan["stages"]}
    assert accumulation == ({4} if expected == "sdxl" else {1})  # SDXL's own layout, or SD's
