"""The training benchmark: a CPU smoke run of the CLI, and that its two modes compare like
with like (same losses; the original's hooks on every layer; its stage-1 row restore)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.modes import RECIPES, StageRun, Variant, original_attention, place
from bench.sd21_configs import build_models

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ["fp32", "bf16+fused_adam+grad_ckpt+channels_last+cache_latents"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One smoke run: small model, 64 px, batch 2, two variants, one thread per child."""
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable, str(ROOT / "bench" / "bench_train.py"), "--model", "small",
        "--device", "cpu", "--resolution", "64", "--batch_size", "2", "--steps", "2",
        "--warmup", "1", "--threads", "1", "--validation_reloads", "1",
        "--variants", ",".join(VARIANTS), "--json", str(out / "r.json"),
        "--markdown", str(out / "r.md"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((out / "r.json").read_text()), proc.stdout, (out / "r.md").read_text()


def test_smoke_json_has_every_stage_mode_and_finite_ratios(smoke):
    report, _, _ = smoke
    assert report["errors"] == [] and report["variants"] == VARIANTS
    rows = {(r["variant"], r["stage"], r["mode"]): r for r in report["results"]}
    assert set(rows) == {
        (v, s, m) for v in VARIANTS for s in (1, 2, 3) for m in ("ours", "original")
    }
    for r in rows.values():
        assert r["ms"] > 0 and len(r["ms_all"]) == 2 and r["peak_mib"] > 0
        assert all(math.isfinite(x) for x in r["losses"])
        assert r["memory_metric"].startswith("peak RSS")
    assert len(report["ratios"]) == 6
    for q in report["ratios"]:
        for key in ("speedup_vs_original", "memory_vs_original", "speedup_vs_baseline"):
            assert math.isfinite(q[key]) and q[key] > 0
    assert all(q["speedup_vs_baseline"] == 1.0 for q in report["ratios"] if q["variant"] == "fp32")
    # The trainable sets: stage 1 ours one row, the original the whole table.
    dim = 64
    assert rows[("fp32", 1, "ours")]["trainable"] == dim
    assert rows[("fp32", 1, "original")]["trainable"] == (49408 + 1) * dim
    assert rows[("fp32", 3, "ours")]["trainable"] == report["params"]["unet"]


def test_smoke_projection_is_median_times_paper_steps(smoke):
    report, _, _ = smoke
    rows = {(r["variant"], r["stage"], r["mode"]): r for r in report["results"]}
    assert len(report["projection"]) == 4
    for p in report["projection"]:
        want = sum(
            rows[(p["variant"], s, p["mode"])]["ms"] * n for s, n in RECIPES["paper"].items()
        )
        assert p["complete"] and p["recipe_s"] == pytest.approx(want / 1e3)
    val = report["validation"]
    assert val["resident_ms"] > 0 and val["reload_ms"] > 0 and val["validations_in_recipe"] == 9
    assert report["pool_ms"][VARIANTS[1]] > 0
    assert report["env"]["torch"] == torch.__version__


def test_smoke_markdown_table(smoke):
    _, stdout, md = smoke
    assert md in stdout
    lines = md.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("| variant | stage |"))
    body = [line for line in lines[head + 2 : head + 8]]
    assert [line.split("|")[1:3] for line in body] == [
        [f" {v} ", f" {s} "] for v in VARIANTS for s in (1, 2, 3)
    ]
    assert all(line.count("|") == 9 and "n/a" not in line for line in body)
    assert "| fp32 | ours |" in md and "| fp32 | original |" in md
    assert "resident modules (make_pipeline)" in md and "reload from disk" in md


def test_variant_names_parse_and_conflicts_are_refused():
    v = Variant.parse("bf16+tf32+fused_adam+grad_ckpt")
    assert v == Variant(precision="bf16", tf32=True, fused_adam=True, grad_ckpt=True)
    assert Variant.parse(v.name) == v and Variant.parse("fp32") == Variant()
    for bad in ("bf16+fp16", "fp32+warp_speed", "fused_adam+adam8bit"):
        with pytest.raises(ValueError):
            Variant.parse(bad)


def test_cli_refuses_bad_arguments():
    cmd = [sys.executable, str(ROOT / "bench" / "bench_train.py"), "--variants", "fp32+nope"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 2 and "unknown feature 'nope'" in proc.stderr


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    m = build_models("small")
    place(m, Variant(), torch.device("cpu"))
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    return m, pixels


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_original_mode_computes_the_same_losses(small, stage):
    """Only the cost differs between the modes: same loss at the same seed and weights."""
    m, pixels = small
    losses = {}
    for mode in ("ours", "original"):
        with StageRun(m, stage, mode, Variant(), pixels) as run:
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                mse, reg = run.losses(gen)
            losses[mode] = (mse, reg)
    torch.testing.assert_close(losses["ours"][0], losses["original"][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(losses["ours"][1], losses["original"][1], rtol=1e-4, atol=0)
    assert losses["ours"][1] > 0


def test_original_hooks_every_layer_and_restores(small):
    m, _ = small
    before = dict(m.unet.attn_processors)
    with original_attention(m.unet, controller=None):
        procs = m.unet.attn_processors
        assert all(
            type(p).__name__ in ("AttnProcessor", "CrossAttnCaptureProcessor")
            for p in procs.values()
        )
        assert sum(".attn1." in k for k in procs) == sum(".attn2." in k for k in procs) > 0
    assert m.unet.attn_processors == before


def test_original_stage1_trains_the_table_and_restores_other_rows(small):
    m, pixels = small
    table = m.text_encoder.get_input_embeddings().weight
    before = table.detach().clone()
    with StageRun(m, 1, "original", Variant(), pixels) as run:
        run.step(0)
        assert run.n_trainable == table.numel()
    row = m.token_ids[0]
    assert not torch.equal(table[row], before[row])  # lr 1e-3 moved the placeholder
    keep = torch.ones(len(table), dtype=torch.bool)
    keep[row] = False
    assert torch.equal(table[keep], before[keep])
    assert not table.requires_grad
    with torch.no_grad():
        table.copy_(before)


def test_lora_variant_trains_only_adapters_and_reports_their_optimizer_state(small):
    """Issue 19: 'lora<R>' variants; the trained set and AdamW state against full training."""
    m, pixels = small
    assert Variant.parse("bf16+lora") == Variant(precision="bf16", lora_rank=4)
    assert Variant.parse("fp32+lora16").name == "fp32+lora16"
    saved = {k: v.clone() for k, v in m.unet.state_dict().items()}
    out = {}
    for v in (Variant(), Variant(lora_rank=4)):
        with StageRun(m, 3, "ours", v, pixels) as run:
            run.step(0)
            out[v.name] = (run.n_trainable, run.optimizer_bytes())
            names = [n for n, p in m.unet.named_parameters() if p.requires_grad]
            assert all(".lora_" in n for n in names) == (v.lora_rank > 0)
        m.unet.load_state_dict(saved)
    assert not any("lora" in n for n, _ in m.unet.named_modules())  # taken out on exit
    (full, full_bytes), (lora, lora_bytes) = out["fp32"], out["fp32+lora4"]
    assert full == sum(p.numel() for p in m.unet.parameters()) and 0 < lora < full / 20
    assert 8 * lora <= lora_bytes < 8 * lora + 4096  # two fp32 moments (+ step counters)
    assert 8 * full <= full_bytes < 8 * full + 4096
