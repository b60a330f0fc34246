"""A study: for every concept, train -> render -> evaluate, then one aggregate table.

The folder's layout and the plan are in study_plan.py. A step whose record exists is never
redone, so an interrupted study continues where it stopped. Under torchrun / accelerate
launch, the study's units of work, (concept, method) pairs in order, go round-robin to the
processes (unit i to process i % world_size: a method's training and its rows' rendering and
scoring stay in one process), and rank 0 writes the aggregate once every row's metrics exist;
a waiting process stops when another fails, or after a wait without progress.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from attn_utils.config import ConfigError
from attn_utils.evaluate.study_plan import (
    ConceptSpec,
    StudyPlan,
    concept_dir,
    metrics_path,
    render_argv,
    train_argv,
)
from attn_utils.evaluate.study_sync import (
    DEFAULT_WAIT_S,
    MARKER,
    FailureMarker,
    PeerFailed,
    wait_for,
)
from attn_utils.images import load_image, shown
from attn_utils.runfiles import image_grid, write_json_atomically

log = logging.getLogger(__name__)

# Variables by which a launcher tells a process its place; a child must not inherit them, or
# it would wait for peers that never come.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
_DIST_VARS += ("MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")
_DIST_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_")


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices of the units this process handles: i % world == rank."""
    return [i for i in range(n) if i % world == rank]


def dist_info(env: dict | None = None) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) as torchrun / accelerate launch set them; (0, 1, 0) alone."""
    env = os.environ if env is None else env
    rank, world = int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1))
    return rank, world, int(env.get("LOCAL_RANK", rank))


def child_env(env: dict, local_rank: int, world: int) -> dict:
    """A single-process environment for a child, pinned to this process's GPU when launched."""
    out = {k: v for k, v in env.items() if k not in _DIST_VARS and not k.startswith(_DIST_PREFIXES)}
    if world > 1:
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        out["CUDA_VISIBLE_DEVICES"] = visible[local_rank] if visible else str(local_rank)
    return out


def run_script(argv: list[str], env: dict) -> int:
    """Run one of our CLIs with this interpreter; its own progress bars show as they come."""
    return subprocess.run([sys.executable, *argv], env=env, check=False).returncode


def check_protocol(plan: StudyPlan) -> None:
    """Write study.json, or check that a rerun keeps its protocol."""
    path, new = plan.out / "study.json", plan.protocol()
    if path.is_file():
        old = json.loads(path.read_text()).get("protocol", {})
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise ConfigError(
                    f"--out: {shown(path)} was started with another {key!r} "
                    f"({old.get(key)!r}, now {new.get(key)!r}); use a new --out"
                )
    concepts = [asdict(c) for c in plan.concepts]
    write_json_atomically(path, {"format": 1, "protocol": new, "concepts": concepts})


def _protocol_written(plan: StudyPlan) -> bool:
    path = plan.out / "study.json"
    try:
        return json.loads(path.read_text()).get("protocol") == plan.protocol()
    except (OSError, ValueError):
        return False


def _step(record: Path, what: str, work: Callable[[], None]) -> None:
    """Run `work` unless `record` exists; then write the record (with its duration)."""
    if record.is_file():
        log.info("%s: done before, skipped", what)
        return
    t0 = time.perf_counter()
    work()
    write_json_atomically(record, {"step": what, "seconds": round(time.perf_counter() - t0, 3)})


def _overview(samples: Path, out: Path, thumb: int = 128) -> None:
    """The first image of each prompt, tiled (for report.md)."""
    index = json.loads((samples / "index.json").read_text())
    images = []
    for e in index["prompts"].values():
        im = load_image(samples / e["files"][0])
        im.thumbnail((thumb, thumb))
        images.append(im)
    tmp = out.with_name(f".tmp-{out.name}")
    image_grid(images).save(tmp, format="PNG")
    tmp.replace(out)


def units(plan: StudyPlan) -> list[tuple[ConceptSpec, str]]:
    """The study's units of work in order: (concept, method), each method of each concept
    (a method trains once, however many rows it renders)."""
    methods = list(dict.fromkeys(v.method for v in plan.variants))
    return [(c, m) for c in plan.concepts for m in methods]


