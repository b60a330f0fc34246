"""inference.py on the tiny model: prompts, counts, seeds, folders, heatmaps, export, bad input."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import ROOT, train_argv
from PIL import Image
from safetensors.torch import load_file, save_file

import inference
import train_attndreambooth
from attn_utils.render.export import _natural_order
from attn_utils.render.heatmaps import HeatmapController, layer_grid, token_columns
from attn_utils.render.renderer import (
    MAX_SLUG,
    Renderer,
    batch_spans,
    make_jobs,
    prompt_slugs,
    read_prompt_file,
)

TOKEN = "new_concept_v0"
ONE_STEP = ["--ti_train_steps", "1", "--attn_train_steps", "1", "--unet_train_steps", "1"]
FAST = ["--num_inference_steps", "2", "--resolution", "64"]  # 64 px: an 8x8 latent


def infer(*argv) -> int:
    return inference.main([str(a) for a in argv])


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def max_diff(a: Path, b: Path) -> int:
    return int(np.abs(pixels(a) - pixels(b)).max())


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny tensors gain nothing from a second thread and lose much when cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def run_dir(tiny_model, concept, tmp_path_factory) -> Path:
    """One completed three-stage run (one step per stage) for the whole module."""
    out = tmp_path_factory.mktemp("infer") / "run"
    assert train_attndreambooth.main(train_argv(tiny_model, concept, out, *ONE_STEP)) == 0
    return out


@pytest.fixture(scope="module")
def reference(run_dir, tmp_path_factory) -> Path:
    """Two prompts (one without {}), 3 images each at batch 2 (2 + 1), seed 7."""
    root = tmp_path_factory.mktemp("reference")
    prompts = root / "prompts.txt"
    prompts.write_text("# a comment\n\na photo of {}\n\n  # indented comment\na plain prompt\n")
    save = root / "out"
    argv = ["--run_dir", run_dir, "--prompt_file", prompts, "--save_dir", save, *FAST]
    assert infer(*argv, "--num_images_per_prompt", 3, "--infer_batch_size", 2, "--seed", 7) == 0
    return save


# ---------------------------------------------------------------- prompts, slugs, batches


def test_prompt_file_parsing_and_filling(tmp_path, caplog):
    f = tmp_path / "p.txt"
    f.write_text(
        "\ufeff# header\n\n{} on the beach\n   \n# {} skipped\nno placeholder\n{} on the beach\n"
    )
    templates = read_prompt_file(f)
    assert templates == ["{} on the beach", "no placeholder", "{} on the beach"]
    with caplog.at_level(logging.WARNING):
        jobs = make_jobs(templates, ["t_v0", "t_v1"], "teddy bear")
    assert [j.prompt for j in jobs] == ["t_v0 t_v1 teddy bear on the beach", "no placeholder"]
    assert "without '{}'" in caplog.text and "repeated prompt" in caplog.text
    assert make_jobs(["a {}"], ["t_v0"], None)[0].prompt == "a t_v0"  # no category known
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the placeholder written out: nothing to warn of
        jobs = make_jobs(["a t_v0 t_v1 teddy bear, in oil", "(t_v0) alone"], ["t_v0", "t_v1"], "x")
    assert [j.prompt for j in jobs] == ["a t_v0 t_v1 teddy bear, in oil", "(t_v0) alone"]
    assert "without '{}'" not in caplog.text
    with caplog.at_level(logging.WARNING):  # a longer word is not the token
        make_jobs(["a t_v01 bear"], ["t_v0"], None)
    assert "without '{}'" in caplog.text


def test_slugs_are_safe_bounded_distinct_and_stable():
    prompts = [
        "a photo of x",
        'a/b\\c:d*e?f"g<h>i|j',
        "w" * 500,
        "CON",
        "grids",
        "Index.json",
        "a cat",
        "a cat?",
        "A CAT",
        "un café à Paris",
        "...",
    ]
    slugs = prompt_slugs(prompts)
    assert slugs == prompt_slugs(prompts)  # deterministic
    assert slugs[0] == "a_photo_of_x"  # the original's 'spaces as _' where unambiguous
    for s in slugs:
        assert re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", s) and len(s) <= MAX_SLUG
        assert s.split(".")[0].lower() != "con" and s.lower() not in ("grids", "index.json")
    assert len({s.casefold() for s in slugs}) == len(prompts)  # case-insensitive file systems


def test_batches_cover_exactly_n_images():
    assert batch_spans(10, 8) == [(0, 8), (8, 2)]  # the original gave 8 then 0
    assert batch_spans(16, 8) == [(0, 8), (8, 8)]
    assert batch_spans(3, 5) == [(0, 3)]
    for n in range(1, 20):
        for bs in range(1, 9):
            spans = batch_spans(n, bs)
            assert sum(size for _, size in spans) == n and all(0 < s <= bs for _, s in spans)


# ---------------------------------------------------------------- heatmap math


def test_layer_grid():
    assert layer_grid(64, (8, 8)) == (8, 8)
    assert layer_grid(16, (8, 8)) == (4, 4)
    assert layer_grid(96, (8, 12)) == (8, 12) and layer_grid(6, (8, 12)) == (2, 3)
    assert layer_grid(9, (5, 5)) == (3, 3)  # odd sizes round up, as the U-Net's strided convs
    with pytest.raises(ValueError):
        layer_grid(7, (8, 8))


def test_heatmaps_share_one_scale_so_flat_attention_looks_flat():
    """[V] and its category on one scale from 0 (a colour bar under them): a near-uniform map
    (about 1/77 everywhere, with noise) stays one colour beside a peaked one, and the same
    value has the same colour in both tiles."""
    from PIL import Image

    from attn_utils.render.heatmaps import attention_figure

    torch.manual_seed(0)
    flat = 1 / 77 + 1e-4 * torch.rand(8, 8)
    peaked = torch.full((8, 8), 1 / 77)
    peaked[3:5, 3:5] = 0.2
    grey = Image.new("RGB", (64, 64), (128, 128, 128))
    fig = np.asarray(attention_figure(grey, {"placeholder": flat, "category": peaked}, {}))
    side = 256
    flat_tile = fig[16:240, side + 16 : 2 * side - 16].astype(float)
    peak_tile = fig[:256, 2 * side :].astype(float)
    assert flat_tile.std(axis=(0, 1)).max() < 3  # not stretched to its own min and max
    assert peak_tile.std(axis=(0, 1)).max() > 10
    # 1/77 in both tiles: the same colour
    assert np.abs(flat_tile.mean((0, 1)) - peak_tile[0, 0]).max() < 12
    assert fig.shape[0] > 256 + 18  # the colour bar under the caption


def test_heatmap_controller_matches_a_slow_reference():
    torch.manual_seed(0)
    heads, latent, cols = 2, (4, 4), {"placeholder": [4], "category": [5, 6]}
    ctrl = HeatmapController(cols, latent, guided=True)
    calls = []
    for _step in range(3):
        for n in (16, 4):  # a 4x4 and a 2x2 layer
            probs = torch.rand(4 * heads, n, 77).softmax(-1)  # batch 4 = 2 uncond + 2 cond
            ctrl.record("layer", probs, heads)
            calls.append(probs)
    got = ctrl.maps()
    for name, columns in cols.items():
        for img in range(2):
            acc = torch.zeros(latent)
            for probs in calls:
                p = probs.view(4, heads, -1, 77)[2 + img]  # cond half: image img
                m = sum(p[:, :, c] for c in columns).mean(0)  # (N,) summed cols, mean heads
                side = int(m.numel() ** 0.5)
                m = F.interpolate(m.view(1, 1, side, side), size=latent, mode="bilinear")
                acc += m[0, 0]
            torch.testing.assert_close(got[name][img], acc / len(calls))


def test_token_columns(tiny_model):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(str(tiny_model / "tokenizer"))
    tok.add_tokens([TOKEN])
    pid = tok.convert_tokens_to_ids([TOKEN])
    # "wombat" splits into two sub-tokens in the tiny vocabulary: both belong to the category.
    assert token_columns(tok, f"a photo of {TOKEN} wombat", pid, "wombat") == {
        "placeholder": [4],
        "category": [5, 6],
    }
    assert token_columns(tok, "a photo of a sloth", pid, "sloth") == {"category": [5]}
    assert token_columns(tok, "a photo of a dog", pid, "sloth") == {}


# ---------------------------------------------------------------- rendering end to end


def test_counts_files_index_and_progress(reference, run_dir, capsys):
    index = json.loads((reference / "index.json").read_text())
    prompts = index["prompts"]
    assert set(prompts) == {f"a photo of {TOKEN} sloth", "a plain prompt"}
    for prompt, entry in prompts.items():
        folder = reference / entry["dir"]
        assert sorted(p.name for p in folder.iterdir()) == ["0.png", "1.png", "2.png", "prompt.txt"]
        assert (folder / "prompt.txt").read_text().strip() == prompt
        assert entry["files"] == [f"{entry['dir']}/{i}.png" for i in range(3)]
        assert entry["seed"] == 7 and entry["image_seeds"] == [7, 8, 9]
        with Image.open(folder / "0.png") as im, Image.open(reference / entry["grid"]) as grid:
            assert im.size == (64, 64) and grid.size == (128, 128)  # 2 x 2 tiles
    s = index["settings"]
    assert s["stage"] == 3 and s["unet_path"] == str(run_dir / "stage_3" / "unet")
    assert s["tokens"] == [TOKEN] and s["category"] == "sloth" and s["scheduler"] == "dpm"
    assert (s["num_images_per_prompt"], s["infer_batch_size"], s["guidance_scale"]) == (3, 2, 7.5)
    assert s["dtype"] == "float32" and s["device"] == "cpu"
    # The progress bar counts prompts x batches: 2 prompts x (2 + 1).
    save = reference.parent / "again"
    argv = ["--run_dir", run_dir, "--prompt", "{}", "--prompt", "x {}", "--save_dir", save, *FAST]
    capsys.readouterr()
    assert infer(*argv, "--num_images_per_prompt", 3, "--infer_batch_size", 2, "--seed", 7) == 0
    assert "4/4" in capsys.readouterr().err


def test_seeds_reproducible_and_independent_of_batch_size(reference, run_dir, tmp_path, caplog):
    folder = json.loads((reference / "index.json").read_text())["prompts"]
    folder = reference / folder[f"a photo of {TOKEN} sloth"]["dir"]
    base = ["--run_dir", run_dir, "--prompt", "a photo of {}", *FAST, "--num_images_per_prompt", 3]
    runs = {"bs2": ("2", "7"), "bs1": ("1", "7"), "bs3": ("3", "7"), "seed8": ("2", "8")}
    for name, (bs, seed) in runs.items():
        assert (
            infer(*base, "--save_dir", tmp_path / name, "--infer_batch_size", bs, "--seed", seed)
            == 0
        )
    got = {name: tmp_path / name / folder.name for name in runs}
    for i in range(3):
        assert (got["bs2"] / f"{i}.png").read_bytes() == (folder / f"{i}.png").read_bytes()
        for bs in ("bs1", "bs3"):  # same noise per image; other matmul shapes may round apart
            assert max_diff(got[bs] / f"{i}.png", folder / f"{i}.png") <= 2
    # seed 8 shifts by one image: its image 0 is seed 7's image 1
    assert max_diff(got["seed8"] / "0.png", folder / "1.png") <= 2
    assert max_diff(got["seed8"] / "0.png", folder / "0.png") > 2
    # No seed: a random one, logged and recorded.
    with caplog.at_level(logging.INFO):
        assert infer(*base, "--save_dir", tmp_path / "random", "--stage", 2) == 0
    index = json.loads((tmp_path / "random" / "index.json").read_text())
    seed = index["settings"]["seed"]
    assert isinstance(seed, int) and f"random seed {seed}" in caplog.text
    assert index["settings"]["stage"] == 2
    assert index["settings"]["unet_path"] == str(run_dir / "stage_2" / "unet")


def test_attention_maps(run_dir, tmp_path, caplog):
    save = tmp_path / "maps"
    argv = ["--run_dir", run_dir, "--save_dir", save, *FAST, "--save_attention_maps"]
    argv += ["--prompt", "a photo of {}", "--prompt", "a photo of a dog", "--seed", 0]
    with caplog.at_level(logging.WARNING):
        assert infer(*argv, "--num_images_per_prompt", 2, "--infer_batch_size", 1) == 0
    assert "no attention maps" in caplog.text  # the dog prompt has neither token
    prompts = json.loads((save / "index.json").read_text())["prompts"]
    entry = prompts[f"a photo of {TOKEN} sloth"]
    att = entry["attention_maps"]
    assert att["tokens"] == {"placeholder": [4], "category": [5]}
    maps = load_file(str(save / att["maps"]))
    assert set(maps) == {"placeholder", "category"}
    for m in maps.values():
        assert m.shape == (2, 8, 8) and torch.isfinite(m).all()
        assert (m > 0).all() and (m < 1).all()  # mean attention probabilities
    assert not torch.equal(maps["placeholder"], maps["category"])
    for fig in att["figures"]:
        assert Image.open(save / fig).size[0] == 3 * 256  # image | [V] | category
    assert "attention_maps" not in prompts["a photo of a dog"]
    # Without classifier-free guidance the whole batch is conditional: maps still come out.
    save1 = tmp_path / "unguided"
    argv = ["--run_dir", run_dir, "--save_dir", save1, *FAST, "--save_attention_maps"]
    assert infer(*argv, "--prompt", "{}", "--guidance_scale", 1, "--num_images_per_prompt", 1) == 0
    entry = next(iter(json.loads((save1 / "index.json").read_text())["prompts"].values()))
    assert load_file(str(save1 / entry["attention_maps"]["maps"]))["placeholder"].shape == (1, 8, 8)


def test_export_round_trip_and_authors_flags(reference, run_dir, tiny_model, tmp_path):
    from diffusers import StableDiffusionPipeline

    export = tmp_path / "exported"
    assert infer("--run_dir", run_dir, "--export_pipeline", export) == 0  # export only
    meta = json.loads((export / "attndreambooth_concept.json").read_text())
    assert meta["prompt_example"] == f"a photo of a {TOKEN} sloth"
    pipe = StableDiffusionPipeline.from_pretrained(str(export))
    tid = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    assert pipe.tokenizer(TOKEN, add_special_tokens=False).input_ids == [tid]
    learned = load_file(str(run_dir / "stage_1" / "learned_embeds.safetensors"))[TOKEN]
    torch.testing.assert_close(pipe.text_encoder.get_input_embeddings().weight[tid], learned)
    stage3 = load_file(str(run_dir / "stage_3" / "unet" / "diffusion_pytorch_model.safetensors"))
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, stage3[k]), k
    out = pipe(f"a photo of {TOKEN} sloth", num_inference_steps=1, height=64, width=64)
    assert out.images[0].size == (64, 64)
    # Every way of naming the same concept renders the same images.
    ref = json.loads((reference / "index.json").read_text())["prompts"]
    ref = reference / ref[f"a photo of {TOKEN} sloth"]["dir"]
    legacy = tmp_path / "legacy.bin"
    torch.save({TOKEN: learned}, legacy)  # the original's pickled format
    ways = {
        "export": ["--pretrained_model_name_or_path", export],  # token already in the tokenizer
        "export+emb": [
            "--pretrained_model_name_or_path",
            export,
            "--learned_embedding_path",
            legacy,
        ],
        "authors": [
            "--pretrained_model_name_or_path",
            tiny_model,
            "--learned_embedding_path",
            legacy,
            "--checkpoint_path",
            run_dir / "stage_3",
            "--category_token",
            "sloth",
        ],  # fmt: skip
    }
    common = ["--prompt", "a photo of {}", *FAST, "--num_images_per_prompt", 3, "--seed", 7]
    for name, argv in ways.items():
        save = tmp_path / name
        assert infer(*argv, *common, "--infer_batch_size", 2, "--save_dir", save) == 0, name
        for i in range(3):
            assert max_diff(save / ref.name / f"{i}.png", ref / f"{i}.png") <= 1, name
    # Exporting again over an earlier export is fine; over anything else it is refused.
    assert infer("--run_dir", run_dir, "--export_pipeline", export) == 0


def test_multi_token_embedding_file_without_run(tiny_model, tmp_path):
    """Authors' flags: the tokens, and how many, come from the file (in _v<i> order)."""
    assert _natural_order(["c_v10", "c_v2", "c_v0"]) == ["c_v0", "c_v2", "c_v10"]
    emb = tmp_path / "two.safetensors"
    save_file({"c_v1": torch.randn(32), "c_v0": torch.randn(32)}, str(emb))
    save = tmp_path / "out"
    argv = ["--pretrained_model_name_or_path", tiny_model, "--learned_embedding_path", emb]
    argv += ["--category", "sloth", "--prompt", "a photo of {}", "--save_dir", save, *FAST]
    assert infer(*argv, "--num_images_per_prompt", 1, "--save_attention_maps") == 0
    index = json.loads((save / "index.json").read_text())
    assert index["settings"]["tokens"] == ["c_v0", "c_v1"]
    assert index["settings"]["unet_path"] is None  # the base U-Net
    entry = index["prompts"]["a photo of c_v0 c_v1 sloth"]
    assert entry["attention_maps"]["tokens"] == {"placeholder": [4, 5], "category": [6]}


