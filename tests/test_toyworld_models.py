"""The toy world's models (issue 18): the shipped weights and their manifest, an exactly
resuming pretraining, the oracle's scoring, and learning that shows: a short AttnDreamBooth run
on a toy concept raises identity over the base model while the prompt's words still hold."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from attn_utils.config import ConfigError
from attn_utils.evaluate.oracle import Oracle, OracleNet, presence
from attn_utils.model_defaults import MODEL_DEFAULTS, model_defaults
from attn_utils.models import SHIPPED_MANIFEST, load_base_model, verify_shipped
from attn_utils.toyworld import pretrain
from attn_utils.toyworld.world import held_out_triples, is_held_out, scenes

MODELS = ROOT / "models" / "toyworld"


def test_the_shipped_models_match_their_manifest_and_stay_small():
    manifest = json.loads((MODELS / SHIPPED_MANIFEST).read_text())
    verify_shipped(MODELS, "--models")  # raises on any difference
    files = [MODELS / f for f in manifest["files"]]
    assert {f.relative_to(MODELS).parts[0] for f in files} == set(pretrain.PARTS)
    assert sum(f.stat().st_size for f in files) < 25 * 2**20
    assert manifest["seed"] == 0 and "attn_utils.toyworld pretrain" in manifest["command"]
    assert len(manifest["commit"]) == 40


def test_the_base_model_carries_the_render_settings_its_report_measured_with():
    """base/attndreambooth_defaults.json is what the export writes (so a new pretraining makes
    it), listed in the manifest, with the report's sampler and the metric models beside it."""
    from attn_utils.toyworld.export import base_defaults
    from attn_utils.toyworld.report import MEASURED_WITH

    shipped = MODELS / "base" / MODEL_DEFAULTS
    assert json.loads(shipped.read_text()) == json.loads(json.dumps(base_defaults()))
    assert f"base/{MODEL_DEFAULTS}" in json.loads((MODELS / SHIPPED_MANIFEST).read_text())["files"]
    got = model_defaults(str(MODELS / "base"))
    assert got["render"] == MEASURED_WITH == {
        "scheduler": "ddim", "num_inference_steps": 30, "guidance_scale": 4.0
    }  # fmt: skip
    assert {k: Path(v) for k, v in got["metric_models"].items()} == {
        "clip_model": MODELS / "clip", "dino_model": MODELS / "dino",
        "oracle_model": MODELS / "oracle",
    }  # fmt: skip


def test_a_malformed_model_defaults_file_is_one_error_naming_it(tmp_path):
    (tmp_path / MODEL_DEFAULTS).write_text(json.dumps({"render": {"steps": 30}}))
    with pytest.raises(ConfigError, match=MODEL_DEFAULTS):
        model_defaults(str(tmp_path))
    assert model_defaults("someone/hub-model") == {}


