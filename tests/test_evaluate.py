"""evaluate.py on tiny random CLIP / DINO models: metrics vs a slow reference, outputs, errors."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, cli_error
from PIL import Image
from tiny_metric_models import build_tiny_clip, build_tiny_dino

import evaluate
from attn_utils import metrics as metrics_mod
from attn_utils.metrics import MetricModels, clip_t_text
from attn_utils.render import read_prompt_file
from attn_utils.scoring import embed_real, prompt_class, score_samples

PROMPTS = {"a {} on the beach": "a_beach", "a watercolor painting of {}": "a_watercolor"}


@pytest.fixture(scope="session")
def metric_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("metric_models")
    return build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def models(metric_dirs) -> MetricModels:
    return MetricModels.load(str(metric_dirs[0]), str(metric_dirs[1]), "cpu", batch_size=3)


def _noise_image(seed: int, size: int = 40) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def fake_samples(root: Path, per_prompt: int = 2, image=None, category="sloth") -> Path:
    """An inference.py-shaped folder: one subfolder per prompt, index.json written last."""
    entries, k = {}, 0
    for template, slug in PROMPTS.items():
        (root / slug).mkdir(parents=True)
        files = []
        for i in range(per_prompt):
            (image or _noise_image(100 + k)).save(root / slug / f"{i}.png")
            files.append(f"{slug}/{i}.png")
            k += 1
        prompt = template.replace("{}", f"new_concept_v0 {category}")
        entries[prompt] = {"template": template, "dir": slug, "files": files, "grid": None}
    index = {"format": 1, "settings": {"category": category}, "prompts": entries}
    (root / "index.json").write_text(json.dumps(index))
    return root


def real_dir(root: Path, n: int = 3, image=None) -> Path:
    root.mkdir(parents=True)
    for i in range(n):
        (image or _noise_image(i)).save(root / f"{i}.png")
    return root


# ---------------------------------------------------------------- the metrics


def _slow_reference(models: MetricModels, gen: list[Path], reals: list[Path], texts: list[str]):
    """One image at a time through the raw models; numpy cosines in explicit loops."""
    clip, dino = models.clip, models.dino

    def clip_img(p):
        px = models.clip_processor(images=[Image.open(p).convert("RGB")], return_tensors="pt")
        out = clip.get_image_features(pixel_values=px["pixel_values"])
        return (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy()

    def dino_img(p):
        px = models.dino_processor(images=[Image.open(p).convert("RGB")], return_tensors="pt")
        return dino(pixel_values=px["pixel_values"]).last_hidden_state[0, 0].numpy()

    def clip_txt(t):
        ids = models.clip_tokenizer([t], return_tensors="pt")
        out = clip.get_text_features(input_ids=ids["input_ids"])
        return (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy()

    def cos(a, b):
        return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))

    with torch.no_grad():
        rc, rd = [clip_img(r) for r in reals], [dino_img(r) for r in reals]
        rows = []
        for g, t in zip(gen, texts):
            gc, gd = clip_img(g), dino_img(g)
            rows.append(
                {
                    "clip_t": cos(gc, clip_txt(t)),
                    "clip_i": sum(cos(gc, r) for r in rc) / len(rc),
                    "dino": sum(cos(gd, r) for r in rd) / len(rd),
                }
            )
    return rows


def test_each_metric_matches_a_slow_reference(models, tmp_path):
    samples = fake_samples(tmp_path / "samples", per_prompt=2)
    reals = real_dir(tmp_path / "real", n=3)
    result = score_samples(models, samples, embed_real(models, reals), "sloth")
    gen = [samples / r["file"] for r in result["per_image"]]
    texts = ["a sloth on the beach"] * 2 + ["a watercolor painting of sloth"] * 2
    assert [p["text"] for p in result["per_prompt"]] == texts[::2]
    ref = _slow_reference(models, gen, sorted(reals.iterdir()), texts)
    for got, want in zip(result["per_image"], ref):
        for m in ("clip_t", "clip_i", "dino"):
            assert got[m] == pytest.approx(want[m], abs=1e-5), m
    o = result["overall"]
    assert (o["n_images"], o["n_prompts"], o["n_real"]) == (4, 2, 3)
    for m in ("clip_t", "clip_i", "dino"):  # overall = mean over images = mean over all pairs
        assert o[m] == pytest.approx(np.mean([r[m] for r in ref]), abs=1e-5)
        assert result["per_prompt"][0][m] == pytest.approx(np.mean([r[m] for r in ref[:2]]), 1e-5)


def test_identical_generated_and_real_sets_score_one(models, tmp_path):
    same = _noise_image(7)
    samples = fake_samples(tmp_path / "samples", per_prompt=2, image=same)
    reals = real_dir(tmp_path / "real", n=2, image=same)
    o = score_samples(models, samples, embed_real(models, reals), "sloth")["overall"]
    assert o["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert o["dino"] == pytest.approx(1.0, abs=1e-5)


def test_clip_t_text_substitution():
    assert clip_t_text("a {} on the beach", "sloth") == "a sloth on the beach"
    assert clip_t_text("a {} on the beach", "teddy bear") == "a teddy bear on the beach"
    assert clip_t_text("a {} on the beach", "sloth", "removed") == "a on the beach"
    assert clip_t_text("{}, oil painting", "dog", "removed") == ", oil painting"
    assert clip_t_text("a plain prompt", "dog") == "a plain prompt"


def test_prompt_classes_of_the_shipped_sets():
    def counts(name):
        got = [prompt_class(t) for t in read_prompt_file(ROOT / "dataset/prompts" / name)]
        return {c: got.count(c) for c in set(got)}

    assert counts("dreambench_objects.txt") == {"background": 20, "property": 5}
    assert counts("dreambench_live.txt") == {"background": 10, "accessory": 10, "property": 5}
    complex_ = read_prompt_file(ROOT / "dataset/prompts/complex.txt")
    assert 20 <= len(complex_) <= 30 and all("{}" in t for t in complex_)
    assert set(counts("complex.txt")) == {"background", "style", "accessory", "property"}


# ---------------------------------------------------------------- the CLI


def test_cli_writes_json_csv_md(metric_dirs, tmp_path, capsys):
    samples = fake_samples(tmp_path / "samples", per_prompt=3)
    reals = real_dir(tmp_path / "real", n=2)
    argv = ["--samples_dir", samples, "--instance_data_dir", reals, "--batch_size", 4]
    argv += ["--clip_model", metric_dirs[0], "--dino_model", metric_dirs[1]]
    assert evaluate.main([str(a) for a in argv]) == 0  # category read from index.json
    assert "CLIP-T" in capsys.readouterr().out
    result = json.loads((samples / "metrics.json").read_text())
    assert len(result["per_image"]) == 6 and len(result["per_prompt"]) == 2
    assert set(result["per_class"]) == {"background", "style"}
    assert result["settings"]["category"] == "sloth"
    rows = list(csv.DictReader((samples / "metrics.csv").open()))
    assert [r["level"] for r in rows] == ["prompt", "prompt", "class", "class", "overall"]
    assert float(rows[-1]["dino"]) == pytest.approx(result["overall"]["dino"])
    md = (samples / "metrics.md").read_text()
    assert "| overall | 6 |" in md and "a watercolor painting of {}" in md


def _eval_argv(samples, reals, clip, dino):
    return [
        "--samples_dir",
        str(samples),
        "--instance_data_dir",
        str(reals),
        "--clip_model",
        str(clip),
        "--dino_model",
        str(dino),
    ]


def test_missing_or_unreachable_metric_model_is_one_clear_error(
    metric_dirs, tmp_path, capsys, monkeypatch
):
    samples = fake_samples(tmp_path / "samples")
    reals = real_dir(tmp_path / "real")
    run = lambda argv: evaluate.main(argv)
    clip, dino = metric_dirs
    line, _ = cli_error(run, capsys, _eval_argv(samples, reals, tmp_path / "nope", dino))
    assert line.startswith("error: --clip_model:") and "nope" in line
    line, _ = cli_error(run, capsys, _eval_argv(samples, reals, clip, "someone/no-such-dino"))
    assert line.startswith("error: --dino_model:") and "'someone/no-such-dino'" in line
    broken = tmp_path / "broken"  # a folder without weights: never random weights
    shutil.copytree(dino, broken, ignore=shutil.ignore_patterns("*.safetensors"))
    line, _ = cli_error(run, capsys, _eval_argv(samples, reals, clip, broken))
    assert line.startswith("error: --dino_model:") and "broken" in line
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(metrics_mod, "hub_reachable", lambda timeout=5.0: False)
    line, _ = cli_error(run, capsys, _eval_argv(samples, reals, "someone/no-such-clip", dino))
    assert line.startswith("error: --clip_model:") and "unreachable" in line
    assert not (samples / "metrics.json").exists()


def test_bad_samples_folder_is_one_error_and_writes_nothing(metric_dirs, tmp_path, capsys):
    samples = fake_samples(tmp_path / "samples")
    reals = real_dir(tmp_path / "real")
    (samples / "index.json").unlink()  # an unfinished render
    run = lambda argv: evaluate.main(argv)
    line, _ = cli_error(run, capsys, _eval_argv(samples, reals, *metric_dirs))
    assert line.startswith("error: --samples_dir:") and "index.json" in line
    assert not list(samples.glob("metrics.*"))
