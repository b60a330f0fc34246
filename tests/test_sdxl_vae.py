"""SDXL's VAE under fp16: its config says force_upcast, so it encodes and decodes in fp32 with
autocast off (attn_utils/method/vae.py), in training, the latent pool, class images,
validation and inference. A tiny VAE whose first convolutions overflow fp16 (weights up to
6e4, representable; their sums past 65504) stands in for SDXL's."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from device_emulation import ForeignDefaultDevice
from PIL import Image
from safetensors.torch import load_file, save_file

import inference
import train_attndreambooth
from attn_utils.method.vae import vae_decode, vae_encode, vae_weight_dtype
from attn_utils.render.pipeline import make_pipeline, sample_images
from attn_utils.tiny import TINY_CATEGORY, _tiny_vae

FP16_MAX = 65504.0
CONVS = ("encoder.conv_in.weight", "decoder.conv_in.weight")


def overflowing(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The first convolution of encoder and decoder scaled to |w| <= 6e4: fine in fp32,
    inf (then NaN through the group norms) in fp16."""
    out = dict(weights)
    for k in CONVS:
        out[k] = weights[k] * (6e4 / weights[k].abs().max())
    return out


@pytest.fixture(scope="module")
def hot_sdxl(tmp_path_factory, tiny_sdxl):
    """The tiny SDXL model with that VAE (its config: force_upcast true)."""
    path = tmp_path_factory.mktemp("hot_sdxl") / "base_model"
    shutil.copytree(tiny_sdxl, path)
    file = path / "vae" / "diffusion_pytorch_model.safetensors"
    save_file(overflowing(load_file(file)), file)
    return path


def test_fp16_overflows_that_vae_and_the_helpers_run_it_in_fp32():
    torch.manual_seed(0)
    vae = _tiny_vae(force_upcast=True).eval()
    vae.load_state_dict(overflowing(vae.state_dict()))
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    z = torch.ones(2, 4, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):
        vae.half()  # what placement did before: NaN, the failure this file is about
        assert not vae.encode(x.half()).latent_dist.mean.isfinite().all()
        assert not vae.decode(z.half()).sample.isfinite().all()
        assert vae_encode(vae, x).mean.isfinite().all()  # fp16 weights: upcast for the call
        assert vae.dtype == torch.float16  # and restored
        vae.to(vae_weight_dtype(vae, torch.float16))
        assert vae.dtype == torch.float32  # placement keeps it fp32
        mean = vae_encode(vae, x).mean
        image = vae_decode(vae, z)
    assert mean.dtype == image.dtype == torch.float32
    assert mean.isfinite().all() and image.isfinite().all()
    assert mean.abs().max() < FP16_MAX


def test_only_fp16_with_force_upcast_keeps_the_vae_fp32():
    up, plain = _tiny_vae(force_upcast=True), _tiny_vae(force_upcast=False)
    assert vae_weight_dtype(up, torch.float16) == torch.float32
    assert vae_weight_dtype(plain, torch.float16) == torch.float16  # the config says it is safe
    assert vae_weight_dtype(up, torch.bfloat16) == torch.bfloat16  # bf16 has fp32's range
    assert vae_weight_dtype(up, None) == torch.float32
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert vae_encode(up.to(torch.bfloat16), x).mean.dtype == torch.bfloat16  # unchanged


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_sample_images_is_the_pipelines_own_decode(family, tiny_model, tiny_sdxl):
    """In fp32 our decode (latents out of the pipeline, then vae_decode) equals the pipeline's
    own decode to the bit, on SD's pipeline and on SDXL's."""
    from attn_utils.models import load_base_model

    m = load_base_model(str(tiny_sdxl if family == "sdxl" else tiny_model))
    pipe = make_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, m.noise_scheduler.config)
    kw = dict(prompt="a photo", num_inference_steps=2, height=64, width=64)
    ours = sample_images(pipe, generator=torch.Generator("cpu").manual_seed(0), **kw)
    theirs = pipe(generator=torch.Generator("cpu").manual_seed(0), **kw).images
    assert [np.asarray(a).tobytes() for a in ours] == [np.asarray(b).tobytes() for b in theirs]


def _not_black(path) -> bool:
    return bool(np.asarray(Image.open(path).convert("RGB")).any())


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps one process-wide state whose mixed precision is fixed by the first
    Accelerator of the process: other in-process runs of the suite chose "no" before."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("extra", [[], ["--cache_latents"]], ids=["encode", "pool"])
def test_sdxl_trains_and_samples_under_fp16_with_that_vae(
    hot_sdxl, concept, tmp_path, extra, fresh_accelerate_state
):
    """DreamBooth with prior preservation and validation under --mixed_precision fp16 on the
    device emulation: finite losses (the run would stop, exit 3, on a NaN latent), class and
    validation images not black; then inference in fp16."""
    run, classes = tmp_path / "run", tmp_path / "classes"
    argv = ["--pretrained_model_name_or_path", str(hot_sdxl), "--instance_data_dir",
            str(concept), "--category", TINY_CATEGORY, "--output_dir", str(run), "--method",
            "dreambooth", "--mixed_precision", "fp16", "--class_data_dir", str(classes),
            "--num_class_images", "2", "--sample_batch_size", "2", "--class_inference_steps",
            "2", "--unet_train_steps", "2", "--unet_batch_size", "2", "--validation_prompt",
            "a {} on a hill", "--validation_inference_steps", "2", "--num_validation_images",
            "1", *extra]  # fmt: skip
    with ForeignDefaultDevice() as mode:
        assert train_attndreambooth.main(argv) == 0
        sampled = sorted(classes.glob("class_*.png")) + sorted((run / "validation").rglob("*.png"))
        assert len(sampled) == 3 and all(_not_black(p) for p in sampled), sampled
        rc = inference.main([
            "--run_dir", str(run), "--prompt", "a {} on a hill", "--save_dir",
            str(tmp_path / "o"), "--num_images_per_prompt", "1", "--num_inference_steps", "2",
            "--resolution", "64", "--dtype", "fp16", "--category", TINY_CATEGORY,
        ])  # fmt: skip
        assert rc == 0
    assert mode.redirected == []
    rendered = sorted((tmp_path / "o").rglob("*.png"))
    assert rendered and all(_not_black(p) for p in rendered), rendered