def test_an_altered_shipped_file_is_refused_with_one_line_naming_it(tmp_path):
    copy = tmp_path / "toyworld"
    shutil.copytree(MODELS, copy)
    weights = copy / "base" / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    r = subprocess.run(
        [sys.executable, "-m", "attn_utils.toyworld", "verify", "--out", str(copy)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and str(weights) in r.stderr, r.stderr
    with pytest.raises(ConfigError, match="diffusion_pytorch_model.safetensors does not match"):
        load_base_model(str(copy / "base"))
    verify_shipped(copy / "clip", "--clip_model")  # the other parts are still good
    (copy / "oracle" / "config.json").unlink()
    with pytest.raises(ConfigError, match="oracle/config.json is missing"):
        verify_shipped(copy / "oracle", "--oracle_model")


def test_held_out_combinations_never_reach_pretraining():
    assert 15 <= len(held_out_triples()) <= 30
    for s in scenes(5, 400, training=True):
        for t in (s.thing, s.other):
            assert t is None or not is_held_out(t.category, t.colour, s.place)
    assert any(is_held_out(s.thing.category, s.thing.colour, s.place) for s in scenes(5, 400))


def _quick(tmp_path, **changes):
    budget = dataclasses.replace(pretrain.QUICK, scenes=64, vae_batch=4, **changes)
    return pretrain.Pretrainer(tmp_path / "work", tmp_path / "out", 0, budget, 2, ["test"])


class _Stop(Exception):
    pass


def test_an_interrupted_pretraining_resumes_exactly_from_its_last_checkpoint(tmp_path):
    whole = _quick(tmp_path / "a")
    whole.phase_data()
    whole.phase_masks()
    torch.manual_seed(0)  # as Pretrainer.run seeds each phase
    whole.phase_vae()
    cut = _quick(tmp_path / "b")
    cut.phase_data()
    cut.phase_masks()
    torch.manual_seed(0)
    real_train = pretrain.train_phase

    def train_until_5(name, work, steps, modules, opt, loss_fn, *a, **k):
        def stopping(step):
            if step == 5:
                raise _Stop
            return loss_fn(step)

        return real_train(name, work, steps, modules, opt, stopping, *a, **k)

    pretrain.train_phase = train_until_5
    try:
        with pytest.raises(_Stop):
            cut.phase_vae()
    finally:
        pretrain.train_phase = real_train
    assert (cut.work / "vae.ckpt").is_file()  # steps 0-3 are saved (every 2), step 4 is lost
    torch.manual_seed(1)  # the initialisation is overwritten by the checkpoint
    cut.phase_vae()  # resumes at step 4
    from safetensors.torch import load_file

    a = load_file(str(whole.work / "vae" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(cut.work / "vae" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class _FixedNet(torch.nn.Module):
    """Says: beach; photo; a toy and a ball; red (probabilities as logits below)."""

    def forward(self, x):
        b = len(x)

        def rows(values):
            return torch.tensor(values, dtype=torch.float32).repeat(b, 1)

        return {
            "place": rows([5.0, 0, 0]),
            "style": rows([4.0, 0]),
            "category": rows([3.0, 3.0, -3.0]),
            "colour": rows([3.0, -3.0]),
        }


def test_the_oracle_checks_exactly_the_attributes_a_prompt_names():
    config = {
        "heads": {
            "place": ["beach", "snow", "night"],
            "style": ["photo", "sketch"],
            "category": ["toy", "ball", "cup"],
            "colour": ["red", "blue"],
        },
        "multi_label": ["category", "colour"],
        "image_size": 8,
    }
    oracle = Oracle(_FixedNet(), config)
    im = Image.new("RGB", (8, 8))
    prompts = [
        "a photo of a red toy on the beach",  # 4 named, all seen
        "a sketch of a toy in the snow",  # style and place wrong, category right
        "a photo of a toy next to a blue cup",  # photo right; category (toy and cup) and blue not
        "new_concept_v0",  # nothing named
    ]
    got = oracle.scores([im] * 4, prompts)
    assert got[:3].tolist() == [1.0, 1 / 3, 1 / 3] and np.isnan(got[3])
    net = OracleNet(config["heads"], width=8, dense=("category", "colour"))  # the real net
    out = net(torch.zeros(2, 3, 16, 16))
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "place": (2, 3), "style": (2, 2), "category": (2, 4, 4, 4), "colour": (2, 3, 4, 4)
    }  # fmt: skip


def test_a_dense_head_sees_a_small_thing_and_not_one_stray_location():
    logits = torch.zeros(1, 3, 8, 8)  # (nothing, toy, ball) per location
    logits[0, 0] = 5.0  # nothing, everywhere
    logits[0, 1, 2:4, 2:4] = 10.0  # a toy over 2x2 locations (a 16th of a 32 px image)
    logits[0, 2, 6, 6] = 10.0  # a ball at one location only: noise
    p = presence(logits)[0]
    assert p[0] > 0.9 and p[1] < 0.5
    # The same thing through Oracle.predict, with the config's dense heads.
    config = {"heads": {"category": ["toy", "ball"]}, "dense": ["category"], "image_size": 32}
    oracle = Oracle(_DenseNet(logits), config)
    got = oracle.scores([Image.new("RGB", (32, 32))] * 2, ["a photo of a toy", "a ball"])
    assert got.tolist() == [1.0, 0.0]


class _DenseNet(torch.nn.Module):
    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return {"category": self.logits.expand(len(x), -1, -1, -1)}


def test_the_cli_names_the_known_concepts_for_an_unknown_one(tmp_path):
    for argv in (
        ["concepts", "--out", str(tmp_path), "--name", "nope"],
        ["study", "--out", str(tmp_path), "--name", "nope", "--dry_run"],
    ):
        r = subprocess.run([sys.executable, "-m", "attn_utils.toyworld", *argv], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)  # fmt: skip
        assert r.returncode == 2, r.stderr
        assert "unknown toy concept 'nope'" in r.stderr and "checker_toy" in r.stderr
    assert not any(tmp_path.iterdir())


def test_the_toy_study_of_one_concept_and_two_methods_writes_its_table(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a {} in the snow\na sketch of a {}\n")
    out = tmp_path / "study"
    argv = ["study", "--out", str(out), "--name", "dotted_cup", "--methods", "attndreambooth,ti",
            "--images", "40", "--images_per_prompt", "1", "--prompts", str(prompts)]  # fmt: skip
    r = subprocess.run([sys.executable, "-m", "attn_utils.toyworld", *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["metrics"] == ["clip_t", "clip_i", "dino", "oracle"]
    assert [row["variant"] for row in summary["rows"]] == ["stage_1", "stage_3", "ti"]
    assert all(0 <= row["oracle"] <= 1 for row in summary["rows"])
    table = (out / "summary.md").read_text()
    assert "| Oracle |" in table and "Textual Inversion" in table
    assert (out / "report.md").is_file() and (out / "concepts.json").is_file()


def test_the_pretraining_is_deterministic_and_its_export_verifies(tmp_path):
    """Two whole pretrainings (the QUICK size, report skipped) give bitwise-equal exports."""
    hashes = []
    for run in ("a", "b"):
        p = _quick(tmp_path / run)
        p.work.mkdir(parents=True, exist_ok=True)
        (p.work / "report.done").write_text("ok\n")  # a finished phase is skipped
        p.run()
        manifest = json.loads((p.out / SHIPPED_MANIFEST).read_text())
        verify_shipped(p.out, "--out")
        hashes.append(manifest["files"])
    assert hashes[0] == hashes[1]
    assert {f.split("/")[0] for f in hashes[0]} == set(pretrain.PARTS)
    assert f"base/{MODEL_DEFAULTS}" in hashes[0]  # the render settings travel with the model
    # the exported folders load with the standard classes
    from transformers import CLIPModel, CLIPVisionModel

    CLIPModel.from_pretrained(str(tmp_path / "a" / "out" / "clip"))
    CLIPVisionModel.from_pretrained(str(tmp_path / "a" / "out" / "dino"))
    load_base_model(str(tmp_path / "a" / "out" / "base"))
    Oracle.load(tmp_path / "a" / "out" / "oracle")


@pytest.mark.parametrize("model", ["toy", "hub"])
def test_validation_grids_sample_with_the_base_model_folders_settings(model, tmp_path, monkeypatch):
    """Validation during training uses the toy model folder's sampler and guidance (its steps
    stay --validation_inference_steps); a model without the file keeps dpm and guidance 7.5."""
    import contextlib
    from types import SimpleNamespace

    from attn_utils.train import validation

    seen = {}
    monkeypatch.setattr(validation, "sampling_mode", lambda t: contextlib.nullcontext())
    monkeypatch.setattr(validation, "make_pipeline", lambda *a: seen.update(scheduler=a[5]))
    sample = lambda pipe, **kw: seen.update(kw) or [Image.new("RGB", (8, 8))]  # noqa: E731
    monkeypatch.setattr(validation, "sample_images", sample)
    name = str(MODELS / "base") if model == "toy" else "someone/sd"
    cfg = SimpleNamespace(
        num_validation_images=1, pretrained_model_name_or_path=name, seed=0,
        validation_prompt="a {}", placeholder_tokens=["x"], validation_inference_steps=3,
        resolution=64,
    )  # fmt: skip
    trainer = SimpleNamespace(cfg=cfg, validation_embeds={"prompt_embeds": torch.zeros(1, 2)},
                              tokenizer=None, text_encoder=None, vae=None, unet=None,
                              noise_scheduler=SimpleNamespace(config={}), device="cpu")  # fmt: skip
    validation.render_validation(trainer, tmp_path / "grid.png")
    want = ("ddim", 4.0) if model == "toy" else ("dpm", 7.5)
    assert (seen["scheduler"], seen["guidance_scale"], seen["num_inference_steps"]) == (*want, 3)
