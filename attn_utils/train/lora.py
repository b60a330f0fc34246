"""LoRA adapters for the U-Net stages (--attn_lora_rank, --unet_lora_rank), built on peft.

A deviation from the paper, never the default. What the adapters wrap (docs/methods.md):

    stage 2  attn2        to_q, to_k, to_v, to_out.0 of every cross-attention layer: the
                          stage's own set (its to_out.0 bias, which LoRA has no factor for,
                          stays frozen)
    stage 3  attention    to_q, to_k, to_v, to_out.0 of every attention layer (attn1 and
                          attn2): the diffusers train_dreambooth_lora.py example's set
             all          every Linear and Conv2d of the U-Net: the closest to the paper's
                          full fine-tuning that LoRA gets

Adapters are peft's (diffusers' `add_adapter`), initialised as the example does (A Gaussian,
B zero: the adapted U-Net equals the frozen one at step 0) from the run's seed. The capture
processor calls attn.to_q / to_k / to_v / to_out, so the regulariser sees, and
differentiates through, the adapted projections. At the stage's end the adapters are written
in diffusers' LoRA format and merged into the weights (render/lora.py), so the next stage
trains on top of them: a stage-3 LoRA stacks on stage 2's LoRA, or on its full U-Net.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import re
from pathlib import Path

import torch

from attn_utils.config import STAGE_NAMES, STAGE_TITLES, ConfigError, RunConfig, StageConfig
from attn_utils.render.lora import merge_unet_lora

LORA_STAGES = (2, 3)
TARGETS = {2: ("attn2",), 3: ("attention", "all")}  # the first is the stage's default
ADAPTER = "attndreambooth"  # the training adapter's name inside the U-Net
FIELDS = ("rank", "alpha", "dropout", "targets")
# A LoRA stage's learning rate unless --<stage>_learning_rate says otherwise: the diffusers
# LoRA DreamBooth README's 1e-4 (the full-weight rates, 2e-5 / 2e-6, barely move adapters).
LORA_LEARNING_RATE = 1e-4
_PROJ = r"(to_q|to_k|to_v|to_out\.0)"
_PATTERN = {"attn2": rf".*\.attn2\.{_PROJ}", "attention": rf".*\.attn[12]\.{_PROJ}"}


def add_lora_flags(p: argparse.ArgumentParser) -> None:
    """--attn_lora_* and --unet_lora_*: adapters instead of the stage's full weights."""
    g = p.add_argument_group(
        "LoRA (stages 2-3; a deviation from the paper, off by default; docs/methods.md)",
        "adapters of rank R instead of the stage's full weights; stage_<k>/unet_lora/ is "
        "what diffusers' pipe.load_lora_weights reads",
    )
    for idx in LORA_STAGES:
        pre, what = STAGE_NAMES[idx], STAGE_TITLES[idx]
        g.add_argument(
            f"--{pre}_lora_rank",
            type=int,
            default=None,
            metavar="R",
            help=f"train rank-R LoRA adapters in the {what} stage",
        )
        g.add_argument(
            f"--{pre}_lora_alpha",
            type=float,
            default=None,
            help="scale alpha / R (default: R, scale 1, as the diffusers example)",
        )
        g.add_argument(f"--{pre}_lora_dropout", type=float, default=None,
                       help="dropout on the adapters' input (default 0)")  # fmt: skip
    g.add_argument(
        "--unet_lora_targets",
        choices=TARGETS[3],
        default=None,
        help="stage 3's adapted layers: the projections of every attention layer (the "
        "diffusers example's) or every Linear and Conv2d (default: attention)",
    )


def lora_fields(ns: argparse.Namespace, presets: dict[int, dict], method: str) -> dict:
    """{stage: StageConfig fields} from the LoRA flags; refused for a stage the method lacks
    and for settings without a rank."""
    out = {}
    for idx in LORA_STAGES:
        pre = STAGE_NAMES[idx]
        given = {k: getattr(ns, f"{pre}_lora_{k}", None) for k in FIELDS}
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            continue
        flag = f"--{pre}_lora_{'rank' if 'rank' in given else next(iter(given))}"
        if idx not in presets:
            raise ConfigError(f"{flag}: --method {method} has no stage {idx} "
                              f"({STAGE_TITLES[idx]}) to adapt")  # fmt: skip
        if "rank" not in given:
            raise ConfigError(f"{flag}: only means something with --{pre}_lora_rank")
        out[idx] = {f"lora_{k}": v for k, v in given.items()}
        out[idx].setdefault("lora_targets", TARGETS[idx][0])
        if getattr(ns, f"{pre}_learning_rate", None) is None:
            out[idx]["learning_rate"] = LORA_LEARNING_RATE
    return out


