"""End to end through the real CLIs on one device: recipe timings, resume, flags, inference.

    bash bench/gpu_e2e.sh OUT_DIR [--parts recipe,pool,...]    CUDA: SD2.1-base shapes, 512 px,
                                                               batch 8, the paper's step counts
    python bench/gpu_e2e.py --tiny --out DIR                   CPU: the tiny model, a few steps

Everything runs as a user would run it: a pipeline written to disk, a procedural concept, then
`train_attndreambooth.py`, `bash_script/train_attndreambooth.sh` and `inference.py` as
subprocesses. Per-stage loop seconds and peak memory come from each stage's stage_info.json.
One JSON goes to stdout and to OUT/e2e.json (merged with the parts an earlier call wrote).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attn_utils.argparsing import Parser  # noqa: E402

PARTS = ("recipe", "pool", "bash", "resume", "fast", "flags", "inference", "lora", "sdxl")
# issue 20: SDXL-base shapes at SDXL's defaults (docs/sdxl.md), short runs: seconds per step
# and peak memory of each stage, then one image with heatmaps (and an export on the CPU).
SDXL_STEPS = ["20", "20", "20"]
LORA_FLAGS = ["--attn_lora_rank", "4", "--unet_lora_rank", "4"]  # issue 19: adapters, rank 4
# Short runs of flag combinations: (name, flags); steps are cut to SHORT_STEPS.
FLAG_RUNS = {
    "plain_fp32": ["--mixed_precision", "no"],
    "8bit_ckpt": ["--use_8bit_adam", "--gradient_checkpointing"],
    "ckpt": ["--gradient_checkpointing"],
    "no_offload": ["--no-offload_text_encoder"],
    "channels_last": ["--channels_last"],
    "sdpa_cudnn": ["--sdpa_backend", "cudnn"],
    "sdpa_flash": ["--sdpa_backend", "flash"],
    "compile_blocks": ["--torch_compile", "blocks"],
    "compile_unet": ["--torch_compile", "unet"],
    "compile_vae": ["--compile_vae"],
    "fp16": ["--mixed_precision", "fp16"],
    "sdpa_math": ["--sdpa_backend", "math"],
    "profile": ["--profile_steps", "5"],  # <run>/profile/stage_<k>.txt: ops and host syncs
}
GPU_FLAG_RUNS = [k for k in FLAG_RUNS if k != "sdpa_math"]
TINY_FLAG_RUNS = ["plain_fp32", "ckpt", "no_offload", "channels_last", "sdpa_math"]
STEP_FLAGS = ("--ti_train_steps", "--attn_train_steps", "--unet_train_steps")


class Setup:
    """The device, model, concept and step counts of one e2e session."""

    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        self.out: Path = args.out
        self.tiny = args.tiny
        self.cuda = torch.cuda.is_available() and not args.tiny
        self.device = torch.cuda.get_device_name(0) if self.cuda else "cpu"
        if self.tiny:
            from attn_utils.tiny import (
                TINY_CATEGORY,
                TINY_RESOLUTION,
                build_tiny_model,
                draw_concept,
            )

            self.model = build_tiny_model(self.out / "model")
            self.concept = draw_concept(self.out / "concept", n_images=5)
            self.category, self.resolution = TINY_CATEGORY, TINY_RESOLUTION
            self.steps = [str(n) for n in args.tiny_steps]  # stages 1, 2, 3
            self.batch = [f"--{n}_batch_size={b}" for n, b in (("ti", 2), ("attn", 2), ("unet", 2))]
            self.precision = ["--mixed_precision", "no"]  # bf16 on a CPU is slow, not tested
        else:
            from attn_utils.tiny import draw_concept
            from bench.sd21_configs import save_pipeline

            self.model = save_pipeline(self.out / "model", "sd21")
            self.concept = draw_concept(self.out / "concept", n_images=5, size=512)
            self.category, self.resolution = "sloth", 512
            self.steps = ["60", "100", "500"]  # the paper's (docs/method.md)
            self.batch = []  # the paper's 8
            self.precision = ["--mixed_precision", "bf16", "--allow_tf32"]
        self.short = [str(n) for n in args.short_steps]

    def train_argv(self, run: str, *extra: str, steps: list[str] | None = None) -> list[str]:
        steps = steps or self.steps
        argv = [
            "--pretrained_model_name_or_path", str(self.model),
            "--instance_data_dir", str(self.concept), "--category", self.category,
            "--output_dir", str(self.out / "runs" / run), "--resolution", str(self.resolution),
            *self.precision, *self.batch,
        ]  # fmt: skip
        for flag, n in zip(STEP_FLAGS, steps):
            argv += [flag, n]
        return argv + list(extra)


def launch(cmd: list[str], env: dict | None = None, until=None) -> dict:
    """Run a command; `until(proc)` may stop it early. Returns rc, wall seconds, output tails."""
    env = {**os.environ, **(env or {})}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip
    if until is not None:
        until(proc)
    out, err = proc.communicate()
    return {
        "cmd": " ".join(cmd), "rc": proc.returncode,
        "wall_s": round(time.perf_counter() - t0, 2), "stderr_tail": err[-1500:],
        "stdout_tail": out[-500:],
        "resumed": "resumed from" in out + err,  # before the closing lines, out of the tail
    }  # fmt: skip


def stages_of(run_dir: Path) -> dict:
    """{stage: {train_seconds, peak_gib, steps}} from the stage_info.json files."""
    found = {}
    for k in (1, 2, 3):
        p = run_dir / f"stage_{k}" / "stage_info.json"
        if p.is_file():
            info = json.loads(p.read_text())
            found[str(k)] = {key: info.get(key) for key in ("train_seconds", "peak_gib", "steps")}
    return found


def train(s: Setup, run: str, *extra: str, steps=None, fresh=True, until=None, env=None,
          stages_trained=("1", "2", "3")) -> dict:  # fmt: skip
    run_dir = s.out / "runs" / run
    if fresh:
        shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "train_attndreambooth.py", *s.train_argv(run, *extra, steps=steps)]
    r = launch(cmd, env=env, until=until)
    r["stages"] = stages_of(run_dir)
    trained = {k: v for k, v in r["stages"].items() if k in stages_trained}
    r["training_s"] = round(sum(v["train_seconds"] or 0 for v in trained.values()), 2)
    peaks = [v["peak_gib"] for v in trained.values() if v["peak_gib"] is not None]
    r["peak_gib"] = max(peaks) if peaks else None
    for table in sorted((run_dir / "profile").glob("stage_*.txt")):
        r.setdefault("profile", {})[table.stem] = table.read_text().splitlines()[:2]
    return r


def with_stages_1_2(s: Setup, src: str, dst: str) -> None:
    """Start run `dst` from the completed stages 1-2 of run `src` (only stage 3 trains)."""
    shutil.rmtree(s.out / "runs" / dst, ignore_errors=True)
    for k in (1, 2):
        shutil.copytree(s.out / "runs" / src / f"stage_{k}", s.out / "runs" / dst / f"stage_{k}")


def part_resume(s: Setup) -> dict:
    """SIGTERM in stage 3 after its first checkpoint, then the same command again."""
    with_stages_1_2(s, "recipe", "resume")
    every = "100" if not s.tiny else "2"
    extra = ["--unet_checkpointing_steps", every]
    ckpts = s.out / "runs" / "resume" / "checkpoints"

    def stop_after_checkpoint(proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + 1800
        while proc.poll() is None and time.monotonic() < deadline:
            if any(p.name.startswith("checkpoint-s3-") for p in ckpts.glob("checkpoint-*")):
                proc.send_signal(signal.SIGTERM)
                return
            time.sleep(0.05)

    first = train(s, "resume", *extra, fresh=False, until=stop_after_checkpoint, stages_trained=())
    second = train(s, "resume", *extra, fresh=False, stages_trained=("3",))
    ok = first["rc"] == 128 + signal.SIGTERM and second["rc"] == 0
    ok = ok and second["resumed"]
    return {"stopped": first, "resumed": second, "resume_ok": ok}


def part_inference(s: Setup) -> dict:
    """inference.py with heatmaps and --export_pipeline, then the export in plain diffusers."""
    run_dir, out = s.out / "runs" / "recipe", s.out / "inference"
    shutil.rmtree(out, ignore_errors=True)
    steps, res = ("25", str(s.resolution)) if not s.tiny else ("2", "64")
    cmd = [
        sys.executable, "inference.py", "--run_dir", str(run_dir),
        "--prompt", "a watercolor painting of {} as a knight", "--prompt", "{} on a beach",
        "--num_images_per_prompt", "4", "--infer_batch_size", "4", "--num_inference_steps", steps,
        "--resolution", res, "--save_dir", str(out / "images"), "--save_attention_maps",
        "--export_pipeline", str(out / "pipeline"),
    ]  # fmt: skip
    r = launch(cmd)
    check = (
        "import sys, torch; from diffusers import StableDiffusionPipeline as P; "
        "d = 'cuda' if torch.cuda.is_available() else 'cpu'; "
        "p = P.from_pretrained(sys.argv[1]).to(d); p.set_progress_bar_config(disable=True); "
        f"im = p('a photo', num_inference_steps=2, height={res}, width={res}).images[0]; "
        "print('export ok', im.size)"
    )
    loaded = launch([sys.executable, "-c", check, str(out / "pipeline")])
    return {"inference": r, "export_load": loaded, "export_loads": loaded["rc"] == 0}


def part_lora(s: Setup) -> dict:
    """The recipe with rank-4 adapters in stages 2-3 (peak memory of each stage), stage 3 again
    with gradient checkpointing, and the adapters in plain diffusers (load_lora_weights)."""
    full = train(s, "lora", *LORA_FLAGS)
    with_stages_1_2(s, "lora", "lora_ckpt")
    ckpt = train(s, "lora_ckpt", *LORA_FLAGS, "--gradient_checkpointing", fresh=False,
                 stages_trained=("3",))  # fmt: skip
    run = s.out / "runs" / "lora"
    files = {k: run / f"stage_{k}" / "unet_lora" / "pytorch_lora_weights.safetensors"
             for k in (2, 3)}  # fmt: skip
    res = "64" if s.tiny else str(s.resolution)
    check = (
        "import sys, torch; from diffusers import StableDiffusionPipeline as P; "
        "d = 'cuda' if torch.cuda.is_available() else 'cpu'; p = P.from_pretrained(sys.argv[1]); "
        "p.load_lora_weights(sys.argv[2], adapter_name='s2'); "
        "p.load_lora_weights(sys.argv[3], adapter_name='s3'); p.set_adapters(['s2', 's3']); "
        "p = p.to(d); p.set_progress_bar_config(disable=True); "
        f"im = p('a photo', num_inference_steps=2, height={res}, width={res}).images[0]; "
        "print('lora ok', im.size)"
    )
    loaded = launch([sys.executable, "-c", check, str(s.model),
                     *[str(f.parent) for f in files.values()]])  # fmt: skip
    return {
        "run": full, "ckpt": ckpt, "load": loaded, "lora_loads": loaded["rc"] == 0,
        "file_mib": {k: round(f.stat().st_size / 2**20, 3) for k, f in files.items()
                     if f.is_file()},
    }  # fmt: skip


def part_sdxl(s: Setup) -> dict:
    """The three stages on SDXL (random weights of SDXL-base's shapes on a GPU, the tiny
    SDXL-shaped model on the CPU) at its defaults but for the step counts, then inference."""
    from attn_utils.tiny import build_tiny_model, draw_concept

    if s.tiny:
        model, size, steps = build_tiny_model(s.out / "model_sdxl", family="sdxl"), 160, s.steps
        extra = ["--resolution", "128", *[f"--{n}_gradient_accumulation_steps=1"
                                          for n in ("ti", "attn", "unet")]]  # fmt: skip
    else:
        from bench.sdxl_configs import save_sdxl_pipeline

        model, size, steps, extra = save_sdxl_pipeline(s.out / "model_sdxl"), 1024, SDXL_STEPS, []
    concept = draw_concept(s.out / "concept_sdxl", n_images=5, size=size)
    run = s.out / "runs" / "sdxl"
    shutil.rmtree(run, ignore_errors=True)
    argv = ["--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(concept),
            "--category", s.category, "--output_dir", str(run), *s.precision, *extra]  # fmt: skip
    for flag, n in zip(STEP_FLAGS, steps):
        argv += [flag, n]
    r = launch([sys.executable, "train_attndreambooth.py", *argv])
    r["stages"] = stages_of(run)
    for v in r["stages"].values():
        v["s_per_step"] = round(v["train_seconds"] / v["steps"], 4) if v["steps"] else None
    # an export is another full SDXL pipeline on disk (~14 GB): on the CPU only
    export = ["--export_pipeline", str(s.out / "export_sdxl")] if s.tiny else []
    render = launch([sys.executable, "inference.py", "--run_dir", str(run), "--prompt",
                     "a {} on a beach", "--save_dir", str(s.out / "images_sdxl"),
                     "--num_images_per_prompt", "1", "--num_inference_steps",
                     "2" if s.tiny else "25", "--save_attention_maps", *export])  # fmt: skip
    if not s.tiny:  # ~24 GB of U-Nets: the SD parts need the disk
        shutil.rmtree(run, ignore_errors=True)
        shutil.rmtree(model, ignore_errors=True)
    return {"train": r, "inference": render, "steps": steps}


def run_parts(s: Setup, parts: list[str]) -> dict:
    res: dict = {}
    if "recipe" in parts:  # exact per-step augmentation, no validation, no checkpoints
        res["recipe"] = train(s, "recipe")
    if "pool" in parts:
        res["pool"] = train(s, "pool", "--cache_latents")
    if "bash" in parts:  # validation, checkpoints and final saves included
        shutil.rmtree(s.out / "runs" / "bash", ignore_errors=True)
        extra = [] if not s.tiny else [*s.batch, "--resolution", str(s.resolution), *s.precision,
                                       *[x for f, n in zip(STEP_FLAGS, s.steps) for x in (f, n)],
                                       "--validation_inference_steps", "2"]  # fmt: skip
        cmd = ["bash", "bash_script/train_attndreambooth.sh", str(s.concept), s.category,
               str(s.out / "runs" / "bash"), *extra]  # fmt: skip
        r = launch(cmd, env={"BASE_MODEL": str(s.model), "PYTHON": sys.executable})
        r["stages"] = stages_of(s.out / "runs" / "bash")
        res["bash"] = r
    if "resume" in parts:
        res["resume"] = part_resume(s)
    if "fast" in parts:
        with_stages_1_2(s, "recipe", "fast")
        fast_steps = s.steps[:2] + (["200"] if not s.tiny else [s.steps[2]])
        res["fast"] = train(s, "fast", "--fast", steps=fast_steps, fresh=False,
                            stages_trained=("3",))  # fmt: skip
    if "flags" in parts:
        res["flags"] = {}
        for name in s.flag_runs:
            res["flags"][name] = train(s, f"flags-{name}", *FLAG_RUNS[name], steps=s.short)
    if "inference" in parts:
        res["inference"] = part_inference(s)
    if "lora" in parts:
        res["lora"] = part_lora(s)
    if "sdxl" in parts:
        res["sdxl"] = part_sdxl(s)
    return res


def summary(res: dict) -> dict:
    """The headline numbers (None where the part did not run or failed)."""
    get = lambda *keys: _dig(res, keys)  # noqa: E731
    flags = res.get("flags", {})
    return {
        "recipe_training_s": get("recipe", "training_s"),
        "recipe_training_s_pool": get("pool", "training_s"),
        "bash_wall_s": get("bash", "wall_s"),
        "peak_gib_plain": get("recipe", "peak_gib"),
        "peak_gib_8bit_ckpt": _dig(flags, ("8bit_ckpt", "peak_gib")),
        "resume_ok": get("resume", "resume_ok"),
        "export_loads": get("inference", "export_loads"),
        "peak_gib_lora_stage_3": get("lora", "run", "stages", "3", "peak_gib"),
        "peak_gib_lora_stage_3_ckpt": get("lora", "ckpt", "stages", "3", "peak_gib"),
        "lora_loads": get("lora", "lora_loads"),
        "sdxl_s_per_step": {
            k: v.get("s_per_step") for k, v in (get("sdxl", "train", "stages") or {}).items()
        },  # fmt: skip
        "sdxl_peak_gib": {
            k: v.get("peak_gib") for k, v in (get("sdxl", "train", "stages") or {}).items()
        },  # fmt: skip
        "failed_runs": sorted(_failures(res)),
    }


def _dig(d, keys):
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _failures(res: dict, path: str = "") -> list[str]:
    bad = []
    for k, v in res.items():
        if isinstance(v, dict) and "rc" in v and "cmd" in v:
            expected = 128 + signal.SIGTERM if k == "stopped" else 0
            if v["rc"] != expected:
                bad.append(f"{path}{k}")
        elif isinstance(v, dict):
            bad += _failures(v, f"{path}{k}/")
    return bad


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="work folder; e2e.json goes here")
    p.add_argument("--parts", default=",".join(PARTS), help=f"subset of {','.join(PARTS)}")
    p.add_argument("--flag_runs", default=None, help=f"subset of {','.join(FLAG_RUNS)}")
    p.add_argument("--tiny", action="store_true", help="the tiny model on the CPU (test suite)")
    p.add_argument("--tiny_steps", type=int, nargs=3, default=[2, 2, 12], metavar="N")
    p.add_argument("--short_steps", type=int, nargs=3, default=[10, 10, 20], metavar="N")
    args = p.parse_args(argv)
    parts = [x for x in args.parts.split(",") if x]
    default_runs = TINY_FLAG_RUNS if args.tiny else GPU_FLAG_RUNS
    flag_runs = [x for x in (args.flag_runs or ",".join(default_runs)).split(",") if x]
    unknown = [x for x in parts if x not in PARTS] + [x for x in flag_runs if x not in FLAG_RUNS]
    if unknown:
        print(f"error: --parts / --flag_runs: unknown {unknown[0]!r}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    s = Setup(args)
    s.flag_runs = flag_runs
    if s.tiny:  # the tiny run is short already
        s.short = s.steps
    import torch

    path = args.out / "e2e.json"
    report = json.loads(path.read_text()) if path.is_file() else {"results": {}}
    report["results"].update(run_parts(s, parts))
    report.update(
        device=s.device, mode="tiny" if s.tiny else "sd21", torch=torch.__version__,
        date=time.strftime("%Y-%m-%d"), resolution=s.resolution, steps=s.steps,
        batch_size=8 if not s.tiny else 2,
    )  # fmt: skip
    report["summary"] = summary(report["results"])
    tmp = path.with_name(".e2e.json.tmp")
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(path)
    print(json.dumps(report["summary"] | {"device": s.device}, indent=2))
    return 1 if report["summary"]["failed_runs"] else 0


if __name__ == "__main__":
    sys.exit(main())
