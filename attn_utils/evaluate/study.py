"""A study: for every concept, train -> render -> evaluate, then one aggregate table.

Layout of --out:
    study.json                          the protocol; a rerun must match it
    concepts/<name>/run/                the training --output_dir (completed stages are reused)
    concepts/<name>/train.done.json     step records, written atomically when a step finishes
    concepts/<name>/<variant>/samples/  inference.py output (index.json)
    concepts/<name>/<variant>/render.done.json, metrics.json|csv|md, overview.png
    summary.json|csv|md, identity_vs_text.png, per_prompt.png, report.md
    study.failed.json                   written by a process that failed (see study_sync)
A step whose record exists is never redone, so an interrupted study continues where it
stopped. Under torchrun / accelerate launch, concept i goes to process i % world_size and
rank 0 writes the aggregate once every concept's metrics exist; a waiting process stops when
another fails, or after a wait without progress.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .config import ConfigError
from .data import load_image, shown
from .render import read_prompt_file
from .runfiles import image_grid, write_json_atomically
from .study_sync import DEFAULT_WAIT_S, MARKER, FailureMarker, PeerFailed, wait_for

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]  # train_attndreambooth.py and inference.py live here
METHODS = ("attndreambooth", "ti", "dreambooth", "ti_db")  # train_attndreambooth.py --method
# The stage whose result a baseline's row renders, and its label.
BASELINES = {
    "ti": (1, "Textual Inversion"),
    "dreambooth": (3, "DreamBooth (prior preservation)"),
    "ti_db": (3, "TI+DB"),
}
RESUME = ["--resume_from_checkpoint", "latest"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
# Variables by which a launcher tells a process its place; a child must not inherit them, or
# it would wait for peers that never come.
_DIST_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")
_DIST_VARS += ("MASTER_ADDR", "MASTER_PORT", "GROUP_WORLD_SIZE", "ROLE_WORLD_SIZE")
_DIST_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_")


@dataclass
class ConceptSpec:
    """One concept: its photo folder, its category word and a folder-safe name."""

    name: str
    dir: str
    category: str


@dataclass
class Variant:
    """One row of the table: a method, or one stage of AttnDreamBooth."""

    name: str  # folder name
    label: str
    method: str = "attndreambooth"
    stage: int | None = None  # inference.py --stage


@dataclass
class StudyPlan:
    """Everything a study needs; `protocol()` is what a rerun must keep."""

    concepts: list[ConceptSpec]
    prompt_file: str
    out: Path
    model: str
    variants: list[Variant]
    train_args: list[str] = field(default_factory=list)
    infer_args: list[str] = field(default_factory=list)
    method_args: dict[str, list[str]] = field(default_factory=dict)  # extra flags per method
    num_images_per_prompt: int = 4
    seed: int = 0
    metric_settings: dict = field(default_factory=dict)

    def protocol(self) -> dict:
        """The settings every concept of the study shares (the concepts may grow)."""
        return {
            "prompts": read_prompt_file(self.prompt_file),
            "model": self.model,
            "variants": [asdict(v) for v in self.variants],
            "train_args": self.train_args,
            "infer_args": self.infer_args,
            **({"method_args": self.method_args} if self.method_args else {}),
            "num_images_per_prompt": self.num_images_per_prompt,
            "seed": self.seed,
            "metrics": self.metric_settings,
        }


def read_concepts(path: str | Path) -> list[ConceptSpec]:
    """[{"dir": ..., "category": ..., "name"?: ...}]; relative dirs are relative to the file."""
    p = Path(path)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConfigError(f"--concepts: cannot read {shown(p)} as JSON ({e})") from None
    if not isinstance(data, list) or not data:
        raise ConfigError(f"--concepts: {shown(p)} must hold a non-empty JSON list of concepts")
    out: list[ConceptSpec] = []
    for i, c in enumerate(data):
        if not isinstance(c, dict) or not isinstance(c.get("dir"), str) or not c.get("category"):
            raise ConfigError(
                f"--concepts: {shown(p)} entry {i} needs a 'dir' and a 'category' (got {c!r})"
            )
        folder = (p.parent / Path(c["dir"]).expanduser()).resolve()
        if not folder.is_dir():
            raise ConfigError(f"--concepts: {shown(p)} entry {i}: {shown(folder)} is not a folder")
        name = str(c.get("name") or folder.name)
        if not _NAME.fullmatch(name):
            raise ConfigError(f"--concepts: entry {i}: name {name!r} must match {_NAME.pattern}")
        out.append(ConceptSpec(name, str(folder), str(c["category"])))
    names = [c.name for c in out]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise ConfigError(f"--concepts: two concepts are named {dup!r}; give them 'name's")
    return out


def make_variants(methods: list[str], stages: list[int]) -> list[Variant]:
    """AttnDreamBooth's stage rows (stage 1 alone is TI-like), then one row per other method."""
    out = []
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"--methods: unknown method {m!r} (available: {', '.join(METHODS)})")
        if m == "attndreambooth":
            for k in stages:
                what = {1: "stage 1 only (TI-like)", 2: "stages 1-2", 3: "full (stage 3)"}[k]
                out.append(Variant(f"stage_{k}", f"AttnDreamBooth {what}", m, k))
        else:
            stage, label = BASELINES[m]
            out.append(Variant(m, label, m, stage))
    return out


