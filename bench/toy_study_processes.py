"""The toy study's work on the CPU: one process with all threads against processes side by side.

    python bench/toy_study_processes.py [--jobs 2] [--cores 2] [--concept checker_toy]

A job is what the toy study runs most: AttnDreamBooth's three stages (the study's scaled step
counts, attn_utils/toyworld/study.py) on a toy concept, as a child process, as the study runs
it. The same `--jobs` jobs run twice in this one invocation: one after another with --cores
torch threads each, then all at once with cores/jobs threads each. It prints both wall times
and their ratio, the gain `python -m attn_utils.toyworld study --processes 2` rests on. Run it
on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from attn_utils.toyworld.concepts import CONCEPTS, write_concept  # noqa: E402
from attn_utils.toyworld.study import MODELS, method_flags, train_flags  # noqa: E402


def job_argv(photos: Path, category: str, out: Path) -> list[str]:
    """train_attndreambooth.py as the toy study trains AttnDreamBooth (--images 1000, seed 0)."""
    return [
        sys.executable, str(ROOT / "train_attndreambooth.py"),
        "--pretrained_model_name_or_path", str(MODELS / "base"),
        "--instance_data_dir", str(photos), "--category", category,
        "--output_dir", str(out), *train_flags(seed=0),
        *method_flags("attndreambooth", 1000),
    ]  # fmt: skip


def run(jobs: list[list[str]], threads: int, together: bool, logs: Path) -> float:
    """Wall seconds of the jobs, one after another or all at once; output goes to logs/."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    logs.mkdir(parents=True, exist_ok=True)

    def start(i: int, argv: list[str]) -> subprocess.Popen:
        with open(logs / f"{i}.log", "w") as log:  # the child keeps its own copy open
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)

    t0 = time.perf_counter()
    if together:
        procs = [start(i, a) for i, a in enumerate(jobs)]
        codes = [p.wait() for p in procs]
    else:
        codes = [start(i, a).wait() for i, a in enumerate(jobs)]
    seconds = time.perf_counter() - t0
    if any(codes):
        tail = (logs / f"{next(i for i, c in enumerate(codes) if c)}.log").read_text()[-2000:]
        sys.exit(f"{tail}\nerror: a training job failed (exit statuses {codes}; log above)")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="jobs, and processes side by side")
    ap.add_argument("--cores", type=int, default=2, help="threads of the one-at-a-time way")
    ap.add_argument("--concept", default="checker_toy", choices=sorted(CONCEPTS))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        photos = write_concept(args.concept, tmp / "photos", size=64)
        category = CONCEPTS[args.concept]["category"]

        def jobs(way: str) -> list[list[str]]:
            return [job_argv(photos, category, tmp / way / str(i)) for i in range(args.jobs)]

        one_by_one = run(jobs("serial"), args.cores, False, tmp / "logs-serial")
        threads = max(1, args.cores // args.jobs)
        side_by_side = run(jobs("parallel"), threads, True, tmp / "logs-parallel")
    result = {
        "jobs": args.jobs,
        "cores": args.cores,
        "one_after_another_s": round(one_by_one, 1),
        "side_by_side_s": round(side_by_side, 1),
        "speedup_side_by_side": round(one_by_one / side_by_side, 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
