"""AttnDreamBooth: embedding -> cross-attention -> U-Net fine-tuning, in one process.

    accelerate launch train_attndreambooth.py --pretrained_model_name_or_path MODEL \
        --instance_data_dir dataset/grey_sloth --category sloth --output_dir runs/grey_sloth
"""

from __future__ import annotations

import errno
import json
import logging
import os
import sys

from attn_utils.config import ConfigError, parse_args

EXIT_DISK_FULL = 4  # 2: bad input, 3: non-finite loss, 128 + n: stopped by signal n


def main(argv: list[str] | None = None) -> int:
    try:
        cfg, ns = parse_args(argv)
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
    from attn_utils.runtime import TrainingStopped
    from attn_utils.trainer import Trainer

    third_party_warnings_once()  # after the imports: the libraries install their handlers then

    # accelerate recognises a multi-process CPU (gloo) launch only when told it is on the CPU.
    multi_cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    acc = Accelerator(
        cpu=multi_cpu,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_dir=cfg.output_dir,
    )
    try:
        trainer = Trainer(cfg, acc)
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
    acc.print(f"done: {cfg.output_dir}")
    return 0


def _flat(d: dict) -> dict:
    """Trackers take scalars only."""
    return {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in d.items()}


if __name__ == "__main__":
    sys.exit(main())