def test_schedulers_by_short_and_class_name(run_dir, tmp_path):
    names = {"ddim": "ddim", "EulerDiscreteScheduler": "euler", "DDPMScheduler": "ddpm"}
    names |= {"PNDMScheduler": "pndm", "DPMSolverMultistepScheduler": "dpm"}  # the authors'
    for name, short in names.items():
        save = tmp_path / name
        argv = ["--run_dir", run_dir, "--prompt", "{}", "--save_dir", save, "--resolution", 64]
        argv += ["--num_inference_steps", 4, "--num_images_per_prompt", 1, "--seed", 0]
        assert infer(*argv, "--infer_scheduler", name) == 0, name
        assert json.loads((save / "index.json").read_text())["settings"]["scheduler"] == short


# ---------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad(run_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bad")
    partial = root / "partial"  # stages 1 and 2 only
    partial.mkdir()
    shutil.copy(run_dir / "run_config.json", partial)
    for k in (1, 2):
        shutil.copytree(run_dir / f"stage_{k}", partial / f"stage_{k}")
    no_stage = root / "no_stage"
    no_stage.mkdir()
    shutil.copy(run_dir / "run_config.json", no_stage)
    (root / "empty.txt").write_text("# nothing\n\n   \n")
    save_file({TOKEN: torch.zeros(7)}, str(root / "dim7.safetensors"))

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {root / 'PWNED'}",))

    torch.save({TOKEN: Evil()}, root / "evil.bin")
    (root / "not_empty").mkdir()
    (root / "not_empty" / "keep.txt").write_text("mine")
    return root


