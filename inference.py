r"""Render prompts with a learned AttnDreamBooth concept.

    python inference.py --run_dir runs/grey_sloth --prompt_file dataset/prompts/objects.txt \
        --save_dir out/grey_sloth

'{}' in a prompt becomes "<placeholder tokens> <category>". Images go to
<save_dir>/<prompt slug>/<i>.png with prompt.txt beside them, grids to <save_dir>/grids/,
and <save_dir>/index.json (written last) maps each prompt to its files, seeds and settings.
"""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

from attn_utils.argparsing import Parser
from attn_utils.config import ConfigError, first_line, load_run_config
from attn_utils.model_defaults import MODEL_DEFAULTS, render_defaults
from attn_utils.render.pipeline import DTYPES, pick_device
from attn_utils.runfiles import writable_dir

# --infer_scheduler: our short names, and the authors' diffusers class names
SCHEDULERS = {"dpm": "dpm", "dpmsolver": "dpm", "dpmsolvermultistepscheduler": "dpm"}
SCHEDULERS |= {"ddim": "ddim", "ddimscheduler": "ddim", "euler": "euler"}
SCHEDULERS |= {"eulerdiscretescheduler": "euler", "ddpm": "ddpm", "ddpmscheduler": "ddpm"}
SCHEDULERS |= {"pndm": "pndm", "pndmscheduler": "pndm"}

log = logging.getLogger("inference")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    src = p.add_argument_group("the concept (a run folder, or the authors' flags)")
    src.add_argument(
        "--run_dir", metavar="DIR", help="training --output_dir: base model, tokens, category"
    )
    src.add_argument(
        "--stage",
        type=int,
        choices=[1, 2, 3],
        help="U-Net of this stage of --run_dir (default: the last completed; 1: base U-Net)",
    )
    src.add_argument(
        "--pretrained_model_name_or_path", metavar="MODEL", help="base model (overrides the run's)"
    )
    src.add_argument("--revision", default=None)
    src.add_argument("--local_files_only", action="store_true", help="never contact the Hub")
    src.add_argument(
        "--learned_embedding_path",
        metavar="FILE",
        help="{token: tensor} .safetensors, or a legacy .bin (read without unpickling code); "
        "its keys are the placeholder tokens",
    )
    src.add_argument(
        "--checkpoint_path",
        metavar="DIR",
        help="a folder holding unet/ (and text_encoder/), or unet_lora/ (a LoRA on the base U-Net)",
    )
    src.add_argument(
        "--category_token",
        "--category",
        dest="category",
        metavar="WORD",
        help="super-category, e.g. 'sloth' (default: the run's, or the exported pipeline's)",
    )
    pr = p.add_argument_group("prompts and output")
    pr.add_argument(
        "--prompt", action="append", metavar="TEXT", help="'{}' marks the concept; repeatable"
    )
    pr.add_argument(
        "--prompt_file", metavar="FILE", help="one prompt a line; blank and # lines skipped"
    )
    pr.add_argument("--save_dir", metavar="DIR", help="output folder")
    pr.add_argument(
        "--save_attention_maps",
        action="store_true",
        help="per image: cross-attention heatmaps of the placeholder and of the category, "
        "over layers and steps, on one scale from 0 with a colour bar (<slug>/attention/)",
    )
    pr.add_argument(
        "--export_pipeline",
        metavar="DIR",
        help="write a diffusers pipeline whose tokenizer holds the placeholder (fp32); "
        "without prompts, only export",
    )
    sm = p.add_argument_group("sampling")
    sm.add_argument("--num_images_per_prompt", type=int, default=16, metavar="N", help="default 16")
    sm.add_argument("--infer_batch_size", type=int, default=8, metavar="N", help="default 8")
    sm.add_argument(
        "--seed",
        type=int,
        default=None,
        help="image i of every prompt starts from the noise of seed + i, whatever the batch "
        "size, so results compare across prompts, checkpoints and runs (default: random, logged)",
    )
    # Unset, these three come from the base model folder's attndreambooth_defaults.json (the
    # toy world's: the settings it was measured with), else the paper's.
    sm.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        metavar="N",
        help=f"default: the base model folder's {MODEL_DEFAULTS}, else 50",
    )
    sm.add_argument(
        "--infer_scheduler",
        default=None,
        help="dpm (DPMSolverMultistepScheduler), ddim, euler, ddpm, pndm; the diffusers class "
        f"names work too (default: the base model folder's {MODEL_DEFAULTS}, else dpm)",
    )
    sm.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help=f"<= 1: no guidance (default: the base model folder's {MODEL_DEFAULTS}, else 7.5)",
    )
    sm.add_argument("--negative_prompt", default=None, metavar="TEXT")
    sm.add_argument(
        "--resolution",
        type=int,
        default=None,
        metavar="PX",
        help="default: the U-Net's native size",
    )
    sm.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    sm.add_argument(
        "--dtype", default="auto", help="auto (fp16 on CUDA, else fp32), fp32, fp16, bf16"
    )
    return p


def check_run_dir(run_dir: str) -> None:
    """--run_dir is a training output folder (run_config.json readable), or a ConfigError."""
    path = Path(run_dir)
    if not path.is_dir():
        what = "does not exist" if not path.exists() else "is not a folder"
        raise ConfigError(f"--run_dir: {path} {what}")
    if not (path / "run_config.json").is_file():
        raise ConfigError(f"--run_dir: {path} is not a training output folder (no run_config.json)")
    try:
        load_run_config(path)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever is wrong, the folder is unusable
        raise ConfigError(
            f"--run_dir: {path / 'run_config.json'} is unreadable ({first_line(e, 200)})"
        ) from None