class ConceptRunner:
    """The three steps of a unit (concept, method), each skipped when its record exists."""

    def __init__(self, plan: StudyPlan, models: Callable[[], object], runner=run_script, env=None):
        self.plan, self.models, self.runner = plan, models, runner
        self.env = dict(os.environ) if env is None else env
        self._real: dict[str, object] = {}  # concept name -> its photos' embeddings

    def _call(self, argv: list[str], what: str) -> None:
        rc = self.runner(argv, self.env)
        if rc != 0:
            raise ConfigError(
                f"{what} failed (exit status {rc}; its messages are above); "
                "fix the cause and rerun the same command to continue"
            )

    def run(self, c: ConceptSpec, m: str) -> None:
        """One unit: train method m on concept c, then render and score m's rows."""
        from attn_utils.evaluate.scoring import embed_real, score_samples, write_metrics

        plan, cdir = self.plan, concept_dir(self.plan, c)
        cdir.mkdir(parents=True, exist_ok=True)
        training = f"concept {c.name}: training" + ("" if m == "attndreambooth" else f" {m}")
        record = cdir / ("train.done.json" if m == "attndreambooth" else f"train-{m}.done.json")
        _step(record, training, lambda: self._call(train_argv(plan, c, m), training))
        for v in (v for v in plan.variants if v.method == m):
            vdir = cdir / v.name
            what = f"concept {c.name}: rendering {v.name}"
            _step(
                vdir / "render.done.json",
                what,
                lambda v=v, what=what: self._call(render_argv(plan, c, v), what),
            )
            if metrics_path(plan, c, v).is_file():
                log.info("concept %s: evaluation of %s done before, skipped", c.name, v.name)
                continue
            models = self.models()
            if c.name not in self._real:  # the real photos are embedded once
                self._real[c.name] = embed_real(models, c.dir)
            result = score_samples(
                models,
                vdir / "samples",
                self._real[c.name],
                c.category,
                plan.metric_settings.get("clip_t_text", "category"),
            )
            _overview(vdir / "samples", vdir / "overview.png")
            write_metrics(result, vdir)  # metrics.json last: the step's record


def pending(plan: StudyPlan) -> list[str]:
    """'<concept>/<variant>' whose metrics.json does not exist yet."""
    return [
        f"{c.name}/{v.name}"
        for c in plan.concepts
        for v in plan.variants
        if not metrics_path(plan, c, v).is_file()
    ]


def progress(plan: StudyPlan) -> int:
    """How many steps have finished: stages trained, runs and rows rendered, rows scored."""
    root = plan.out / "concepts"
    steps = ("*/run*/stage_*", "*/*.done.json", "*/*/render.done.json", "*/*/metrics.json")
    return sum(1 for pattern in steps for _ in root.glob(pattern))


def run_study(
    plan: StudyPlan,
    models: Callable[[], object],
    runner=run_script,
    env: dict | None = None,
    poll_s: float = 10.0,
    wait_timeout_s: float = DEFAULT_WAIT_S,
) -> Path | None:
    """Run this process's share of the units (concept, method); rank 0 then writes the aggregate.

    A process that fails writes study.failed.json; the waiting ones then stop too, and any
    wait ends after `wait_timeout_s` seconds without progress."""
    env = dict(os.environ) if env is None else env
    rank, world, local_rank = dist_info(env)
    marker = FailureMarker(plan.out / MARKER, rank, world, env.get("TORCHELASTIC_RESTART_COUNT"))
    try:
        if rank == 0:
            marker.clear()  # an earlier launch's
            check_protocol(plan)
        else:  # rank 0 checks and writes it first
            what = f"rank 0 to write {shown(plan.out / 'study.json')}"
            wait_for(what, lambda: _protocol_written(plan), marker, wait_timeout_s, 0.5)
        work = units(plan)
        mine = [work[i] for i in shard(len(work), rank, world)]
        worker = ConceptRunner(plan, models, runner, child_env(env, local_rank, world))
        for c, m in tqdm(mine, desc=f"study (process {rank + 1}/{world})", unit="method"):
            worker.run(c, m)
        if rank != 0:
            return None
        if left := pending(plan):  # the other processes' rows
            log.info("waiting for %d evaluation(s) of other processes: %s", len(left), left[:3])
            what = "the other processes' evaluations: " + ", ".join(left[:3])
            steps = lambda: progress(plan)
            wait_for(what, lambda: not pending(plan), marker, wait_timeout_s, poll_s, steps)
    except BaseException as e:
        if world > 1 and not isinstance(e, PeerFailed):  # the first failure's message stays
            marker.write(e)
        raise
    from attn_utils.evaluate.summary import write_summary

    return write_summary(plan)