BAD_CASES = {
    "missing run_dir": (["--run_dir", "{root}/nope"], "--run_dir"),
    "stage 1 missing": (["--run_dir", "{root}/no_stage"], "--run_dir"),
    "stage 3 missing": (["--run_dir", "{root}/partial", "--stage", "3"], "--stage 3"),
    "embedding missing": (
        ["--learned_embedding_path", "{root}/none.safetensors"],
        "none.safetensors",
    ),
    "prompt file missing": (["--prompt_file", "{root}/none.txt"], "--prompt_file"),
    "prompt file empty": (["--prompt_file", "{root}/empty.txt"], "--prompt_file"),
    "embedding dim": (["--learned_embedding_path", "{root}/dim7.safetensors"], "dim7.safetensors"),
    "malicious pickle": (["--learned_embedding_path", "{root}/evil.bin"], "evil.bin"),
    "no unet": (["--checkpoint_path", "{root}"], "--checkpoint_path"),
    "export over a folder": (["--export_pipeline", "{root}/not_empty"], "--export_pipeline"),
    "zero images": (["--num_images_per_prompt", "0"], "--num_images_per_prompt"),
    "scheduler": (["--infer_scheduler", "LMS"], "--infer_scheduler"),
    "no source": (["--run_dir", ""], "--run_dir"),
}


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_is_one_line_and_writes_nothing(case, run_dir, bad, tmp_path, capsys):
    extra, needle = BAD_CASES[case]
    extra = [a.format(root=bad) for a in extra]
    argv = ["--run_dir", run_dir, "--prompt", "{}", "--save_dir", tmp_path / "out", *FAST]
    if extra[:2] == ["--run_dir", ""]:
        argv, extra = ["--prompt", "{}", "--save_dir", tmp_path / "out"], []
    capsys.readouterr()
    assert infer(*argv, *extra) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and needle in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    assert not (bad / "PWNED").exists()
    assert (bad / "not_empty" / "keep.txt").read_text() == "mine"


