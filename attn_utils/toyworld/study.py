"""The paper in miniature: `evaluate.py study` on the toy world, every method and ablation.

    python -m attn_utils.toyworld study --out studies/toy

Every method trains on the same number of instance images (--images, per concept): each
method's reference recipe (docs/methods.md; AttnDreamBooth and its ablations with the paper's
fast stage 3) keeps its learning rates, batch sizes and the split of its images over its
stages, and its step counts are scaled to that budget. DreamBooth's prior preservation uses
fewer class images. These are the study's only departures from the recipes, forced by 2 CPU
cores, besides no rotations (below); `--dry_run` prints the resulting flags.

The study runs as --processes copies of `evaluate.py study` (ranks, as torchrun would start
them) that split its (concept, method) units, each with its share of the CPU's threads: the toy
model's small tensors keep two threads of one process far from busy, so two one-thread
processes finish the same work sooner (docs/toyworld.md).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

from attn_utils.config import STAGE_NAMES
from attn_utils.toyworld.concepts import CONCEPTS, write_concept
from attn_utils.train.methods import ABLATIONS, stage_presets

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models" / "toyworld"
PROMPTS = ROOT / "dataset" / "prompts" / "toy_study.txt"
METHODS = ("attndreambooth", "ti", "dreambooth", "ti_db", "core", *ABLATIONS)
PAPER_ABLATIONS = ("no_stage1", "no_stage2", "no_stage3", "no_reg")
DEFAULT_METHODS = ("attndreambooth", "ti", "dreambooth", "ti_db", "core", *PAPER_ABLATIONS)
MIN_STEPS = 5
PRIOR = ["--num_class_images", "40", "--class_inference_steps", "25"]
NO_ROTATION = ["--rotate_p", "0"]


def _fast(method: str) -> bool:
    return method == "attndreambooth" or (method in ABLATIONS and 3 in ABLATIONS[method][0])


def scaled_steps(method: str, images: int) -> dict[int, int]:
    """{stage: optimiser steps} so that the method sees `images` instance images in all,
    split over its stages as its reference recipe splits them."""
    stages = stage_presets(method, _fast(method))
    per_step = {
        i: s.get("batch_size", 8) * s.get("gradient_accumulation_steps", 1)
        for i, s in stages.items()
    }
    seen = {i: stages[i]["train_steps"] * per_step[i] for i in stages}
    total = sum(seen.values())
    return {i: max(MIN_STEPS, round(images * seen[i] / total / per_step[i])) for i in stages}


def method_flags(method: str, images: int) -> list[str]:
    """train_attndreambooth.py flags of one method in the miniature."""
    flags = ["--fast"] if _fast(method) else []
    for stage, steps in scaled_steps(method, images).items():
        flags += [f"--{STAGE_NAMES[stage]}_train_steps", str(steps)]
    if method in ("dreambooth", "ti_db"):
        flags += PRIOR
    if method == "core":
        flags += ["--core_prompts", str(PROMPTS)]  # CoRe's context prompts: toy words only
    return flags


def train_flags(seed: int) -> list[str]:
    """train_attndreambooth.py flags the miniature gives every method."""
    # The toy world's one departure for every method: no rotation (TI and DreamBooth never
    # rotate; AttnDreamBooth's 45-degree turns with black corners, meant for real photos,
    # put a 64 px concept out of what the toy base model knows: docs/toyworld.md).
    # --seed seeds the trainings too (their batches, noise, augmentation; DreamBooth's class
    # images), so two seeds are two independent repetitions of the whole study.
    return ["--resolution", "64", *NO_ROTATION, "--seed", str(seed)] + [
        x for p in STAGE_NAMES.values() for x in (f"--{p}_validation_steps", "0")
    ]


def study_argv(args) -> list[str]:
    """The evaluate.py study command line."""
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"--methods: unknown method {m!r}; known: {', '.join(METHODS)}")
    concepts = Path(args.out) / "concepts.json"
    train = train_flags(args.seed)
    # the sampler the study was measured with (docs/toyworld.md), not the base model folder's
    # own (DDIM 30, guidance 4), which inference.py would take without these flags
    infer = ["--infer_scheduler", "dpm", "--num_inference_steps", "25", "--guidance_scale", "7.5"]
    infer += ["--resolution", "64", "--infer_batch_size", "10"]
    argv = [
        str(ROOT / "evaluate.py"), "study",
        "--concepts", str(concepts),
        "--prompts", str(args.prompts),
        "--out", str(args.out),
        "--pretrained_model_name_or_path", str(args.models / "base"),
        "--clip_model", str(args.models / "clip"),
        "--dino_model", str(args.models / "dino"),
        "--oracle_model", str(args.models / "oracle"),
        "--methods", ",".join(methods),
        "--stages", "1,3",
        "--num_images_per_prompt", str(args.images_per_prompt),
        "--seed", str(args.seed),
        "--batch_size", "20",
        "--train_args", shlex.join(train),
        "--infer_args", shlex.join(infer),
    ]  # fmt: skip
    for m in methods:
        argv += ["--method_args", f"{m}={shlex.join(method_flags(m, args.images))}"]
    return argv


def write_concepts(out: Path, names: list[str]) -> Path:
    """out/photos/<name>/ (64 px) for each concept and out/concepts.json listing them."""
    entries = []
    for name in names:
        folder = write_concept(name, out / "photos", size=64)
        category = CONCEPTS[name]["category"]
        entries.append({"name": name, "dir": str(folder.resolve()), "category": category})
    path = out / "concepts.json"
    path.write_text(json.dumps(entries, indent=2) + "\n")
    return path


def main(args) -> int:
    """`python -m attn_utils.toyworld study` (parsed in __main__.py)."""
    names = args.name or sorted(CONCEPTS)
    argv = study_argv(args)
    if args.dry_run:
        print(shlex.join([sys.executable, *argv]))
        return 0
    if args.processes < 1:
        raise ValueError(f"--processes: must be >= 1, got {args.processes}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_concepts(out, names)
    return run_ranks([sys.executable, *argv], args.processes)


def run_ranks(cmd: list[str], n: int, env: dict | None = None) -> int:
    """Run cmd as ranks 0..n-1 of one launch, each with cores/n torch threads; the first
    non-zero exit status, or 0. (A failing rank makes the others stop: evaluate.py study.)"""
    env = dict(os.environ) if env is None else env
    if n == 1:
        return subprocess.run(cmd, env=env, check=False).returncode
    threads = str(max(1, (os.cpu_count() or 1) // n))
    ranks = [{"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(n)} for r in range(n)]
    procs = [
        subprocess.Popen(cmd, env={**env, **rank, "OMP_NUM_THREADS": threads}) for rank in ranks
    ]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c != 0), 0)
