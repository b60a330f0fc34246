"""CoRe (Wu et al., AAAI 2025, arXiv 2408.15914) in the stage loop: its regularisation
prompts, its stage-1 micro-step and its norm hold. The math is attn_utils/method/core.py.

Each micro-step draws one regularisation prompt (seeded by the sample, so a resumed stage
draws the same), fills it with [V] and with the category, encodes both and hands them to
core_losses with the training batch. After each optimiser step in the hold window, [V]'s
vectors are rescaled to their norm at the window's start; that norm is kept in checkpoints.
"""

from __future__ import annotations

import argparse
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attn_utils.config import ConfigError, RunConfig, StageConfig
from attn_utils.method.core import ContextMeans, NormHold, context_positions_from_ids
from attn_utils.method.tokens import category_token_ids, fill_prompt
from attn_utils.runfiles import read_prompt_lines

PROMPTS_DIR = Path(__file__).resolve().parents[2] / "dataset" / "prompts"
DEFAULT_PROMPTS = PROMPTS_DIR / "core_universal.txt"  # ours; core_animate / core_inanimate too


def add_core_flags(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--core_prompts",
        default=None,
        metavar="FILE",
        help="core: regularisation prompts, one per line with {} (default: "
        "dataset/prompts/core_universal.txt; core_animate.txt, core_inanimate.txt)",
    )
    g.add_argument(
        "--core_embedding_weight",
        type=float,
        default=None,
        help="core: weight of the context embedding loss (default 1.5e-4)",
    )
    g.add_argument(
        "--core_attention_weight",
        type=float,
        default=None,
        help="core: weight of the context attention loss (default 0.05)",
    )
    g.add_argument("--core_norm_hold", type=int, nargs=2, default=None,
                   metavar=("START", "END"), help="core: [V]'s norm at step START is held "
                   "after every step up to END (default 120 180; 0 0: no hold)")  # fmt: skip


def core_overrides(ns: argparse.Namespace, idx: int, preset: dict) -> dict:
    """The CoRe weights given on the command line, for the stage whose preset has them."""
    out = {}
    for flag, key in (("core_embedding_weight", "context_embedding_weight"),
                      ("core_attention_weight", "context_attention_weight")):  # fmt: skip
        value = getattr(ns, flag)
        if value is not None and key in preset:
            out[key] = value
    if ns.core_norm_hold is not None and "norm_hold_end" in preset:
        start, end = ns.core_norm_hold
        if not (0 <= start <= end) or (end and not start):
            raise ConfigError(
                f"--core_norm_hold: START <= END, both >= 1 (or 0 0), got {start} {end}"
            )
        out.update(norm_hold_start=start, norm_hold_end=end)
    return out


def check_core_flags(ns: argparse.Namespace, recipe_has_core: bool) -> None:
    for flag in ("core_prompts", "core_embedding_weight", "core_attention_weight",
                 "core_norm_hold"):  # fmt: skip
        if getattr(ns, flag) is not None and not recipe_has_core:
            raise ConfigError(f"--{flag}: only --method core uses it, not {ns.method}")


def read_core_prompts(path: str | Path) -> list[str]:
    """The regularisation prompts of a file: one ConfigError naming --core_prompts if it is
    missing, unreadable, empty, or has a line without exactly one {}."""
    once = lambda s: None if s.count("{}") == 1 else "needs {} exactly once"  # noqa: E731
    return read_prompt_lines(path, "--core_prompts", once)


def is_core_stage(sc: StageConfig) -> bool:
    return bool(sc.context_embedding_weight or sc.context_attention_weight)


@dataclass
class CorePrompt:
    """One regularisation prompt, tokenised both ways, with its aligned context positions."""

    ids_v: torch.Tensor  # (1, 77) with [V]
    ids_c: torch.Tensor  # (1, 77) with the category
    pos_v: torch.Tensor  # (P,)
    pos_c: torch.Tensor  # (P,)


@dataclass
class CoreState:
    """A CoRe stage's prompts, its attention recorder and its norm hold."""

    prompts: list[CorePrompt]
    means: ContextMeans = field(default_factory=ContextMeans)
    hold: NormHold | None = None

    def pick(self, seed: int, stage: int, micro: int, rank: int) -> CorePrompt:
        digest = hashlib.sha256(f"{seed}/{stage}/core/{micro}/{rank}".encode()).digest()
        return self.prompts[int.from_bytes(digest[:8], "little") % len(self.prompts)]


def core_state(cfg: RunConfig, sc: StageConfig, tokenizer, token_ids: list[int], device):
    """The CoreState of a CoRe stage (None for any other), its prompts tokenised once."""
    if not is_core_stage(sc):
        return None

    def tok(text: str) -> torch.Tensor:
        return tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length,
                         truncation=True, return_tensors="pt").input_ids  # fmt: skip

    cat_ids = category_token_ids(tokenizer, cfg.category)
    out = []
    for prompt in read_core_prompts(cfg.core_prompts):
        ids_v = tok(fill_prompt(prompt, cfg.placeholder_tokens))
        ids_c = tok(prompt.replace("{}", cfg.category))
        try:
            pos_v, pos_c = context_positions_from_ids(
                ids_v[0], ids_c[0], token_ids, cat_ids, eot_id=tokenizer.eos_token_id
            )
        except ValueError as e:
            raise ConfigError(f"--core_prompts: {prompt!r}: {e}") from None
        out.append(CorePrompt(ids_v.to(device), ids_c.to(device), pos_v.to(device),
                              pos_c.to(device)))  # fmt: skip
    hold = None
    if sc.norm_hold_end:
        hold = NormHold(sc.norm_hold_start, sc.norm_hold_end)
    return CoreState(out, hold=hold)