def test_interrupted_render_does_not_look_complete(run_dir, tmp_path, monkeypatch):
    save = tmp_path / "out"
    save.mkdir()
    (save / "index.json").write_text("{}")  # from an earlier, finished call
    calls = []

    def failing_batch(self, prompt, seeds, columns):
        calls.append(len(seeds))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return [Image.new("RGB", (64, 64))] * len(seeds), {}

    monkeypatch.setattr(Renderer, "_batch", failing_batch)
    argv = ["--run_dir", run_dir, "--prompt", "{}", "--save_dir", save, *FAST]
    with pytest.raises(KeyboardInterrupt):
        infer(*argv, "--num_images_per_prompt", 2, "--infer_batch_size", 1)
    assert sorted(p.name for p in save.iterdir()) == []  # no index.json, no half folder


# ---------------------------------------------------------------- shipped files


def test_shipped_script_and_prompt_files():
    known = set(inference.build_parser()._option_string_actions)
    script = (ROOT / "bash_script" / "inference.sh").read_text()
    used = set(re.findall(r"(?<![\w-])--[a-z_0-9]+", script))
    assert used and used <= known, used - known
    for name in ("objects.txt", "live.txt", "demo.txt"):
        prompts = read_prompt_file(ROOT / "dataset" / "prompts" / name)
        assert all(p.count("{}") == 1 for p in prompts), name
    assert len(read_prompt_file(ROOT / "dataset" / "prompts" / "objects.txt")) >= 20


