"""Each supported base family (SD 2.1-base, SD 2.1 v-prediction, SD 1.5) trains and renders.

The tiny models carry each family's distinguishing traits (attn_utils.tiny.FAMILIES).
"""

from __future__ import annotations

import json

import pytest
from conftest import train_argv
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler

import inference
import train_attndreambooth
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
