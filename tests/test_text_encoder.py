"""DreamBooth's --train_text_encoder: flags, trainable set, checkpoints, resume, inference."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, cli_error
from device_emulation import ForeignDefaultDevice
from safetensors.torch import load_file

import attn_utils.render.export
import attn_utils.train.checkpoint as ck
import inference
import train_attndreambooth
from attn_utils.models import load_base_model
from attn_utils.tiny import TINY_CATEGORY, TINY_RESOLUTION
from attn_utils.train.runtime import build_optimizer, stage_fingerprint
from attn_utils.train.stages import finish_trainable, load_stage_result, select_trainable
from attn_utils.train.text_training import PREFIX, unfreeze_text_encoder
from attn_utils.train.trainer import Trainer
from train_attndreambooth import parse_args

BASE = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--output_dir", "o"]
BASE += ["--category", "sloth"]
TE = "stage_3/text_encoder/model.safetensors"
UNET = "stage_3/unet/diffusion_pytorch_model.safetensors"


class SimulatedCrash(RuntimeError):
    """A power cut during step 3, after the step-2 checkpoint."""


def _plan(capsys, *argv) -> dict:
    assert train_attndreambooth.main([*BASE, "--dry_run", *argv]) == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_shows_it_and_its_lr(capsys):
    plan = _plan(capsys, "--method", "dreambooth", "--train_text_encoder")
    assert plan["train_text_encoder"] and plan["text_encoder_learning_rate"] == 5e-6  # stage 3's
    lrs = ["--text_encoder_learning_rate", "2e-6", "--unet_learning_rate", "2e-6"]
    plan = _plan(capsys, "--method", "dreambooth", "--train_text_encoder", *lrs)
    assert plan["text_encoder_learning_rate"] == 2e-6 and plan["stages"][0]["learning_rate"] == 2e-6
    plan = _plan(capsys)
    assert not plan["train_text_encoder"] and plan["text_encoder_learning_rate"] is None


@pytest.mark.parametrize(
    "argv,flag",
    [
        (["--train_text_encoder"], "--train_text_encoder"),  # attndreambooth: docs/method.md
        (["--method", "ti", "--train_text_encoder"], "--train_text_encoder"),
        (["--method", "ti_db", "--train_text_encoder"], "--train_text_encoder"),
        (["--method", "dreambooth", "--text_encoder_learning_rate", "1e-6"],
         "--text_encoder_learning_rate"),
        (["--method", "dreambooth", "--train_text_encoder", "--text_encoder_learning_rate", "0"],
         "--text_encoder_learning_rate"),
        (["--method", "dreambooth", "--train_text_encoder", "--offload_text_encoder"],
         "--offload_text_encoder"),
    ],
)  # fmt: skip
def test_refused_where_it_does_not_belong(argv, flag, run_train, capsys):
    line, _ = cli_error(run_train, capsys, [*BASE, *argv])
    assert line.startswith(f"error: {flag}:")


def test_fingerprints_change_only_with_it():
    def fps(*argv):
        cfg, _ = parse_args([*BASE, *argv])
        return [stage_fingerprint(cfg, s.index, "D", "M", 1) for s in cfg.stages]

    # Recorded before the flag existed: run folders trained since stay valid.
    assert fps() == [
        "1b2344cd4cace882bf04dfef89ad0b2ad8ef8d7c0a27f874bbea109ab8b5ae78",
        "82fd48e2aabf8c0e30b69df608b52bc16b9c1a65c25794d5ce1b7b0cbf5c2e42",
        "eac46f274a723482fa1980c12bb69a7d84a51d8addbeff7c517769a1d1d59462",
    ]
    db = fps("--method", "dreambooth")
    # changed once on purpose (issue 17: the example's augmentation and its clipping at 1.0)
    assert db == ["9cae4547ccd3297a8d268ba9848b10a346fa2ffb84f2734d8e1d045c3e8bca1e"]
    te = fps("--method", "dreambooth", "--train_text_encoder")
    te2 = fps(
        "--method", "dreambooth", "--train_text_encoder", "--text_encoder_learning_rate", "2e-6"
    )
    assert len({db[0], te[0], te2[0]}) == 3


def test_trainable_set_is_the_unet_and_the_text_encoder(tiny_model):
    cfg, _ = parse_args([*BASE, "--method", "dreambooth", "--train_text_encoder",
                         "--text_encoder_learning_rate", "2e-6", "--no-fused_adam"])  # fmt: skip
    m = load_base_model(str(tiny_model))
    m.text_encoder.eval()
    ids = m.tokenizer("sks", add_special_tokens=False).input_ids
    params = select_trainable(3, m.unet, m.text_encoder, ids)
    plist = list(params.named.values())
    opt = build_optimizer(plist, cfg.stage(3), cfg)
    fake = SimpleNamespace(cfg=cfg, text_encoder=m.text_encoder, device=torch.device("cpu"),
                           validation_embeds=object(), prior=None)  # fmt: skip
    plist += unfreeze_text_encoder(fake, 3, params, opt)
    unet_names = {n for n, _ in m.unet.named_parameters()}
    te_names = {PREFIX + n for n, _ in m.text_encoder.named_parameters()}
    assert set(params.named) == unet_names | te_names and not unet_names & te_names
    trainable = {id(p) for mod in (m.unet, m.text_encoder, m.vae) for p in mod.parameters()
                 if p.requires_grad}  # fmt: skip
    assert trainable == {id(p) for p in plist} and len(plist) == len(params.named)
    assert not any(p.requires_grad for p in m.vae.parameters())
    assert [g["lr"] for g in opt.param_groups] == [5e-6, 2e-6]  # its own group, its own lr
    assert all(p.dtype == torch.float32 for p in plist)  # fp32 master weights
    assert m.text_encoder.training and fake.validation_embeds is None
    assert unfreeze_text_encoder(fake, 1, params, opt) == []  # only stage 3
    finish_trainable(3, params, m.text_encoder)
    assert not m.text_encoder.training and not any(p.requires_grad for p in plist)


def _argv(model, data, out, classes, *extra) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(data),
        "--category", TINY_CATEGORY, "--output_dir", str(out), "--resolution",
        str(TINY_RESOLUTION), "--method", "dreambooth", "--train_text_encoder",
        "--unet_train_steps", "3", "--unet_bs", "1", "--unet_checkpointing_steps", "2",
        "--num_class_images", "2", "--sample_batch_size", "2", "--class_inference_steps", "2",
        "--class_data_dir", str(classes), *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def te_runs(tmp_path_factory, tiny_model, concept) -> dict:
    """A 3-step run; the same run crashed during step 3 and resumed; the checkpoint it left."""
    root = tmp_path_factory.mktemp("te")
    ref, resumed = root / "ref", root / "resumed"
    calls = [0]
    real_step = Trainer._optimizer_step

    def crash_at_step_3(self, *args):
        calls[0] += 1
        if calls[0] == 3:
            raise SimulatedCrash
        return real_step(self, *args)

    # Under the device emulation (tests/test_device.py): no project tensor without a device.
    with ForeignDefaultDevice() as mode:
        assert train_attndreambooth.main(_argv(tiny_model, concept, ref, root / "cls")) == 0
        argv = _argv(tiny_model, concept, resumed, root / "cls")
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Trainer, "_optimizer_step", crash_at_step_3)
            with pytest.raises(SimulatedCrash):
                train_attndreambooth.main(argv)
        (left,) = ck.list_checkpoints(resumed)
        state, tensors, opt = ck.load_checkpoint(left)
        assert train_attndreambooth.main([*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert mode.redirected == []
    return dict(ref=ref, resumed=resumed, left=left, tensors=tensors, opt=opt, argv=argv)


def test_training_changes_and_saves_the_text_encoder(te_runs, tiny_model):
    ref = te_runs["ref"]
    base = load_file(str(tiny_model / "text_encoder" / "model.safetensors"))
    saved = load_file(str(ref / TE))
    assert set(saved) == set(base)
    changed = [k for k in base if not torch.equal(saved[k], base[k])]
    assert len(changed) > 0.9 * len(base)  # every weight that gets a gradient moved
    assert json.loads((ref / "stage_3" / "text_encoder" / "config.json").read_text())
    cfg = json.loads((ref / "run_config.json").read_text())
    assert cfg["train_text_encoder"] and cfg["text_encoder_learning_rate"] == 5e-6


def test_checkpoints_hold_its_tensors_and_resume_is_bitwise(te_runs, tiny_model):
    assert te_runs["left"].name == "checkpoint-s3-000002"
    names = set(te_runs["tensors"])
    te_names = {n for n in names if n.startswith(PREFIX)}
    unet = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    base_te = load_file(str(tiny_model / "text_encoder" / "model.safetensors"))
    assert names - te_names == set(unet) and te_names == {PREFIX + n for n in base_te}
    assert [g["lr"] for g in te_runs["opt"]["param_groups"]] == [5e-6, 5e-6]
    ref, resumed = te_runs["ref"], te_runs["resumed"]
    for rel in (TE, UNET):
        a, b = load_file(str(ref / rel)), load_file(str(resumed / rel))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), rel
    assert ck.list_checkpoints(resumed) == []


def test_a_completed_stage_reloads_it(te_runs, tiny_model, capsys):
    capsys.readouterr()
    assert train_attndreambooth.main(te_runs["argv"]) == 0
    assert "stage 3: already complete" in capsys.readouterr().out
    m = load_base_model(str(tiny_model))
    ids = m.tokenizer("sks", add_special_tokens=False).input_ids
    load_stage_result(te_runs["ref"], 3, ["sks"], m.unet, m.text_encoder, ids)
    saved = load_file(str(te_runs["ref"] / TE))
    own = m.text_encoder.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved.items())


def test_inference_and_export_use_it(te_runs, tiny_model, tmp_path, monkeypatch):
    loaded = []
    export_mod = attn_utils.render.export
    real = export_mod.load_concept
    monkeypatch.setattr(export_mod, "load_concept", lambda src: loaded.append(real(src))
                        or loaded[-1])  # fmt: skip
    save, export = tmp_path / "out", tmp_path / "pipe"
    argv = ["--run_dir", te_runs["ref"], "--prompt", "a photo of {}", "--save_dir", save,
            "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--seed", "0",
            "--export_pipeline", export]  # fmt: skip
    assert inference.main([str(a) for a in argv]) == 0
    saved = load_file(str(te_runs["ref"] / TE))
    base = load_file(str(tiny_model / "text_encoder" / "model.safetensors"))
    own = loaded[0].text_encoder.state_dict()
    assert all(torch.equal(own[k].float(), v) for k, v in saved.items())
    assert not all(torch.equal(own[k].float(), v) for k, v in base.items())
    index = json.loads((save / "index.json").read_text())
    assert index["settings"]["text_encoder_path"] == str(
        te_runs["ref"] / "stage_3" / "text_encoder"
    )
    from diffusers import StableDiffusionPipeline  # the export, in plain diffusers

    pipe = StableDiffusionPipeline.from_pretrained(str(export))
    plain = pipe.text_encoder.state_dict()
    assert all(torch.equal(plain[k], v) for k, v in saved.items())
    argv = ["--run_dir", te_runs["ref"], "--stage", "1", "--export_pipeline", tmp_path / "p1"]
    assert inference.main([str(a) for a in argv]) == 0  # stage 1: the base U-Net and encoder
    assert loaded[-1].source.text_encoder_path is None


def test_two_processes_keep_one_text_encoder(tmp_path, tiny_model, concept):
    """Its gradients are all-reduced by hand; without that the ranks' weights drift apart
    and the stage's rank checksums refuse to save."""
    out = tmp_path / "ddp"
    argv = _argv(tiny_model, concept, out, tmp_path / "cls")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "train_attndreambooth.py"), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    info = json.loads((out / "stage_3" / "stage_info.json").read_text())
    sums = info["rank_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1]
    assert Path(out / TE).is_file()
