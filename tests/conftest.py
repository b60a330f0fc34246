"""Shared fixtures: one tiny random-weight SD model and one procedural concept per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny tensors: a second thread only spin-waits on shared cores

from attn_utils.tiny import TINY_CATEGORY, TINY_RESOLUTION, build_tiny_model, draw_concept  # noqa: E402

# Step counts small enough for 2 CPU cores, large enough to exercise every code path.
FAST_STEPS = [
    "--ti_train_steps",
    "4",
    "--attn_train_steps",
    "4",
    "--unet_train_steps",
    "4",
    "--ti_batch_size",
    "2",
    "--attn_batch_size",
    "2",
    "--unet_batch_size",
    "2",
]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "base_model")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """The SDXL-shaped tiny model (attn_utils.tiny.FAMILIES["sdxl"])."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny_sdxl") / "base_model", family="sdxl")


@pytest.fixture(scope="session")
def concept(tmp_path_factory) -> Path:
    return draw_concept(tmp_path_factory.mktemp("concept") / "sloth", n_images=3)


def train_argv(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """argv for train_attndreambooth.main on the tiny model."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--instance_data_dir",
        str(data),
        "--category",
        TINY_CATEGORY,
        "--output_dir",
        str(out),
        "--resolution",
        str(TINY_RESOLUTION),
        *FAST_STEPS,
        *extra,
    ]


@pytest.fixture
def run_train():
    """Call the training CLI in-process; returns its exit code."""
    import train_attndreambooth

    return lambda argv: train_attndreambooth.main(argv)


def cli_error(run_train, capsys, argv: list[str], code: int = 2) -> tuple[str, str]:
    """Run the CLI; assert exit `code`, no traceback and one 'error:' line; (line, stderr)."""
    capsys.readouterr()
    assert run_train(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, err
    return errors[0], err


def render_one(run_dir: Path, prompt: str, save: Path) -> str:
    """Render one image of `prompt` from a run with inference.py; return the prompt it wrote."""
    import json

    import inference

    argv = ["--run_dir", str(run_dir), "--prompt", prompt, "--save_dir", str(save),
            "--num_images_per_prompt", "1", "--num_inference_steps", "2"]  # fmt: skip
    assert inference.main(argv) == 0
    (entry,) = json.loads((save / "index.json").read_text())["prompts"].values()
    return (save / entry["dir"] / "prompt.txt").read_text().strip()
