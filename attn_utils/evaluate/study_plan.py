"""A study's plan: its concepts, variants and protocol, and where each step's files go.

Layout of --out:
    study.json                          the protocol; a rerun must match it
    concepts/<name>/run/                the training --output_dir (completed stages are reused)
    concepts/<name>/train.done.json     step records, written atomically when a step finishes
    concepts/<name>/<variant>/samples/  inference.py output (index.json)
    concepts/<name>/<variant>/render.done.json, metrics.json|csv|md, overview.png
    summary.json|csv|md, identity_vs_text.png, per_prompt.png, report.md
    study.failed.json                   written by a process that failed (see study_sync)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from attn_utils.config import STAGE_NAMES, ConfigError
from attn_utils.images import shown
from attn_utils.render.renderer import read_prompt_file
from attn_utils.train.methods import ABLATIONS, RECIPES, stage_presets

ROOT = Path(__file__).resolve().parents[2]  # train_attndreambooth.py and inference.py live here
METHODS = tuple(RECIPES)  # train_attndreambooth.py --method: methods and ablations
# The stage whose result a baseline's or an ablation's row renders (its last), and its label.
BASELINES = {
    "ti": (1, "Textual Inversion"),
    "dreambooth": (3, "DreamBooth (prior preservation)"),
    "ti_db": (3, "TI+DB"),
    "core": (3, "CoRe"),
    **{name: (max(stages), f"AttnDreamBooth {what}") for name, (stages, what) in ABLATIONS.items()},
}
RESUME = ["--resume_from_checkpoint", "latest"]
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


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
    (e.g. --attn_train_steps for ti) and --fast where it is not the paper's stage 3 are left
    out."""
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
        papers = method == "attndreambooth" or method in ABLATIONS
        if flag == "--fast" and ("unet" in absent or not papers):
            continue
        out.append(a)
    return out


def run_dir(plan: StudyPlan, c: ConceptSpec, method: str) -> Path:
    """The training --output_dir of one method (AttnDreamBooth's is plain 'run')."""
    return concept_dir(plan, c) / ("run" if method == "attndreambooth" else f"run-{method}")


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
