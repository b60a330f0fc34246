"""The run's own flag groups: base model, data, prompts, output, optimiser, per-stage values.

Each default is declared here; the --method recipes fill the stage values left unset
(train/methods.py), and train_attndreambooth.py assembles the parser.
"""

from __future__ import annotations

import argparse

from attn_utils.config import PAPER_STAGES, STAGE_KEYS, STAGE_NAMES, STAGE_TITLES, ConfigError


def add_stage_flags(p: argparse.ArgumentParser) -> None:
    """--<stage>_<setting> for each stage; unset ones take the --method recipe's values."""
    per_stage = [
        # (our suffix, authors' suffix, type, help)
        ("learning_rate", None, float, "learning rate"),
        ("train_steps", None, int, "optimiser steps"),
        ("batch_size", "bs", int, "batch size per process"),
        ("gradient_accumulation_steps", "ga", int, "gradient accumulation steps"),
        ("reg_mean_weight", "attn_mean", float, "weight of the attention-mean regulariser"),
        ("reg_var_weight", "attn_var", float, "weight of the attention-variance regulariser"),
        ("validation_steps", None, int, "validate every N steps (0: never)"),
        ("checkpointing_steps", "save_step", int, "resumable checkpoint every N steps"),
    ]
    for idx, prefix in STAGE_NAMES.items():
        paper = {**PAPER_STAGES[idx], "gradient_accumulation_steps": 1, "checkpointing_steps": 0}
        g = p.add_argument_group(
            f"stage {idx} ({STAGE_TITLES[idx]})",
            "defaults are the --method recipe's; the paper's (attndreambooth) are shown, "
            "--dry_run prints the resolved plan",
        )
        for suffix, alias, typ, help_ in per_stage:
            names = [f"--{prefix}_{suffix}"] + ([f"--{prefix}_{alias}"] if alias else [])
            g.add_argument(*names, dest=f"{prefix}_{suffix}", type=typ, default=None,
                           help=f"{help_} (paper: {paper[suffix]})")  # fmt: skip