def method_train_args(args: list[str], method: str) -> list[str]:
    """The shared --train_args a method accepts: per-stage flags of the stages it lacks
    (e.g. --attn_train_steps for ti) and --fast without a stage 3 are left out."""
    from .config import STAGE_NAMES
    from .methods import stage_presets

    absent = [p for i, p in STAGE_NAMES.items() if i not in stage_presets(method, False)]
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        flag = a.split("=", 1)[0]
        if any(flag.startswith(f"--{p}_") for p in absent):
            skip = "=" not in a  # its value is the next word
            continue
        if flag == "--fast" and "unet" in absent:
            continue
        out.append(a)
    return out


def run_dir(plan: StudyPlan, c: ConceptSpec, method: str) -> Path:
    """The training --output_dir of one method (AttnDreamBooth's is plain 'run')."""
    return concept_dir(plan, c) / ("run" if method == "attndreambooth" else f"run-{method}")


def shard(n: int, rank: int, world: int) -> list[int]:
    """Indices of the concepts this process handles: i % world == rank."""
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


def train_argv(plan: StudyPlan, c: ConceptSpec, method: str = "attndreambooth") -> list[str]:
    """train_attndreambooth.py's argv; relaunching it reuses the run's completed stages."""
    # A stage interrupted after a checkpoint continues from it ('latest' of this run only).
    resume = [] if "--resume_from_checkpoint" in plan.train_args else RESUME
    extra = method_train_args(plan.train_args, method) + plan.method_args.get(method, [])
    chosen = [] if method == "attndreambooth" else ["--method", method]
    return [
        str(ROOT / "train_attndreambooth.py"),
        "--pretrained_model_name_or_path",
        plan.model,
        "--instance_data_dir",
        c.dir,
        "--category",
        c.category,
        "--output_dir",
        str(run_dir(plan, c, method)),
        *chosen,
        *resume,
        *extra,
    ]


def render_argv(plan: StudyPlan, c: ConceptSpec, v: Variant) -> list[str]:
    """inference.py's argv: N images per prompt, image i of every prompt from seed + i."""
    return [
        str(ROOT / "inference.py"),
        "--run_dir",
        str(run_dir(plan, c, v.method)),
        "--stage",
        str(v.stage),
        "--prompt_file",
        plan.prompt_file,
        "--save_dir",
        str(concept_dir(plan, c) / v.name / "samples"),
        "--num_images_per_prompt",
        str(plan.num_images_per_prompt),
        "--seed",
        str(plan.seed),
        *plan.infer_args,
    ]


def concept_dir(plan: StudyPlan, c: ConceptSpec) -> Path:
    return plan.out / "concepts" / c.name


def metrics_path(plan: StudyPlan, c: ConceptSpec, v: Variant) -> Path:
    return concept_dir(plan, c) / v.name / "metrics.json"


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


class ConceptRunner:
    """The three steps of one concept, each skipped when its record exists."""

    def __init__(self, plan: StudyPlan, models: Callable[[], object], runner=run_script, env=None):
        self.plan, self.models, self.runner = plan, models, runner
        self.env = dict(os.environ) if env is None else env

    def _call(self, argv: list[str], what: str) -> None:
        rc = self.runner(argv, self.env)
        if rc != 0:
            raise ConfigError(
                f"{what} failed (exit status {rc}; its messages are above); "
                "fix the cause and rerun the same command to continue"
            )

    def run(self, c: ConceptSpec) -> None:
        from .scoring import embed_real, score_samples, write_metrics

        plan, cdir = self.plan, concept_dir(self.plan, c)
        cdir.mkdir(parents=True, exist_ok=True)
        for m in dict.fromkeys(v.method for v in plan.variants):  # each method trains once
            what = f"concept {c.name}: training" + ("" if m == "attndreambooth" else f" {m}")
            record = cdir / ("train.done.json" if m == "attndreambooth" else f"train-{m}.done.json")
            _step(record, what, lambda m=m, what=what: self._call(train_argv(plan, c, m), what))
        real = None
        for v in plan.variants:
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
            real = real or embed_real(models, c.dir)  # the real photos are embedded once
            result = score_samples(
                models,
                vdir / "samples",
                real,
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
    """Run this process's share of the concepts; rank 0 then writes the aggregate.

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
        mine = [plan.concepts[i] for i in shard(len(plan.concepts), rank, world)]
        worker = ConceptRunner(plan, models, runner, child_env(env, local_rank, world))
        for c in tqdm(mine, desc=f"study (process {rank + 1}/{world})", unit="concept"):
            worker.run(c)
        if rank != 0:
            return None
        if left := pending(plan):  # the other processes' concepts
            log.info("waiting for %d evaluation(s) of other processes: %s", len(left), left[:3])
            what = "the other processes' evaluations: " + ", ".join(left[:3])
            steps = lambda: progress(plan)
            wait_for(what, lambda: not pending(plan), marker, wait_timeout_s, poll_s, steps)
    except BaseException as e:
        if world > 1 and not isinstance(e, PeerFailed):  # the first failure's message stays
            marker.write(e)
        raise
    from .summary import write_summary

    return write_summary(plan)
