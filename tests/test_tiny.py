"""Tests for the tiny offline Stable Diffusion model and the procedural concept images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from attn_utils.tiny import (
    TINY_CATEGORY,
    TINY_RESOLUTION,
    build_tiny_model,
    draw_concept,
    main,
)

UNET_WEIGHTS = Path("unet") / "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base_model", seed=0)


def test_layout(model_dir: Path) -> None:
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model_dir / sub).is_dir()
    assert not list(model_dir.rglob("*.bin"))  # safetensors only
    index = json.loads((model_dir / "model_index.json").read_text())
    assert index["requires_safety_checker"] is False
    assert index["safety_checker"] == [None, None]
    sched = json.loads((model_dir / "scheduler" / "scheduler_config.json").read_text())
    assert sched["beta_schedule"] == "scaled_linear" and sched["steps_offset"] == 1
    assert sched["set_alpha_to_one"] is False
    # No temp directories left behind next to the model.
    assert [p.name for p in model_dir.parent.iterdir()] == ["base_model"]


def test_pipeline_renders(model_dir: Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 8
    assert pipe.unet.config.sample_size * 8 == TINY_RESOLUTION
    assert pipe.text_encoder.config.hidden_size == pipe.unet.config.cross_attention_dim
    out = pipe(
        f"a photo of a {TINY_CATEGORY}",
        num_inference_steps=1,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert np.isfinite(out.images).all()
    keys = list(pipe.unet.attn_processors)
    assert any("attn2" in k for k in keys) and any("attn1" in k for k in keys)


def test_tokenizer(model_dir: Path) -> None:
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(model_dir), subfolder="tokenizer")
    assert tok.model_max_length == 77
    assert tok.tokenize(f"a photo of a {TINY_CATEGORY}") == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        f"{TINY_CATEGORY}</w>",
    ]
    ids = tok(
        f"a photo of a {TINY_CATEGORY}", padding="max_length", max_length=77, truncation=True
    ).input_ids
    assert len(ids) == 77
    assert ids[0] == tok.bos_token_id and ids[6] == tok.eos_token_id
    assert ids[7:] == [tok.pad_token_id] * 70
    words = "a watercolor painting of a teddy bear wearing a hat in the forest by the beach"
    assert all(t.endswith("</w>") for t in tok.tokenize(words))
    assert len(tok.tokenize(words)) == len(words.split())
    assert tok.tokenize("wombat") == ["wom", "bat</w>"]
    assert tok.tokenize("hedgehog") == ["hedge", "hog</w>"]
    # Byte-level fallback: arbitrary text tokenises without unknown tokens and truncates to 77.
    ids = tok("zqx ñ 42 €!? " * 30, truncation=True, max_length=77).input_ids
    assert len(ids) == 77 and tok.unk_token_id not in ids[1:-1]


def test_deterministic(model_dir: Path, tmp_path: Path) -> None:
    other = build_tiny_model(tmp_path / "again", seed=0)
    a, b = load_file(model_dir / UNET_WEIGHTS), load_file(other / UNET_WEIGHTS)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # A complete model is returned unchanged rather than rebuilt.
    mtime = (other / UNET_WEIGHTS).stat().st_mtime_ns
    assert build_tiny_model(other, seed=1) == other
    assert (other / UNET_WEIGHTS).stat().st_mtime_ns == mtime


def test_draw_concept(tmp_path: Path) -> None:
    out = draw_concept(tmp_path / "a", n_images=3, size=160, seed=1)
    files = sorted(p.name for p in out.iterdir())
    assert files == ["0.jpg", "1.jpg", "2.jpg"]
    arrays = []
    for name in files:
        with Image.open(out / name) as img:
            assert img.format == "JPEG" and img.mode == "RGB" and img.size == (160, 160)
            arrays.append(np.asarray(img))
    assert not np.array_equal(arrays[0], arrays[1])  # varied pose / background
    again = draw_concept(tmp_path / "b", n_images=3, size=160, seed=1)
    for name in files:
        assert (out / name).read_bytes() == (again / name).read_bytes()
    with pytest.raises(ValueError):
        draw_concept(tmp_path / "c", n_images=1, size=64)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # Only the concept half is exercised for speed: base_model is pre-seeded as complete.
    (tmp_path / "base_model").mkdir()
    (tmp_path / "base_model" / "model_index.json").write_text("{}")
    main(["--out", str(tmp_path), "--images", "2"])
    lines = capsys.readouterr().out.split()
    assert lines == [str(tmp_path / "base_model"), str(tmp_path / "concept")]
    assert len(list((tmp_path / "concept").glob("*.jpg"))) == 2