def validate_lora(cfg: RunConfig) -> None:
    """Checks of the LoRA settings: one ConfigError naming the flag."""
    for s in cfg.stages:
        pre = s.name
        if not s.lora_rank and s.lora_targets is None:
            continue
        if s.lora_rank < 1:
            raise ConfigError(f"--{pre}_lora_rank: must be >= 1, got {s.lora_rank}")
        if s.lora_alpha is not None and s.lora_alpha <= 0:
            raise ConfigError(f"--{pre}_lora_alpha: must be > 0")
        if not 0.0 <= s.lora_dropout < 1.0:
            raise ConfigError(f"--{pre}_lora_dropout: must be in [0, 1)")
        if s.lora_targets not in TARGETS.get(s.index, ()):
            raise ConfigError(f"--{pre}_lora_rank: stage {s.index} has no LoRA targets "
                              f"{s.lora_targets!r}")  # fmt: skip
        if importlib.util.find_spec("peft") is None:
            raise ConfigError(f"--{pre}_lora_rank: needs the package 'peft' (pip install peft)")
        if s.index == 3 and cfg.train_text_encoder:
            raise ConfigError(
                "--train_text_encoder: not with --unet_lora_rank (the text encoder would "
                "train in full beside U-Net adapters); drop one of them"
            )


def target_modules(unet, targets: str) -> list[str]:
    """Full module names of the U-Net layers the adapters wrap (module order)."""
    if targets == "all":
        kinds = (torch.nn.Linear, torch.nn.Conv2d)
        return [n for n, m in unet.named_modules() if n and isinstance(m, kinds)]
    pattern = re.compile(_PATTERN[targets])
    return [n for n, _ in unet.named_modules() if pattern.fullmatch(n)]


def add_unet_lora(unet, sc: StageConfig, seed: int) -> dict[str, torch.nn.Parameter]:
    """Wrap the stage's targets in fresh adapters (seeded); return them by name, trainable.
    Every other U-Net weight is frozen."""
    from peft import LoraConfig

    config = LoraConfig(
        r=sc.lora_rank,
        lora_alpha=sc.lora_alpha or sc.lora_rank,
        lora_dropout=sc.lora_dropout,
        init_lora_weights="gaussian",  # A ~ N(0, 1/r), B = 0: the example's
        target_modules=target_modules(unet, sc.lora_targets),
    )
    devices = [unet.device] if unet.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the same adapters on every process
        torch.manual_seed(seed + 1000 * sc.index)
        unet.add_adapter(config, adapter_name=ADAPTER)
    named = {}
    for n, p in unet.named_parameters():
        p.requires_grad_(".lora_" in n and f".{ADAPTER}." in n)
        if p.requires_grad:
            named[n] = p
    return named


def lora_scale(sc: StageConfig) -> float:
    return (sc.lora_alpha or sc.lora_rank) / sc.lora_rank


def adapter_state(unet, sc: StageConfig) -> dict[str, torch.Tensor]:
    """The adapters in diffusers' LoRA format at scale 1 ('unet.'-prefixed, on the CPU).

    Keys stay peft's (`<module>.lora_A.weight`), which every diffusers since 0.32 loads as
    they are; converting to the older lora.down / lora.up names would convert the attention
    projections only, and a file mixing both is misread.
    """
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    scale = lora_scale(sc)
    state = {
        k: (v * scale if scale != 1.0 and ".lora_B." in k else v).detach().float().cpu()
        for k, v in state.items()
    }
    packed = StableDiffusionLoraLoaderMixin.pack_weights(state, "unet")
    return {k: v.contiguous() for k, v in packed.items()}


def finish_lora(unet, sc: StageConfig) -> dict[str, torch.Tensor]:
    """End of a LoRA stage: take the adapters out, then merge what is written to disk (the
    same path a later launch takes); returns that state."""
    state = adapter_state(unet, sc)
    unet.unload_lora()  # the plain layers again, nothing merged
    merge_unet_lora(unet, state, f"stage {sc.index} adapters")
    return state


def save_unet_lora(folder: Path, state: dict[str, torch.Tensor]) -> None:
    """Write <folder>/pytorch_lora_weights.safetensors with diffusers' own LoRA writer."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    unet = {k.removeprefix("unet."): v for k, v in state.items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(
        save_directory=str(folder), unet_lora_layers=unet, safe_serialization=True
    )


def lora_info(sc: StageConfig, params: dict[str, torch.nn.Parameter]) -> dict:
    """What stage_info.json records of the adapters."""
    return dict(
        rank=sc.lora_rank,
        alpha=sc.lora_alpha or sc.lora_rank,
        dropout=sc.lora_dropout,
        targets=sc.lora_targets,
        trainable_params=sum(p.numel() for n, p in params.items() if ".lora_" in n),
    )


def dropout_rng(sc: StageConfig, seed: int, device: torch.device):
    """Adapter dropout draws from torch's global generator: seed it per micro-step (in a fork,
    so nothing else's stream moves) and a resumed stage draws the same masks."""
    if not sc.lora_rank or not sc.lora_dropout:
        return contextlib.nullcontext()
    stack = contextlib.ExitStack()
    stack.enter_context(torch.random.fork_rng(devices=[device] if device.type == "cuda" else []))
    torch.manual_seed(seed + 0x9E3779B9)  # a stream apart from the noise's (seeded `seed`)
    return stack