def base_model_of(ns: argparse.Namespace) -> str | None:
    """The base model the flags name: --pretrained_model_name_or_path, else the run's."""
    if ns.pretrained_model_name_or_path or ns.run_dir is None:
        return ns.pretrained_model_name_or_path
    return load_run_config(Path(ns.run_dir)).pretrained_model_name_or_path


def fill_render_defaults(ns: argparse.Namespace) -> None:
    """Unset sampler flags from the base model folder's MODEL_DEFAULTS, else the paper's."""
    defaults = render_defaults(base_model_of(ns))
    for flag, key in (("infer_scheduler", "scheduler"), ("num_inference_steps", None),
                      ("guidance_scale", None)):  # fmt: skip
        if getattr(ns, flag) is None:
            setattr(ns, flag, defaults[key or flag])


def check_args(ns: argparse.Namespace) -> None:
    """Every check that needs no model, --run_dir's first: one ConfigError naming the flag."""
    if ns.run_dir is not None:  # a mistyped folder is the likeliest mistake: said first
        check_run_dir(ns.run_dir)
    fill_render_defaults(ns)
    for flag in ("num_images_per_prompt", "infer_batch_size", "num_inference_steps"):
        if getattr(ns, flag) < 1:
            raise ConfigError(f"--{flag}: must be >= 1")
    if ns.guidance_scale < 0:
        raise ConfigError("--guidance_scale: must be >= 0")
    if ns.resolution is not None and (ns.resolution < 8 or ns.resolution % 8):
        raise ConfigError("--resolution: must be a positive multiple of 8")
    if ns.infer_scheduler.lower() not in SCHEDULERS:
        raise ConfigError(
            f"--infer_scheduler: one of dpm, ddim, euler, ddpm, pndm, got {ns.infer_scheduler!r}"
        )
    if SCHEDULERS[ns.infer_scheduler.lower()] == "pndm" and ns.num_inference_steps < 4:
        raise ConfigError("--num_inference_steps: the PNDM scheduler needs at least 4")
    if ns.dtype.lower() not in DTYPES:
        raise ConfigError(f"--dtype: one of auto, fp32, fp16, bf16, got {ns.dtype!r}")
    if not (ns.prompt or ns.prompt_file or ns.export_pipeline):
        raise ConfigError("--prompt / --prompt_file: nothing to render (or give --export_pipeline)")
    if (ns.prompt or ns.prompt_file) and not ns.save_dir:
        raise ConfigError("--save_dir: needed to render prompts")
    if ns.save_dir:
        writable_dir(ns.save_dir, "--save_dir")  # before any model loads


def run(ns: argparse.Namespace) -> int:
    check_args(ns)
    import torch

    from attn_utils.method.vae import vae_weight_dtype
    from attn_utils.models import library_versions
    from attn_utils.render.export import (
        build_pipeline,
        check_export_dir,
        export_pipeline,
        load_concept,
        resolve_source,
    )
    from attn_utils.render.renderer import Renderer, RenderOptions, make_jobs, read_prompt_file

    templates = list(ns.prompt or []) + (read_prompt_file(ns.prompt_file) if ns.prompt_file else [])
    src = resolve_source(
        run_dir=ns.run_dir,
        stage=ns.stage,
        model=ns.pretrained_model_name_or_path,
        revision=ns.revision,
        embedding_path=ns.learned_embedding_path,
        checkpoint_path=ns.checkpoint_path,
        category=ns.category,
        local_files_only=ns.local_files_only,
    )
    if ns.export_pipeline:
        check_export_dir(ns.export_pipeline)
    device, dtype = pick_device(ns.device, ns.dtype)
    scheduler = SCHEDULERS[ns.infer_scheduler.lower()]
    jobs = make_jobs(templates, src.tokens, src.prompt_category)
    concept = load_concept(src)
    log.info("U-Net: %s", src.unet_path or f"base model {src.model}")
    for folder in src.unet_loras:
        log.info("LoRA merged into it: %s", folder)
    log.info("text encoder: %s", src.text_encoder_path or f"base model {src.model}")
    if ns.export_pipeline:  # before any cast: the export keeps the fp32 weights
        out = export_pipeline(concept, ns.export_pipeline, scheduler)
        print(f"exported pipeline: {out}", file=sys.stderr)
    if not jobs:
        return 0
    pipe = build_pipeline(concept, scheduler).to(device)
    for part in pipe.components.values():  # the VAE stays fp32 where fp16 overflows it
        if isinstance(part, torch.nn.Module):
            part.to(dtype=vae_weight_dtype(part, dtype) if part is pipe.vae else dtype)
    seed = ns.seed
    if seed is None:
        seed = secrets.randbelow(2**31)
        log.info("no --seed given: using random seed %d (recorded in index.json)", seed)
    size = ns.resolution or concept.unet.config.sample_size * pipe.vae_scale_factor
    opts = RenderOptions(
        num_images_per_prompt=ns.num_images_per_prompt,
        infer_batch_size=ns.infer_batch_size,
        seed=seed,
        num_inference_steps=ns.num_inference_steps,
        guidance_scale=ns.guidance_scale,
        negative_prompt=ns.negative_prompt,
        height=size,
        width=size,
        save_attention_maps=ns.save_attention_maps,
    )
    settings = {
        **src.to_dict(),
        "scheduler": scheduler,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "seed_policy": "image i of every prompt starts from torch.randn on the CPU seeded seed + i",
        "versions": library_versions(),
    }
    Renderer(pipe, opts, concept.token_ids, src.prompt_category).render(jobs, ns.save_dir, settings)
    print(f"done: {len(jobs)} prompt(s) x {opts.num_images_per_prompt} in {ns.save_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub", "diffusers", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        return run(ns)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
