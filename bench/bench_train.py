"""Training-step benchmark: the library's step vs the original's, on random SD2.1-shaped weights.

Per (variant, stage) it reports the median ms/step after warm-up, peak memory and the
projected training time of the paper's recipe, for two modes measured in the same run:
"ours" (the library) and "original" (the original's attention hook and text handling), as
bench/modes.py defines them.
Each variant runs in a child process (global flags such as TF32 and compiled graphs stay
apart). Data loading is not timed: the pixels are a fixed random batch on the device.
Run `python bench/bench_train.py --help`; bench/README.md explains the output.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from attn_utils.argparsing import Parser  # noqa: E402
from bench.modes import MODES, RECIPES, VALIDATIONS, StageRun, Variant, place  # noqa: E402
from bench.report import markdown, summarise  # noqa: E402

# CLI flag -> (Variant field, help). The trainer's flag names where it has one.
FEATURE_FLAGS = {
    "tf32": ("tf32", "TF32 matmuls and convolutions (CUDA only)"),
    "fused_adam": ("fused_adam", "fused AdamW kernel"),
    "use_8bit_adam": ("adam8bit", "bitsandbytes AdamW8bit"),
    "gradient_checkpointing": ("grad_ckpt", "gradient checkpointing in the U-Net"),
    "channels_last": ("channels_last", "U-Net weights and inputs in channels_last"),
    "compile": ("compile", "torch.compile the U-Net (give it more --warmup)"),
    "cache_latents": ("cache_latents", "latents from a pre-encoded pool: no VAE in the step"),
    "no_text_cache": ("no_text_cache", "ours with the text encoder on B copies every step"),
}


# ---------------------------------------------------------------- measurement (child side)
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> str:
    """Start a peak-memory window; returns what the peak will mean."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return "cuda max_memory_allocated"
    try:  # Linux: writing 5 resets VmHWM (peak RSS) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")
        return "peak RSS (VmHWM, reset per measurement)"
    except OSError:
        return "peak RSS of the whole process (could not reset per measurement)"


def read_peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    status = Path("/proc/self/status")
    if status.exists():
        return int(re.search(r"VmHWM:\s+(\d+)", status.read_text()).group(1)) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def env_info(device: torch.device) -> dict:
    import diffusers
    import transformers

    cpu = platform.processor()
    with contextlib.suppress(OSError):
        cpu = re.search(r"model name\s*:\s*(.*)", Path("/proc/cpuinfo").read_text()).group(1)
    info = dict(
        torch=torch.__version__, diffusers=diffusers.__version__,
        transformers=transformers.__version__, python=platform.python_version(), cpu=cpu,
        cpu_threads=torch.get_num_threads(), device=device.type,
        load_average=[round(x, 2) for x in os.getloadavg()],  # other work on the machine
    )  # fmt: skip
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda)
    with contextlib.suppress(ImportError):
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    return info


