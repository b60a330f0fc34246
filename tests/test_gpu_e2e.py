"""bench/gpu_e2e.py in its CPU mode: the real CLIs end to end on the tiny model, one JSON."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_e2e_runs_every_part_and_reports_the_keys(tmp_path):
    out = tmp_path / "e2e"
    cmd = [sys.executable, "bench/gpu_e2e.py", "--tiny", "--out", str(out),
           "--flag_runs", "ckpt,no_offload"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
    report = json.loads((out / "e2e.json").read_text())
    s = report["summary"]
    assert report["device"] == "cpu" and report["mode"] == "tiny"
    assert s["failed_runs"] == [] and s["resume_ok"] is True and s["export_loads"] is True
    for key in ("recipe_training_s", "recipe_training_s_pool", "bash_wall_s"):
        assert s[key] > 0, key
    # peak memory is max_memory_allocated: a CUDA number, absent on the CPU
    assert s["peak_gib_plain"] is None and s["peak_gib_8bit_ckpt"] is None
    r = report["results"]
    assert set(r) == {"recipe", "pool", "bash", "resume", "fast", "flags", "inference", "lora",
                      "sdxl"}  # fmt: skip
    assert set(r["recipe"]["stages"]) == {"1", "2", "3"}
    assert all(v["train_seconds"] > 0 for v in r["recipe"]["stages"].values())
    assert r["resume"]["resumed"]["stages"]["3"]["steps"] == 12
    assert set(r["flags"]) == {"ckpt", "no_offload"}
    # issue 19: the adapters of stages 2-3 load in plain diffusers; a few kB on the tiny model
    assert s["lora_loads"] is True and s["peak_gib_lora_stage_3"] is None
    assert 0 < r["lora"]["file_mib"]["3"] < 1 and set(r["lora"]["ckpt"]["stages"]) == {
        "1",
        "2",
        "3",
    }
    # issue 20: SDXL's three stages report seconds per step (peak memory: CUDA only)
    assert set(s["sdxl_s_per_step"]) == {"1", "2", "3"} and all(
        v > 0 for v in s["sdxl_s_per_step"].values()
    )
    assert r["sdxl"]["inference"]["rc"] == 0 and set(s["sdxl_peak_gib"].values()) == {None}
    shown = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert shown["device"] == "cpu" and shown["resume_ok"] is True