def add_run_flags(p: argparse.ArgumentParser) -> None:
    """The flags of the run itself: base model, data, prompts, output, optimiser, resume."""
    g = p.add_argument_group("base model and data")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="a Hub id or a local diffusers folder")  # fmt: skip
    g.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    g.add_argument("--local_files_only", action="store_true", help="never contact the Hub")
    g.add_argument("--instance_data_dir", required=True, help="the 3-20 photos of the concept")
    g.add_argument("--category", default=None, help="super-category word, e.g. 'sloth'")
    g.add_argument(
        "--initialize_token",
        "--initializer_token",
        nargs="+",
        default=None,
        help="word(s) whose embedding initialises [V] (default: --category; alone, it is the "
        "category too, as before)",
    )
    g.add_argument("--resolution", type=int, default=None,
                   help="default: the model's native size, its U-Net's sample_size x the VAE's "
                   "factor (512: SD 1.5 / 2.1-base, 768: SD 2.1, 1024: SDXL)")  # fmt: skip
    g.add_argument("--center_crop", action="store_true", help="the same as --crop center")
    g.add_argument(
        "--crop",
        choices=["random", "center", "resize"],
        default=None,
        help="after resizing the shorter side: a random or centred square; or "
        "'resize', the whole image squashed to a square (default: the method's: "
        "random; resize for ti, as the textual_inversion example)",
    )
    g.add_argument("--repeats", type=int, default=100, help="each photo's copies per epoch")
    g.add_argument("--skip_bad_images", action="store_true")
    g.add_argument(
        "--flip_p",
        type=float,
        default=None,
        help="horizontal-flip probability (default: the method's; the paper's 0.25)",
    )
    g.add_argument(
        "--rotate_p",
        type=float,
        default=None,
        help="rotation probability (default: the method's; the paper's 0.75, 0 for "
        "the diffusers examples' ti and dreambooth); class images are never rotated",
    )
    g.add_argument(
        "--rotate_degrees",
        type=float,
        default=None,
        help="rotations are uniform in [-d, d] (default: the method's; the paper's 45)",
    )
    g = p.add_argument_group("the concept's token and prompts")
    g.add_argument(
        "--placeholder_token", "--object_token", dest="placeholder_token", default="new_concept",
        help="learned tokens are <this>_v0 .. _v<n-1>",
    )  # fmt: skip
    g.add_argument("--n_object_embedding", type=int, default=1)
    g.add_argument(
        "--instance_prompt",
        default=None,
        help="training prompt; {} becomes the placeholder tokens "
        "(default: 'a photo of a {} <category>')",
    )
    g.add_argument(
        "--reg_category_target",
        choices=["first", "all"],
        default="first",
        help="regularisation target of a multi-token category: its first sub-token (the "
        "original's) or the mean map of all its sub-tokens",
    )
    g.add_argument("--validation_prompt", default=None, help="same convention as --instance_prompt")
    g.add_argument("--num_validation_images", type=int, default=4)
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument(
        "--validate_before_training",
        action="store_true",
        help="also validate at step 0 of every stage (the authors always do)",
    )
    g = p.add_argument_group("stages and optimiser")
    g.add_argument("--stages", default=None, help="subset to run, e.g. '2,3' (default: all)")
    g.add_argument("--fast", action="store_true", help="the paper's fast stage 3 (1e-5, 200, 4)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument(
        "--max_grad_norm",
        type=float,
        default=None,
        help="clip the gradient norm; 0: never (default: the method's: none for the paper, "
        "whose original clip was a no-op; 1.0 for dreambooth, as its example)",
    )
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument(
        "--offset_noise", dest="noise_offset", action="store_const", const=0.1, help="the "
        "authors' switch: --noise_offset 0.1"
    )  # fmt: skip
    g = p.add_argument_group("output, checkpoints and logging")
    g.add_argument("--output_dir", required=True, help="the run folder")
    g.add_argument("--report_to", choices=["none", "tensorboard", "wandb"], default="none")
    g.add_argument(
        "--checkpointing_steps",
        type=int,
        default=None,
        help="default for every stage's --<stage>_checkpointing_steps",
    )
    g.add_argument("--checkpoints_total_limit", type=int, default=2)
    g.add_argument(
        "--resume_from_checkpoint",
        default=None,
        metavar="latest|none|DIR",
        help="an interrupted stage continues from this run's newest checkpoint by default "
        "('latest'); 'none' starts it over (its checkpoints are removed); or a checkpoint folder",
    )
    g.add_argument("--dry_run", action="store_true", help="print the plan as JSON and exit")
    g = p.add_argument_group("several processes (docs/reliability.md)")
    g.add_argument(
        "--ddp_timeout",
        type=_seconds,
        default=7200,
        metavar="SECONDS",
        help="how long a process waits for the others at a collective (class-image generation, "
        "checkpoints, validation) before it stops; longer than torch's 600 s (NCCL), which 200 "
        "SDXL class images exceed",
    )


def _seconds(text: str) -> float:
    """A positive number of seconds (argparse type)."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def refuse_absent_stage_flags(ns: argparse.Namespace, method: str, stages: set[int]) -> None:
    """One ConfigError naming every given flag of a stage `method` lacks (not one at a time)."""
    absent = [(i, f"--{p}_{k}") for i, p in STAGE_NAMES.items() if i not in stages
              for k in STAGE_KEYS if getattr(ns, f"{p}_{k}", None) is not None]  # fmt: skip
    if absent:
        raise ConfigError(
            f"{', '.join(f for _, f in absent)}: --method {method} has no stage "
            f"{' or '.join(sorted({str(i) for i, _ in absent}))} (its stages' flags: "
            f"{', '.join(f'--{STAGE_NAMES[i]}_*' for i in sorted(stages))})"
        )
