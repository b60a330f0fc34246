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
from attn_utils.evaluate import metrics as metrics_mod
from attn_utils.evaluate.metrics import MetricModels, clip_t_text
from attn_utils.evaluate.scoring import embed_real, prompt_class, score_samples
from attn_utils.render.renderer import read_prompt_file

# Texts of different lengths: CLIP-T's batched text embedding pads the short one.
PROMPTS = {
    "a {} on the beach": "a_beach",
    "a watercolor painting of {} in a snowy forest at night": "a_watercolor",
}
# The protocol's preprocessing of the tiny models, pinned: (shortest side, crop, mean, std).
CLIP_PREP = (32, 32, (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
DINO_PREP = (36, 32, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # 32 * 256 // 224, then 32


@pytest.fixture(scope="session")
def metric_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("metric_models")
    return build_tiny_clip(root / "clip"), build_tiny_dino(root / "dino")


@pytest.fixture(scope="module")
def models(metric_dirs) -> MetricModels:
    return MetricModels.load(str(metric_dirs[0]), str(metric_dirs[1]), "cpu", batch_size=3)


def _noise_image(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    """Noise of (width, height); not square, so resizing and cropping both matter."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


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
        (image or _noise_image(i, (37, 53))).save(root / f"{i}.png")  # portrait
    return root


# ---------------------------------------------------------------- the metrics


def _reference_pixels(image: Image.Image, short: int, crop: int, mean, std) -> torch.Tensor:
    """(1, 3, crop, crop): shortest side to `short` (bicubic), the centre square, normalised;
    one pixel at a time."""
    w, h = image.size
    size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    im = image.convert("RGB").resize(size, Image.Resampling.BICUBIC)
    left, top = round((size[0] - crop) / 2), round((size[1] - crop) / 2)
    out = np.zeros((3, crop, crop), dtype=np.float64)
    for y in range(crop):
        for x in range(crop):
            for c, v in enumerate(im.getpixel((left + x, top + y))):
                out[c, y, x] = (v / 255 - mean[c]) / std[c]
    return torch.from_numpy(out).float()[None]


def _slow_reference(models: MetricModels, gen: list[Path], reals: list[Path], texts: list[str]):
    """One image at a time through the raw models; numpy cosines in explicit loops."""
    clip, dino = models.clip, models.dino

    def clip_img(p):
        px = _reference_pixels(Image.open(p), *CLIP_PREP)
        out = clip.get_image_features(pixel_values=px)
        return (out if isinstance(out, torch.Tensor) else out.pooler_output)[0].numpy()

    def dino_img(p):
        px = _reference_pixels(Image.open(p), *DINO_PREP)
        return dino(pixel_values=px).last_hidden_state[0, 0].numpy()

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
    texts = ["a sloth on the beach"] * 2 + [
        "a watercolor painting of sloth in a snowy forest at night"
    ] * 2
    assert [p["text"] for p in result["per_prompt"]] == texts[::2]
    n_tokens = [len(models.clip_tokenizer(t)["input_ids"]) for t in texts[::2]]
    assert n_tokens[0] < n_tokens[1]  # the short text is padded in the batch
    ref = _slow_reference(models, gen, sorted(reals.iterdir()), texts)
    for got, want in zip(result["per_image"], ref):
        for m in ("clip_t", "clip_i", "dino"):
            assert got[m] == pytest.approx(want[m], abs=1e-5), m
    o = result["overall"]
    assert (o["n_images"], o["n_prompts"], o["n_real"]) == (4, 2, 3)
    for m in ("clip_t", "clip_i", "dino"):  # overall = mean over images = mean over all pairs
        assert o[m] == pytest.approx(np.mean([r[m] for r in ref]), abs=1e-5)
        assert result["per_prompt"][0][m] == pytest.approx(np.mean([r[m] for r in ref[:2]]), 1e-5)


def test_images_are_centre_cropped_not_squashed(models):
    """DINO as the DINO repository evaluates: the shortest side resized, the centre cut out."""
    wide = Image.new("RGB", (72, 36))  # black, with a white centre square of 36 x 36
    wide.paste((255, 255, 255), (18, 0, 54, 36))
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    # Cropped, the wide image is all white; squashed, its black sides would show.
    assert models.dino_image([wide]) == pytest.approx(models.dino_image([white]), abs=1e-6)
    ImageTransform, dino_transform = metrics_mod.ImageTransform, metrics_mod.dino_transform
    assert models.dino_transform == ImageTransform(*DINO_PREP, "bicubic")
    assert models.clip_transform == ImageTransform(*CLIP_PREP, "bicubic")
    assert dino_transform(224) == ImageTransform(256, 224, *DINO_PREP[2:], "bicubic")
    for size in [(50, 31), (31, 50), (33, 33), (100, 41)]:
        im = _noise_image(sum(size), size)
        for transform, prep in [
            (models.dino_transform, DINO_PREP),
            (models.clip_transform, CLIP_PREP),
        ]:
            got = transform([im])
            assert got.shape == (1, 3, 32, 32)
            assert torch.allclose(got, _reference_pixels(im, *prep), atol=1e-6), size


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


def test_clip_t_never_scores_against_placeholder_text(models, tmp_path):
    """SPEC: text alignment uses the prompt with the placeholder removed, however it is written."""
    assert clip_t_text("a t_v0 sloth, in oil", "sloth", placeholders=["t_v0"]) == "a sloth, in oil"
    assert clip_t_text("a sksa", "x", placeholders=["sks"]) == "a sksa"  # whole words only
    cases = {  # (the render's settings, a prompt's template)
        "written_out": ({"category": "sloth", "tokens": ["new_concept_v0"]},
                        "a new_concept_v0 sloth on the beach"),
        "dreambooth": ({"category": "sks sloth", "tokens": [], "identifier": "sks"},
                       "a {} on the beach"),  # the run's category, 'sks sloth', fills {}
    }  # fmt: skip
    reals = embed_real(models, real_dir(tmp_path / "real", n=1))
    for name, (settings, template) in cases.items():
        root = tmp_path / name
        (root / "p").mkdir(parents=True)
        _noise_image(1).save(root / "p" / "0.png")
        entry = {"template": template, "dir": "p", "files": ["p/0.png"], "grid": None}
        index = {"format": 1, "settings": settings, "prompts": {"x": entry}}
        (root / "index.json").write_text(json.dumps(index))
        # without --category, evaluate.py scores with the index's category
        result = score_samples(models, root, reals, settings["category"])
        assert result["per_prompt"][0]["text"] == "a sloth on the beach", name


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
    prep = result["settings"]["preprocessing"]
    assert (prep["dino"]["resize"], prep["dino"]["crop"], prep["dino"]["resample"]) == (
        36,
        32,
        "bicubic",
    )
    assert list(prep["clip"]["mean"]) == list(CLIP_PREP[2]) and prep["clip"]["crop"] == 32
    assert all("PIL" in prep[m]["backend"] for m in ("clip", "dino"))
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


def test_without_network_or_cache_both_default_models_are_named_with_the_fetch_command(
    tmp_path, capsys, monkeypatch
):
    """evaluate.py on a fresh machine: one line names CLIP and DINO, their ids, and how to
    fetch them, instead of failing on the first and hiding the second."""
    samples = fake_samples(tmp_path / "samples")
    reals = real_dir(tmp_path / "real")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))  # nothing cached
    monkeypatch.setattr(metrics_mod, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    argv = ["--samples_dir", str(samples), "--instance_data_dir", str(reals)]
    line, _ = cli_error(lambda a: evaluate.main(a), capsys, argv)
    clip, dino = metrics_mod.DEFAULT_CLIP, metrics_mod.DEFAULT_DINO
    assert line.startswith(f"error: --clip_model {clip} and --dino_model {dino}:"), line
    assert f"hf download {clip} && hf download {dino}" in line
    assert not (samples / "metrics.json").exists()


def test_bad_samples_folder_is_one_error_and_writes_nothing(metric_dirs, tmp_path, capsys):
    samples = fake_samples(tmp_path / "samples")
    reals = real_dir(tmp_path / "real")
    (samples / "index.json").unlink()  # an unfinished render
    run = lambda argv: evaluate.main(argv)
    line, _ = cli_error(run, capsys, _eval_argv(samples, reals, *metric_dirs))
    assert line.startswith("error: --samples_dir:") and "index.json" in line
    assert not list(samples.glob("metrics.*"))


def test_prompt_without_images_is_one_error_and_writes_nothing(metric_dirs, tmp_path, capsys):
    """An index.json prompt with no image would give NaN means (and invalid JSON)."""
    samples = fake_samples(tmp_path / "samples")
    reals = real_dir(tmp_path / "real")
    index = json.loads((samples / "index.json").read_text())
    empty = {"template": "a {} in the snow", "dir": "snow", "files": [], "grid": None}
    index["prompts"]["a new_concept_v0 sloth in the snow"] = empty
    (samples / "index.json").write_text(json.dumps(index))
    run = lambda argv: evaluate.main(argv)
    line, _ = cli_error(run, capsys, _eval_argv(samples, reals, *metric_dirs))
    assert line.startswith("error: --samples_dir:") and "index.json" in line
    assert "'a new_concept_v0 sloth in the snow'" in line
    assert not list(samples.glob("metrics.*"))


def test_a_toy_run_is_scored_with_the_toy_metric_models_and_oracle_by_itself(
    tmp_path, capsys, monkeypatch
):
    """Samples of the shipped toy base model (index.json's model) need no metric-model flags:
    its folder names models/toyworld/clip, dino and oracle, even offline with an empty cache;
    where those are missing the error names them, not the Hub's models."""
    from attn_utils.model_defaults import MODEL_DEFAULTS

    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_cache"))
    monkeypatch.setattr(metrics_mod, "hub_reachable", lambda timeout=5.0: False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    toy = ROOT / "models" / "toyworld"
    samples = fake_samples(tmp_path / "samples", per_prompt=1, category="toy")
    index = json.loads((samples / "index.json").read_text())
    index["settings"]["model"] = str(toy / "base")
    (samples / "index.json").write_text(json.dumps(index))
    argv = ["--samples_dir", str(samples), "--instance_data_dir", str(real_dir(tmp_path / "r"))]
    assert evaluate.main(argv) == 0
    got = json.loads((samples / "metrics.json").read_text())
    settings = got["settings"]
    assert (
        Path(settings["clip_model"]) == toy / "clip"
        and Path(settings["dino_model"]) == toy / "dino"
    )
    assert Path(settings["oracle_model"]) == toy / "oracle" and "oracle" in got["overall"]
    capsys.readouterr()
    lone = tmp_path / "lone" / "base"  # the base model copied without its metric models
    lone.mkdir(parents=True)
    shutil.copy(toy / "base" / MODEL_DEFAULTS, lone / MODEL_DEFAULTS)
    index["settings"]["model"] = str(lone)
    (samples / "index.json").write_text(json.dumps(index))
    line, _ = cli_error(lambda a: evaluate.main(a), capsys, argv)
    assert str(tmp_path / "lone" / "clip") in line and str(tmp_path / "lone" / "dino") in line
    assert "hf download" not in line and metrics_mod.DEFAULT_CLIP not in line, line
