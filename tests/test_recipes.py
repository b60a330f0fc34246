"""The recipes' options: augmentation and clipping by method, the paper's ablations, and
Textual Inversion's --num_vectors and --token_alone."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import cli_error, render_one
from PIL import Image
from safetensors.torch import load_file
from test_methods import BASE, _argv, _plan, _stages

import inference
import train_attndreambooth
from attn_utils.config import ConfigError
from attn_utils.tiny import TINY_CATEGORY, TINY_RESOLUTION


def test_each_method_augments_and_clips_as_its_reference(capsys):
    """The authors' rotation and flip for attndreambooth; the diffusers examples' for ti
    (flip 0.5, no rotation) and dreambooth (resize and crop only, clip at 1.0)."""
    keys = ("flip_p", "rotate_p", "rotate_degrees", "max_grad_norm", "crop")
    plans = {m: _plan(capsys, "--method", m) for m in ("attndreambooth", "ti", "dreambooth")}
    got = {m: [tuple(s[k] for k in keys) for s in p["stages"]] for m, p in plans.items()}
    assert got == {
        "attndreambooth": [(0.25, 0.75, 45.0, None, "random")] * 3,
        "ti": [(0.5, 0.0, 0.0, None, "resize")],
        "dreambooth": [(0.0, 0.0, 0.0, 1.0, "random")],
    }
    own = _plan(capsys, "--method", "dreambooth", "--max_grad_norm", "0", "--rotate_p", "0.5",
                "--rotate_degrees", "10")["stages"][0]  # fmt: skip
    assert (own["max_grad_norm"], own["rotate_p"], own["rotate_degrees"]) == (None, 0.5, 10.0)


def _black_corners(x: torch.Tensor) -> bool:
    """A rotated white image has black (-1) corners after the crop."""
    return bool((x <= -0.99).all(dim=0).any())


def test_the_textual_inversion_crop_squashes_the_whole_image():
    """crop 'resize' (the textual_inversion example's): a wide image keeps both its ends."""
    import random

    from attn_utils.train.data import augment

    wide = Image.new("RGB", (96, 32), "white")
    wide.paste(Image.new("RGB", (16, 32), "black"), (0, 0))  # a black left end
    wide.paste(Image.new("RGB", (16, 32), "black"), (80, 0))  # and a black right end
    for seed in range(6):
        x = augment(wide, 32, False, random.Random(seed), flip_p=0.0, rotate_p=0.0,
                    crop="resize")  # fmt: skip
        assert x.shape == (3, 32, 32)
        assert x[:, :, 0].max() < -0.9 and x[:, :, -1].max() < -0.9  # both ends are there
    cropped = augment(wide, 32, True, random.Random(0), flip_p=0.0, rotate_p=0.0)
    assert cropped[:, :, 0].min() > 0.9  # a centre crop of the same image loses them


def test_rotation_follows_its_probability_and_class_images_are_never_rotated():
    import random
    from types import SimpleNamespace

    from attn_utils.train.data import InstanceDataset, augment
    from attn_utils.train.prior import with_class_images

    white = Image.new("RGB", (48, 48), "white")
    rotated = [_black_corners(augment(white, 32, False, random.Random(i))) for i in range(40)]
    assert 20 <= sum(rotated) < 40  # the paper's p 0.75 (angles near 0 leave no corner)
    never = [augment(white, 32, False, random.Random(i), rotate_p=0.0) for i in range(40)]
    assert not any(_black_corners(x) for x in never)
    cfg = SimpleNamespace(resolution=32, center_crop=False, seed=0,
                          stage=lambda k: SimpleNamespace(flip_p=0.25, crop="random"))  # fmt: skip
    trainer = SimpleNamespace(cfg=cfg, prior=SimpleNamespace(images=[white] * 4))
    instances = InstanceDataset([white], 32, False, 50, 0, 3, rotate_p=1.0)
    pairs = with_class_images(trainer, instances, 3)
    assert any(_black_corners(pairs[g][0]) for g in range(20))
    assert not any(_black_corners(pairs[g][1]) for g in range(20))  # the class half


ABLATION_STAGES = {"no_stage1": [2, 3], "no_stage2": [1, 3], "no_stage3": [1, 2],
                   "no_reg": [1, 2, 3], "no_stage2_no_reg": [1, 3]}  # fmt: skip


def test_the_papers_ablations_are_recipes_of_the_same_machinery(capsys):
    paper = _stages(_plan(capsys))
    for name, stages in ABLATION_STAGES.items():
        plan = _plan(capsys, "--method", name)
        got = _stages(plan)
        assert sorted(got) == stages == plan["run_stages"], name
        no_reg = "no_reg" in name
        for k, values in got.items():  # everything else is the paper's
            assert values[:4] == paper[k][:4], (name, k)
            assert values[4:] == ((0.0, 0.0) if no_reg else paper[k][4:]), (name, k)
        assert "ablation" in plan["method_source"]
    assert _stages(_plan(capsys, "--method", "no_stage2", "--fast"))[3][:3] == (1e-5, 200, 4)


def test_an_unknown_method_is_one_line_listing_the_ablations(capsys):
    with pytest.raises(SystemExit) as e:
        train_attndreambooth.main([*BASE, "--category", "sloth", "--method", "no_stage4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: --method: invalid choice: 'no_stage4'") and "no_reg" in err[0]


@pytest.mark.parametrize("argv,flag", [
    (["--method", "no_stage3", "--fast"], "--fast"),
    (["--method", "no_reg", "--train_text_encoder"], "--train_text_encoder"),
    (["--method", "no_stage1", "--ti_train_steps", "5"], "--ti_train_steps"),
])  # fmt: skip
def test_bad_ablation_flags_are_one_line(argv, flag, run_train, capsys):
    line, _ = cli_error(run_train, capsys, [*BASE, "--category", "sloth", *argv])
    assert line.startswith(f"error: {flag}")


@pytest.fixture(scope="module")
def ablation_runs(tmp_path_factory, tiny_model, concept) -> dict:
    root, out = tmp_path_factory.mktemp("ablations"), {}
    steps = ["--ti_train_steps", "2", "--attn_train_steps", "2", "--unet_train_steps", "2",
             "--ti_bs", "2", "--attn_bs", "2", "--unet_bs", "2"]  # fmt: skip
    for name, stages in ABLATION_STAGES.items():
        out[name] = root / name
        flags = _own_stage_flags(steps, stages)
        argv = ["--pretrained_model_name_or_path", str(tiny_model), "--instance_data_dir",
                str(concept), "--category", TINY_CATEGORY, "--output_dir", str(out[name]),
                "--resolution", str(TINY_RESOLUTION), "--method", name, *flags]  # fmt: skip
        assert train_attndreambooth.main(argv) == 0, name
    return out


def _own_stage_flags(steps: list[str], stages: list[int]) -> list[str]:
    """The --ti_/--attn_/--unet_ flag pairs of the stages a recipe has."""
    prefix = {1: "--ti_", 2: "--attn_", 3: "--unet_"}
    pairs = list(zip(steps[::2], steps[1::2]))
    return [x for f, v in pairs if any(f.startswith(prefix[k]) for k in stages) for x in (f, v)]


@pytest.mark.parametrize("name", sorted(ABLATION_STAGES))
def test_every_ablation_trains_and_renders(ablation_runs, name, tiny_model, tmp_path):
    run = ablation_runs[name]
    stages = ABLATION_STAGES[name]
    assert [k for k in (1, 2, 3) if (run / f"stage_{k}" / "stage_info.json").is_file()] == stages
    if name == "no_stage1":  # [V] as initialised, written beside the first U-Net
        emb = load_file(str(run / "stage_2" / "learned_embeds.safetensors"))["new_concept_v0"]
        assert (
            torch.isfinite(emb).all()
            and not (run / "stage_3" / "learned_embeds.safetensors").exists()
        )
    save = tmp_path / "out"
    argv = ["--run_dir", str(run), "--prompt", "a photo of {}", "--save_dir", str(save),
            "--num_images_per_prompt", "1", "--num_inference_steps", "2"]  # fmt: skip
    assert inference.main(argv) == 0
    settings = json.loads((save / "index.json").read_text())["settings"]
    assert settings["stage"] == max(stages)


@pytest.mark.parametrize("argv,flag", [
    (["--method", "ti", "--num_vectors", "0"], "--num_vectors"),
    (["--method", "dreambooth", "--num_vectors", "2"], "--num_vectors"),
    (["--method", "ti", "--num_vectors", "2", "--n_object_embedding", "2"], "--num_vectors"),
    (["--token_alone"], "--token_alone"),
    (["--method", "ti", "--token_alone", "--ti_reg_mean_weight", "0.1"], "--token_alone"),
])  # fmt: skip
def test_bad_ti_flags_are_one_line(argv, flag, run_train, capsys):
    line, _ = cli_error(run_train, capsys, [*BASE, "--category", "sloth", *argv])
    assert line.startswith(f"error: {flag}")


def test_num_vectors_start_from_the_initialiser_and_need_one_token(tiny_model):
    from attn_utils.method.tokens import add_placeholder_tokens, category_token_ids
    from attn_utils.models import load_base_model

    m = load_base_model(str(tiny_model))
    table = m.text_encoder.get_input_embeddings().weight
    (init,) = category_token_ids(m.tokenizer, TINY_CATEGORY)
    ids = add_placeholder_tokens(m.tokenizer, m.text_encoder, ["v0", "v1", "v2"], TINY_CATEGORY,
                                 all_from_one=True)  # fmt: skip
    table = m.text_encoder.get_input_embeddings().weight
    assert all(torch.equal(table[i], table[init]) for i in ids)
    with pytest.raises(ConfigError, match="--num_vectors: .*2 tokens"):
        two = "sloth sloth"
        add_placeholder_tokens(m.tokenizer, m.text_encoder, ["w0", "w1"], two, all_from_one=True)


def test_ti_with_several_vectors_and_the_token_alone_trains_and_renders(
    tiny_model, concept, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = _argv(tiny_model, concept, out, "ti", "--num_vectors", "2", "--token_alone")
    capsys.readouterr()
    assert train_attndreambooth.main(argv) == 0
    assert "renders as 'a new_concept_v0 new_concept_v1 in the snow'" in capsys.readouterr().out
    emb = load_file(str(out / "stage_1" / "learned_embeds.safetensors"))
    assert list(emb) == ["new_concept"] and emb["new_concept"].shape[0] == 2  # diffusers' layout
    assert not torch.equal(emb["new_concept"][0], emb["new_concept"][1])  # trained apart
    prompt = render_one(out, "a photo of {} on the beach", tmp_path / "render")
    assert prompt == "a photo of new_concept_v0 new_concept_v1 on the beach"  # no category
