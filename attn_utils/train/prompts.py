"""The training prompts of a run: what '{}' becomes, and each micro-batch's prompt ids."""

from __future__ import annotations

import hashlib

import torch

from attn_utils.config import ConfigError, RunConfig


def concept_token_ids(cfg: RunConfig, tokenizer, text_encoder) -> list[int]:
    """Ids of what '{}' becomes: new placeholder rows, or (dreambooth) the rare word's
    existing sub-tokens, for which nothing is added to the tokenizer or the table."""
    from attn_utils.method.tokens import add_placeholder_tokens, category_token_ids

    if cfg.identifier is not None:
        ids = category_token_ids(tokenizer, cfg.identifier)
        if not ids:
            raise ConfigError(f"--identifier: {cfg.identifier!r} gives no tokens")
        return ids
    init = cfg.initializer_token or cfg.category
    return add_placeholder_tokens(
        tokenizer, text_encoder, cfg.placeholder_tokens, init, cfg.num_vectors is not None
    )


def training_prompts(cfg: RunConfig, tokenizer, token_ids: list[int], templates: bool = False):
    """(input_ids (P, 77), regularisation columns (P, K)) of the P training prompts of a stage:
    the instance prompt (P = 1) or, in a stage with `templates`, the Textual Inversion ones."""
    from attn_utils.method.tokens import fill_prompt, regularisation_columns

    rows = [
        regularisation_columns(
            tokenizer,
            fill_prompt(t, cfg.placeholder_tokens),
            token_ids,
            None if cfg.token_alone else cfg.category,
            cfg.reg_category_target == "all",
        )
        for t in (cfg.prompt_templates if templates else None) or [cfg.instance_prompt]
    ]
    return torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])


def _pick(seed: int, stage: int, g: int, n: int) -> int:
    digest = hashlib.sha256(f"{seed}/{stage}/template/{g}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % n


def prompt_ids(trainer, k: int, micro: int, stats) -> torch.Tensor:
    """The input ids of one micro-batch: the one prompt, or a template per sample drawn from
    the global sample number (so a resumed stage draws the same), with its columns."""
    ids = trainer.input_ids
    if ids.shape[0] == 1:
        return ids
    acc, b = trainer.acc, trainer.cfg.stage(k).batch_size
    first = (micro * acc.num_processes + acc.process_index) * b  # as data.StepBatches
    pick = [_pick(trainer.cfg.seed, k, g, ids.shape[0]) for g in range(first, first + b)]
    stats.columns = trainer.columns[pick]  # (B, K)
    return ids[pick]  # (B, 77)
