"""AttnDreamBooth: embedding -> cross-attention -> U-Net fine-tuning, in one process.

    accelerate launch train_attndreambooth.py --pretrained_model_name_or_path MODEL \
        --instance_data_dir dataset/grey_sloth --category sloth --output_dir runs/grey_sloth
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from attn_utils import runfiles as rf
from attn_utils.argparsing import Parser
from attn_utils.config import ConfigError, RunConfig
from attn_utils.model_defaults import render_argv
from attn_utils.run_flags import add_run_flags, add_stage_flags
from attn_utils.runfiles import writable_dir
from attn_utils.train.family_defaults import refuse_a_guessed_family
from attn_utils.train.lora import add_lora_flags
from attn_utils.train.methods import add_method_flags, config_from_args
from attn_utils.train.speed_flags import add_speed_flags

EXIT_DISK_FULL = 4  # 2: bad input, 3: non-finite loss, 128 + n: stopped by signal n


def build_parser() -> Parser:
    """Every flag, one group per concern, each group declared by the layer that reads it."""
    p = Parser(description="AttnDreamBooth: embedding -> cross-attention -> U-Net, in one process.")
    add_run_flags(p)  # base model, data, prompts, output (attn_utils/run_flags.py)
    add_method_flags(p)  # --method and prior preservation (attn_utils/train/methods.py)
    add_speed_flags(p)  # precision, memory, kernels (attn_utils/train/speed_flags.py)
    add_stage_flags(p)  # --ti_* / --attn_* / --unet_* (attn_utils/run_flags.py)
    add_lora_flags(p)  # --attn_lora_* / --unet_lora_* (attn_utils/train/lora.py)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[RunConfig, object]:
    """(resolved config, parsed flags); a bad flag raises ConfigError or exits 2."""
    ns = build_parser().parse_args(argv)
    return config_from_args(ns), ns


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, ns = parse_args(argv)
        if not ns.dry_run:
            writable_dir(cfg.output_dir, "--output_dir")  # before any model loads
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ns.dry_run:
        print(json.dumps(cfg.plan(), indent=2))
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)

    import torch
    from accelerate import Accelerator

    from attn_utils.quiet import third_party_warnings_once
    from attn_utils.train.runtime import TrainingStopped, process_group_kwargs
    from attn_utils.train.trainer import Trainer

    third_party_warnings_once()  # after the imports: the libraries install their handlers then

    # accelerate recognises a multi-process CPU (gloo) launch only when told it is on the CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    acc = Accelerator(
        cpu=multi_cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
        kwargs_handlers=[process_group_kwargs(ns.ddp_timeout)],  # every collective's wait
    )
    try:
        trainer = Trainer(cfg, acc)  # unreadable model files stop it, after the data's check
        refuse_a_guessed_family(cfg)  # files readable only since the plan: its defaults guessed
        if cfg.report_to != "none":
            acc.init_trackers("attndreambooth", config=_flat(cfg.to_dict()))
        trainer.run()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except TrainingStopped as e:
        print(f"stopped: {e}", file=sys.stderr)
        return e.code
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        # Saves are atomic: the half-written folder is gone and the previous checkpoint stays.
        print(
            f"error: {e.filename or cfg.output_dir}: {e.strerror}; the previous checkpoint is "
            "intact: free space, then rerun with --resume_from_checkpoint latest",
            file=sys.stderr,
        )
        return EXIT_DISK_FULL
    acc.print(finished(cfg))
    return 0


def finished(cfg: RunConfig) -> str:
    """What the run made and how to use it: the token, the weights, an inference command."""
    run = Path(cfg.output_dir)
    tokens = " ".join(cfg.placeholder_tokens)
    made = [rf.stage_dir(run, k) for k in (1, 2, 3) if rf.stage_info(run, k) is not None]
    lora = lambda d: d / rf.UNET_LORA_DIR if (d / rf.UNET_LORA_DIR).is_dir() else d / "unet"
    weights = [d / rf.EMBEDS_FILE if d.name == "stage_1" else lora(d) for d in made]
    prompt = "a {} in the snow"
    concept = tokens if cfg.token_alone else f"{tokens} {cfg.category}"
    # the interpreter that trained has the packages; a bare `python` may be another one
    command = [
        sys.executable, _here("inference.py"), "--run_dir", str(run), "--prompt", prompt,
        "--save_dir", str(run / "samples"),
    ]  # fmt: skip
    # the sampler the base model folder says it was measured with (the toy world's), shown in
    # the command; inference.py takes the same when the flags are left out
    command += render_argv(cfg.pretrained_model_name_or_path)
    what = (
        f"identifier: {tokens} (an existing word, not learned: the U-Net learned the concept; "
        if cfg.identifier is not None  # dreambooth: no token is added or trained
        else f"learned token: {tokens} ("
    )
    return "\n".join([
        f"done: {run}",
        f"  {what}write {{}} in a prompt: {prompt!r} renders as {prompt.format(concept)!r})",
        "  weights: " + ", ".join(str(w) for w in weights),
        "  render: " + shlex.join(command),
    ])  # fmt: skip


def _here(name: str) -> str:
    """A file beside this script, as the shortest path that works from the current folder."""
    path = Path(__file__).resolve().with_name(name)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:  # not under the current folder
        return str(path)


def _flat(d: dict) -> dict:
    """Trackers take scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