def _synthetic_pixels(b: int, res: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(0)  # the same pixels on every device
    x = torch.rand(b, 3, res, res, generator=g, device="cpu") * 2 - 1  # (B, 3, R, R)
    return x.to(device)


def run_variant(job: dict) -> dict:
    """Child: build the models once, then time every requested (stage, mode)."""
    from bench.sd21_configs import build_models, count_params

    v, device = Variant(**job["variant"]), torch.device(job["device"])
    m = build_models(job["model"], device, job["seed"])
    place(m, v, device)
    pixels = _synthetic_pixels(job["batch_size"], job["resolution"], device)
    params = {k: count_params(getattr(m, k)) for k in ("unet", "text_encoder", "vae")}
    out = {"env": env_info(device), "pool_ms": None, "results": [], "params": params}
    pool = None
    if v.cache_latents:  # the trainer's pool, built from a batch of random images
        import numpy as np
        from PIL import Image

        from attn_utils.train.latents import LatentPool

        res = job["resolution"]
        rgb = np.random.default_rng(0).integers(0, 255, (len(pixels), res, res, 3), np.uint8)
        t0 = time.perf_counter()
        with StageRun.autocast(v, device):  # one variant per image: the pool's own augment
            pool = LatentPool([Image.fromarray(x) for x in rgb], m.vae, res, False, 1, 0, device)
        _sync(device)
        out["pool_ms"] = (time.perf_counter() - t0) * 1e3
    for stage in job["stages"]:
        for mode in job["modes"]:
            scope = reset_peak(device)
            run = StageRun(m, stage, mode, v, pixels, pool)
            times, losses = [], []
            with run:
                for i in range(job["warmup"] + job["steps"]):
                    _sync(device)
                    t0 = time.perf_counter()
                    losses.append(run.step(i))
                    _sync(device)
                    if i >= job["warmup"]:
                        times.append((time.perf_counter() - t0) * 1e3)
                optimizer_bytes = run.optimizer_bytes()
            ms = statistics.median(times)
            out["results"].append(dict(
                variant=v.name, stage=stage, mode=mode, ms=ms, ms_all=times,
                peak_mib=read_peak_mib(device), memory_metric=scope, setup_ms=run.setup_ms,
                trainable=run.n_trainable, optimizer_bytes=optimizer_bytes, losses=losses,
                load_average=os.getloadavg()[0],
            ))  # fmt: skip
            del run
            print(f"[bench] {v.name} stage {stage} {mode}: {ms:.1f} ms/step", file=sys.stderr)
    return out


def run_validation(job: dict) -> dict:
    """Child: a pipeline around the resident modules vs a full reload from disk."""
    from diffusers import StableDiffusionPipeline

    from attn_utils.render.pipeline import make_pipeline
    from bench.sd21_configs import bench_tokenizer, build_models

    device = torch.device(job["device"])
    m = build_models(job["model"], device, job["seed"])
    tok = bench_tokenizer()
    args = (tok, m.text_encoder, m.vae, m.unet, m.scheduler.config)
    resident, reload = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        pipe = make_pipeline(*args)
        resident.append((time.perf_counter() - t0) * 1e3)
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        pipe.save_pretrained(d, safe_serialization=True)
        save_ms = (time.perf_counter() - t0) * 1e3
        for _ in range(job["reloads"]):
            _sync(device)
            t0 = time.perf_counter()
            loaded = StableDiffusionPipeline.from_pretrained(d).to(device)
            _sync(device)
            reload.append((time.perf_counter() - t0) * 1e3)
            del loaded
    return dict(
        resident_ms=statistics.median(resident), reload_ms=statistics.median(reload),
        reload_ms_all=reload, save_ms=save_ms, env=env_info(device),
    )  # fmt: skip


# ---------------------------------------------------------------- orchestration (parent side)
def _child(job: dict) -> dict:
    """Run one job in a fresh interpreter; an error becomes {'error': ...}, not a crash."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "job.json"
        path.write_text(json.dumps(job))
        rc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), "--_one", str(path)]
        ).returncode
        out = path.with_suffix(".out.json")
        if out.exists():
            return json.loads(out.read_text())
        return {"error": f"child process exited with code {rc} and wrote no result"}


def child_main(path: Path) -> int:
    job = json.loads(path.read_text())
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    try:
        out = run_validation(job) if job["kind"] == "validation" else run_variant(job)
    except Exception as e:  # noqa: BLE001 - reported in the JSON, the other variants go on
        traceback.print_exc()
        first = (str(e).strip().splitlines() or [""])[0]
        out = {"error": f"{type(e).__name__}: {first}"}
    path.with_suffix(".out.json").write_text(json.dumps(out))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--model",
        choices=["sd21", "small"],
        default="sd21",
        help="sd21: SD2.1-base shapes; small: scaled down for CPU smoke runs",
    )
    p.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if any)")
    p.add_argument("--resolution", type=int, default=512, help="pixels (latents are /8)")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--steps", type=int, default=10, help="timed steps per stage and mode")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile: more)")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--modes", default="ours,original")
    p.add_argument(
        "--recipe",
        choices=list(RECIPES),
        default="paper",
        help="step counts for the projection: paper 60/100/500, fast 60/100/200",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    g = p.add_argument_group("speed features (one variant; --variants runs several)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    for flag, (_, help_) in FEATURE_FLAGS.items():
        g.add_argument(f"--{flag}", action="store_true", help=help_)
    g.add_argument(
        "--variants",
        default=None,
        help="comma list of '+'-joined features, e.g. 'fp32,bf16+tf32+fused_adam' (names: "
        "fp32|bf16|fp16 and the Variant fields); the first is the 'vs baseline' reference",
    )
    p.add_argument(
        "--validation_reloads",
        type=int,
        default=3,
        help="reloads from disk to time (0: skip the validation comparison)",
    )
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    p.add_argument("--_one", type=Path, default=None, help=argparse.SUPPRESS)
    return p


def _flag_variant(ns: argparse.Namespace) -> Variant:
    kw = {field: getattr(ns, flag) for flag, (field, _) in FEATURE_FLAGS.items()}
    return Variant(precision={"no": "fp32"}.get(ns.mixed_precision, ns.mixed_precision), **kw)


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)
    if ns._one is not None:
        return child_main(ns._one)
    try:
        variants = (
            [Variant.parse(s) for s in ns.variants.split(",")]
            if ns.variants
            else [_flag_variant(ns)]
        )
        stages = sorted({int(s) for s in ns.stages.split(",")})
        modes = [m for m in MODES if m in ns.modes.split(",")]
    except ValueError as e:
        p.error(str(e))
    if not set(stages) <= {1, 2, 3} or not modes or ns.steps < 1 or ns.warmup < 0:
        p.error("--stages from 1,2,3; --modes from ours,original; --steps >= 1; --warmup >= 0")
    if ns.resolution % 8 or ns.batch_size < 1:
        p.error("--resolution: a multiple of 8; --batch_size: >= 1")
    device = ns.device or ("cuda" if torch.cuda.is_available() else "cpu")
    config = {k: getattr(ns, k) for k in ("model", "resolution", "batch_size", "steps", "warmup",
                                          "recipe", "seed", "threads")}  # fmt: skip
    args = " ".join(sys.argv[1:] if argv is None else argv)
    config.update(device=device, stages=stages, modes=modes, recipe_steps=RECIPES[ns.recipe],
                  command=f"python bench/bench_train.py {args}")  # fmt: skip
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        p.error(f"--variants: repeated variant in {names}")
    report = dict(config=config, variants=names, results=[], errors=[], env=None, params=None)
    for v in variants:
        out = _child(dict(kind="variant", variant=dataclasses.asdict(v), **config))
        if "error" in out:
            report["errors"].append(dict(variant=v.name, error=out["error"]))
            continue
        report["results"] += out["results"]
        report["env"], report["params"] = report["env"] or out["env"], out["params"]
        if out["pool_ms"] is not None:
            report.setdefault("pool_ms", {})[v.name] = out["pool_ms"]
    if ns.validation_reloads > 0:
        out = _child(dict(kind="validation", reloads=ns.validation_reloads, **config))
        report["validation"] = out
        if "error" not in out:
            out["validations_in_recipe"] = VALIDATIONS[ns.recipe]
            out["reload_recipe_s"] = out["reload_ms"] * VALIDATIONS[ns.recipe] / 1e3
    summarise(report)
    md = markdown(report)
    if ns.json:
        ns.json.parent.mkdir(parents=True, exist_ok=True)
        ns.json.write_text(json.dumps(report, indent=2))
    if ns.markdown:
        ns.markdown.parent.mkdir(parents=True, exist_ok=True)
        ns.markdown.write_text(md)
    print(md)
    return 1 if not report["results"] else 0


if __name__ == "__main__":
    sys.exit(main())
