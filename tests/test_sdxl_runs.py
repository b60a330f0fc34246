"""SDXL end to end on the tiny SDXL-shaped model: the three stages (under the device
emulation), the embedding file in plain diffusers, the conditioning the U-Net received, exact
resume, two processes, inference with heatmaps and an export plain diffusers loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, cli_error, train_argv
from device_emulation import ForeignDefaultDevice
from safetensors import safe_open
from safetensors.torch import load_file

import inference
import train_attndreambooth
from attn_utils.runfiles import save_embeddings
from attn_utils.sdxl import SDXLTextEncoders
from attn_utils.tiny import SDXL_POOLED, SDXL_WIDTHS, TINY_CATEGORY
from attn_utils.train import trainer as trainer_module
from attn_utils.train.data import InstanceDataset
from attn_utils.train.trainer import Trainer

TOKEN = "new_concept_v0"
# Every stage at batch 2 without accumulation (the SDXL default accumulates 4): fast on a CPU.
SMALL = ["--ti_gradient_accumulation_steps", "1", "--attn_gradient_accumulation_steps", "1",
         "--unet_gradient_accumulation_steps", "1", "--attn_checkpointing_steps", "1",
         "--validation_prompt", "a {} on a hill", "--validation_inference_steps", "2",
         "--num_validation_images", "1"]  # fmt: skip


class Crash(Exception):
    pass


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_sdxl, concept):
    """One three-stage run under the device emulation; what the U-Net was conditioned on."""
    out = tmp_path_factory.mktemp("sdxl") / "run"
    argv = train_argv(tiny_sdxl, concept, out, *SMALL)
    seen, stage = [], [0]  # (stage, the U-Net's added_cond_kwargs) of each micro-step
    real = trainer_module.unet_cond

    def spy(pooled, time_ids, pool, batch, n):
        cond = real(pooled, time_ids, pool, batch, n)
        seen.append((stage[0], cond))
        return cond

    mp = pytest.MonkeyPatch()
    mp.setattr(trainer_module, "unet_cond", spy)
    real_begin = Trainer._begin_stage

    def begin(self, sc, resume):
        stage[0] = sc.index
        return real_begin(self, sc, resume)

    mp.setattr(Trainer, "_begin_stage", begin)
    real_encode = SDXLTextEncoders.forward

    def encode(self, ids):
        seen.append((stage[0], "encoded"))
        return real_encode(self, ids)

    mp.setattr(SDXLTextEncoders, "forward", encode)
    try:
        with ForeignDefaultDevice() as mode:
            assert train_attndreambooth.main(argv) == 0
    finally:
        mp.undo()
    return out, argv, seen, mode.redirected


def test_three_stages_write_the_usual_layout_and_record_the_family(run):
    out, _, _, redirected = run
    cfg = json.loads((out / "run_config.json").read_text())
    assert cfg["family"] == "sdxl" and cfg["resolution"] == 128
    assert (out / "stage_1" / "learned_embeds.safetensors").is_file()
    assert (out / "stage_2" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "stage_3" / "unet_lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((out / "validation").rglob("*.png"))
    assert redirected == []  # every tensor made in project code named its device


def test_stage_1_learns_one_row_in_each_encoder_and_plain_diffusers_loads_it(run, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    out, *_ = run
    path = out / "stage_1" / "learned_embeds.safetensors"
    state = load_file(str(path))
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "clip_l": (1, SDXL_WIDTHS[0]),
        "clip_g": (1, SDXL_WIDTHS[1]),
    }
    with safe_open(str(path), "pt") as f:
        assert json.loads(f.metadata()["tokens"]) == [TOKEN]
    pipe = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl))
    cat = pipe.tokenizer(TINY_CATEGORY, add_special_tokens=False).input_ids[0]
    for key, te, tok in (("clip_l", pipe.text_encoder, pipe.tokenizer),
                         ("clip_g", pipe.text_encoder_2, pipe.tokenizer_2)):  # fmt: skip
        init = te.get_input_embeddings().weight[cat].detach().clone()
        pipe.load_textual_inversion(state[key], token=[TOKEN], text_encoder=te, tokenizer=tok)
        row = te.get_input_embeddings().weight[tok.convert_tokens_to_ids(TOKEN)]
        assert torch.equal(row, state[key][0])
        # trained away from the category's row: turned, not only shrunk by weight decay
        cos = torch.nn.functional.cosine_similarity(row, init, dim=0)
        assert cos < 1 - 1e-4, (key, cos)


def test_the_unet_got_the_pooled_text_and_each_samples_crop(run, concept):
    from attn_utils.images import load_instance_images

    out, _, seen, _ = run
    encoded = [stage for stage, cond in seen if cond == "encoded"]
    # stage 1 encodes every micro-step ([V] trains); stages 2-3 once, the pooled text with it
    assert encoded == [1] * 4 + [2]
    by_stage = {}
    for stage, cond in seen:
        if cond != "encoded":
            by_stage.setdefault(stage, []).append(cond)
    assert sorted(by_stage) == [1, 2, 3] and all(len(v) == 4 for v in by_stage.values())
    images, _ = load_instance_images(concept, 128)
    for stage, conds in by_stage.items():
        ds = InstanceDataset(images, 128, False, 100, 0, stage, time_ids=True)
        for micro, cond in enumerate(conds):
            want = torch.stack([ds[g]["time_ids"] for g in range(2 * micro, 2 * micro + 2)])
            assert torch.equal(cond["time_ids"], want), (stage, micro)
            assert cond["text_embeds"].shape == (2, SDXL_POOLED)
    # the square photos' rotated canvases: original sizes vary (crops of a square are (0, 0))
    sizes = torch.cat([c["time_ids"][:, 0] for conds in by_stage.values() for c in conds])
    assert len(set(sizes.tolist())) > 1
    # stages 2-3 use the cached pooled embedding of the fixed prompt: the same every step
    pooled = [c["text_embeds"] for c in by_stage[2] + by_stage[3]]
    assert all(torch.equal(p, pooled[0]) for p in pooled)


def test_resume_mid_stage_is_exact(run, tmp_path, monkeypatch, capsys):
    out, argv, _, _ = run
    again = tmp_path / "again"
    argv2 = [str(again) if a == str(out) else a for a in argv]
    real_step = Trainer._after_step

    def crash_after_first_stage_2_step(self, r, due):
        stop = real_step(self, r, due)
        if r.sc.index == 2 and r.step == 1:
            raise Crash  # checkpoint-s2-000001 was written (--attn_checkpointing_steps 1)
        return stop

    with monkeypatch.context() as m:
        m.setattr(Trainer, "_after_step", crash_after_first_stage_2_step)
        with pytest.raises(Crash):
            train_attndreambooth.main(argv2)
    capsys.readouterr()
    assert train_attndreambooth.main(argv2) == 0
    assert "stage 2: resumed from" in capsys.readouterr().out
    for rel in ("stage_2/unet/diffusion_pytorch_model.safetensors",
                "stage_3/unet_lora/pytorch_lora_weights.safetensors"):  # fmt: skip
        a, b = load_file(str(out / rel)), load_file(str(again / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), rel


def test_inference_heatmaps_and_an_export_plain_diffusers_loads(run, tmp_path, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    out, *_ = run
    save, export = tmp_path / "img", tmp_path / "export"
    argv = ["--run_dir", str(out), "--prompt", "a {} on a hill", "--save_dir", str(save),
            "--num_images_per_prompt", "1", "--num_inference_steps", "2", "--seed", "0",
            "--save_attention_maps", "--export_pipeline", str(export)]  # fmt: skip
    with ForeignDefaultDevice() as mode:  # rendering names every tensor's device too
        assert inference.main(argv) == 0
    assert mode.redirected == []
    (entry,) = json.loads((save / "index.json").read_text())["prompts"].values()
    maps = load_file(str(save / entry["attention_maps"]["maps"]))
    assert set(maps) == {"placeholder", "category"} and maps["placeholder"].shape == (1, 16, 16)
    pipe = StableDiffusionXLPipeline.from_pretrained(str(export))
    assert TOKEN in pipe.tokenizer.get_vocab() and TOKEN in pipe.tokenizer_2.get_vocab()
    rows = load_file(str(out / "stage_1" / "learned_embeds.safetensors"))
    tid = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[tid], rows["clip_l"][0])
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[tid], rows["clip_g"][0])
    image = pipe(f"a {TOKEN} {TINY_CATEGORY}", num_inference_steps=2, height=64, width=64,
                 output_type="np").images  # fmt: skip
    assert image.shape == (1, 64, 64, 3)
    # docs/sdxl.md's recipe in plain diffusers: stage 2's U-Net, stage 3's adapters fused
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(str(out / "stage_2" / "unet"))
    plain = StableDiffusionXLPipeline.from_pretrained(str(tiny_sdxl), unet=unet)
    plain.load_lora_weights(str(out / "stage_3" / "unet_lora"))
    plain.fuse_lora()
    plain.unload_lora_weights()
    want = pipe.unet.state_dict()
    got = plain.unet.state_dict()
    assert got.keys() == want.keys()
    assert all(torch.allclose(got[k], want[k], atol=1e-6) for k in want)


def test_an_sd_embedding_file_for_sdxl_is_one_line_naming_it(tiny_sdxl, tmp_path, capsys):
    bad = tmp_path / "sd.safetensors"
    save_embeddings(bad, [TOKEN], torch.zeros(1, 32))
    argv = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--learned_embedding_path",
            str(bad), "--category", TINY_CATEGORY, "--prompt", "a {}", "--save_dir",
            str(tmp_path / "o"), "--num_inference_steps", "1"]  # fmt: skip
    line, _ = cli_error(inference.main, capsys, argv)
    assert line.startswith(f"error: {bad}: holds '{TOKEN}'; an SDXL base model needs both")
    assert not (tmp_path / "o" / "index.json").exists()


def test_two_processes_hold_the_same_weights(tmp_path, tiny_sdxl, concept):
    out = tmp_path / "ddp"
    argv = train_argv(tiny_sdxl, concept, out, "--stages", "1,2", *SMALL[:4])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "train_attndreambooth.py"), *argv]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    for k in (1, 2):
        sums = json.loads((out / f"stage_{k}" / "stage_info.json").read_text())["rank_checksums"]
        assert len(sums) == 2 and sums[0] == sums[1], (k, sums)


def test_evaluate_study_runs_on_sdxl(tiny_sdxl, concept, tmp_path):
    """`evaluate.py study` with the same flags: trains, renders and scores an SDXL concept."""
    from test_evaluate_study import FAST_RENDER, ONE_STEP, InProcess
    from tiny_metric_models import build_tiny_clip, build_tiny_dino

    import evaluate

    clip, dino = build_tiny_clip(tmp_path / "clip"), build_tiny_dino(tmp_path / "dino")
    (tmp_path / "concepts.json").write_text(
        json.dumps([{"dir": str(concept), "category": TINY_CATEGORY, "name": "sloth"}])
    )
    (tmp_path / "prompts.txt").write_text("a {} on the beach\n")
    ga = " ".join(f"--{n}_gradient_accumulation_steps 1" for n in ("ti", "attn", "unet"))
    argv = ["study", "--concepts", tmp_path / "concepts.json", "--prompts",
            tmp_path / "prompts.txt", "--out", tmp_path / "out", "--pretrained_model_name_or_path",
            tiny_sdxl, "--clip_model", clip, "--dino_model", dino, "--num_images_per_prompt", 1,
            "--train_args", f"{ONE_STEP} {ga}", "--infer_args", FAST_RENDER]  # fmt: skip
    assert evaluate.main([str(a) for a in argv], runner=InProcess()) == 0
    cfg = json.loads((tmp_path / "out/concepts/sloth/run/run_config.json").read_text())
    assert cfg["family"] == "sdxl"
    assert list((tmp_path / "out" / "concepts" / "sloth").rglob("metrics.json"))


def test_prior_preservation_conditions_each_half_on_its_own_prompt_and_crop(
    tiny_sdxl, concept, tmp_path, monkeypatch
):
    """dreambooth on SDXL: instance and class samples each carry their prompt's pooled text
    and their own time ids (the photos' size; the generated class images' R x R)."""
    from attn_utils.models import load_base_model
    from attn_utils.train import prior as prior_module
    from attn_utils.train.conditioning import encode_text

    seen = []
    real = prior_module.denoise_losses

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(prior_module, "denoise_losses", spy)
    out = tmp_path / "db"
    argv = ["--pretrained_model_name_or_path", str(tiny_sdxl), "--instance_data_dir",
            str(concept), "--category", TINY_CATEGORY, "--output_dir", str(out), "--method",
            "dreambooth", "--resolution", "128", "--num_class_images", "2",
            "--sample_batch_size", "2", "--class_inference_steps", "2", "--unet_train_steps",
            "2", "--unet_batch_size", "2"]  # fmt: skip
    assert train_attndreambooth.main(argv) == 0
    assert len(seen) == 2 and all(k["n_instance"] == 2 for k in seen)
    m = load_base_model(str(tiny_sdxl))

    def pooled(prompt):
        ids = m.tokenizer(prompt, padding="max_length", max_length=77, truncation=True,
                          return_tensors="pt").input_ids  # fmt: skip
        with torch.no_grad():
            return encode_text(m.text_encoder, ids)[1][0]

    inst, cls = pooled(f"a photo of sks {TINY_CATEGORY}"), pooled(f"a photo of {TINY_CATEGORY}")
    for k in seen:
        cond = k["added_cond"]
        assert cond["time_ids"].shape == (4, 6) and cond["text_embeds"].shape == (4, SDXL_POOLED)
        assert cond["time_ids"][2:].tolist() == [[128, 128, 0, 0, 128, 128]] * 2  # class
        assert cond["time_ids"][:2, :2].tolist() == [[160, 160]] * 2  # photos, no rotation
        for row in cond["text_embeds"][:2]:
            torch.testing.assert_close(row, inst)
        for row in cond["text_embeds"][2:]:
            torch.testing.assert_close(row, cls)


def test_an_sdxl_embedding_file_for_an_sd_model_is_one_line_naming_it(
    run, tiny_model, tmp_path, capsys
):
    out, *_ = run
    path = out / "stage_1" / "learned_embeds.safetensors"
    argv = ["--pretrained_model_name_or_path", str(tiny_model), "--learned_embedding_path",
            str(path), "--prompt", "a {}", "--save_dir", str(tmp_path / "o")]  # fmt: skip
    line, _ = cli_error(inference.main, capsys, argv)
    assert line.startswith(f"error: {path}: an SDXL embedding file (clip_l, clip_g)")
    assert not (tmp_path / "o").exists()
