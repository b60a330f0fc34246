"""The training prompts of a run: what '{}' becomes, and each micro-batch's prompt ids."""

from __future__ import annotations

import hashlib
import logging

import torch

from attn_utils.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


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


def run_prompt_texts(cfg: RunConfig) -> list[str]:
    """Every prompt the run encodes: the instance prompt, the templates of a stage that uses
    them, a CoRe stage's context prompts, the validation prompt and the class prompt."""
    from attn_utils.train.core import is_core_stage, read_core_prompts

    texts = [cfg.instance_prompt]
    if any(s.templates for s in cfg.stages):
        texts += cfg.prompt_templates or []
    if cfg.core_prompts and any(is_core_stage(s) for s in cfg.stages):
        texts += read_core_prompts(cfg.core_prompts)
    if cfg.validation_prompt:
        texts.append(cfg.validation_prompt)
    if cfg.with_prior_preservation and cfg.class_prompt:
        texts.append(cfg.class_prompt)
    return texts


def warn_unknown_words(cfg: RunConfig, tokenizer) -> list[str]:
    """Log once the words of the run's prompts that a small closed tokenizer (the toy
    world's) does not know and would spell in letters; return them."""
    from attn_utils.method.vocabulary import unknown_words

    words = unknown_words(tokenizer, run_prompt_texts(cfg))
    if words:
        log.warning(
            "the tokenizer's %d-entry vocabulary does not know %d word(s) of this run's "
            "prompts, which it splits into letters: %s",
            len(tokenizer),
            len(words),
            ", ".join(words),
        )
    return words