def test_render_settings_come_from_the_base_model_folder_unless_flags_say(
    run_dir, tiny_model, tmp_path
):
    """A base model folder with attndreambooth_defaults.json (the toy world's) renders with its
    sampler settings; explicit flags win; a folder without one keeps the paper's (dpm, 50, 7.5)."""
    from attn_utils.model_defaults import MODEL_DEFAULTS

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    render = {"scheduler": "ddim", "num_inference_steps": 2, "guidance_scale": 3.0}
    (model / MODEL_DEFAULTS).write_text(json.dumps({"render": render}))
    base = ["--run_dir", run_dir, "--prompt", "a photo of {}", "--resolution", "64"]
    assert infer(*base, "--pretrained_model_name_or_path", model, "--save_dir", tmp_path / "a") == 0
    got = json.loads((tmp_path / "a" / "index.json").read_text())["settings"]
    assert {k: got[k] for k in render} == render
    argv = [*base, "--pretrained_model_name_or_path", model, "--save_dir", tmp_path / "b"]
    assert infer(*argv, "--infer_scheduler", "euler", "--guidance_scale", 5) == 0
    got = json.loads((tmp_path / "b" / "index.json").read_text())["settings"]
    assert (got["scheduler"], got["num_inference_steps"], got["guidance_scale"]) == ("euler", 2, 5)
    plain = inference.build_parser().parse_args(["--run_dir", str(run_dir), "--prompt", "x"])
    inference.fill_render_defaults(plain)  # the tiny model: no file, the paper's sampler
    assert (plain.infer_scheduler, plain.num_inference_steps, plain.guidance_scale) == (
        "dpm", 50, 7.5
    )  # fmt: skip
    toy = inference.build_parser().parse_args(
        ["--pretrained_model_name_or_path", str(ROOT / "models/toyworld/base"), "--prompt", "x"]
    )
    inference.fill_render_defaults(toy)  # the shipped toy model: what its report measured with
    assert (toy.infer_scheduler, toy.num_inference_steps, toy.guidance_scale) == ("ddim", 30, 4.0)
