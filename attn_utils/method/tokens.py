"""Placeholder tokens: add them, initialise them, find them, and train only their rows."""

from __future__ import annotations

import torch
from torch import nn

from attn_utils.config import ConfigError


def fill_prompt(template: str, tokens: list[str], category: str | None = None) -> str:
    """Training convention: {} -> placeholder tokens; with a category, {} -> 'tokens category'."""
    concept = " ".join(tokens) + (f" {category}" if category else "")
    return template.replace("{}", concept)


def table_rows(table, ids) -> torch.Tensor:
    """(k, dim) rows of an embedding table, detached; SDXL's joint table gives both
    encoders' rows side by side (attn_utils/sdxl.py)."""
    return table.rows(ids) if hasattr(table, "rows") else table.weight.detach()[ids]


def write_table_rows(table, ids, rows: torch.Tensor) -> None:
    """Write (k, dim) rows into an embedding table (both of SDXL's, split by width)."""
    if hasattr(table, "write_rows"):
        table.write_rows(ids, rows)
        return
    with torch.no_grad():
        table.weight[ids] = rows.to(device=table.weight.device, dtype=table.weight.dtype)


def table_width(table) -> int:
    return getattr(table, "embedding_dim", None) or table.weight.shape[1]


def add_to_second_tokenizer(text_encoder, tokens: list[str], ids: list[int]) -> None:
    """SDXL: the same tokens join tokenizer_2 under the same ids (the pipeline tokenises with
    both); nothing for a single-encoder model."""
    tok2 = getattr(text_encoder, "tokenizer_2", None)
    if tok2 is None:
        return
    tok2.add_tokens([t for t in tokens if t not in tok2.get_added_vocab()])
    if tok2.convert_tokens_to_ids(tokens) != list(ids):
        raise ConfigError(
            f"--placeholder_token: {tokens[0]!r} gets different ids in the two SDXL tokenizers"
        )


def category_token_ids(tokenizer, category: str) -> list[int]:
    """Sub-token ids of the category word(s), without start/end tokens."""
    return tokenizer(category, add_special_tokens=False).input_ids


def add_placeholder_tokens(
    tokenizer, text_encoder, tokens: list[str], category: str, all_from_one: bool = False
) -> list[int]:
    """Add the placeholder tokens, resize the embedding table, initialise from the category.

    Token i is initialised from the category's i-th sub-token (docs/method.md: the first n of
    them); with `all_from_one` (Textual Inversion's --num_vectors) every token from the
    initialiser, which must then be one token.
    """
    init_ids = category_token_ids(tokenizer, category)
    if not init_ids:
        raise ConfigError(f"--category: {category!r} gives no tokens")
    if all_from_one:
        if len(init_ids) != 1:
            raise ConfigError(
                f"--num_vectors: every vector starts from the initialiser, and {category!r} is "
                f"{len(init_ids)} tokens; give a one-token --initialize_token"
            )
        init_ids = init_ids * len(tokens)
    if len(tokens) > len(init_ids):
        raise ConfigError(
            f"--n_object_embedding: {len(tokens)} placeholder tokens but --category {category!r} "
            f"has only {len(init_ids)} sub-token(s) to initialise them from"
        )
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash:
        raise ConfigError(
            f"--placeholder_token: {clash[0]!r} is already in the tokenizer; choose another name"
        )
    tok2 = getattr(text_encoder, "tokenizer_2", None)  # SDXL: initialised from its own ids
    if tok2 is not None and category_token_ids(tok2, category) != init_ids:
        raise ConfigError(f"--category: {category!r} tokenises differently in tokenizer_2")
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ConfigError(f"--placeholder_token: the tokenizer accepted {added} of {tokens}")
    ids = tokenizer.convert_tokens_to_ids(tokens)
    add_to_second_tokenizer(text_encoder, tokens, ids)
    # Every placeholder must survive tokenisation as one token of its own.
    for t, i in zip(tokens, ids):
        if tokenizer(t, add_special_tokens=False).input_ids != [i]:
            raise ConfigError(f"--placeholder_token: {t!r} does not tokenise as a single token")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    table = text_encoder.get_input_embeddings()
    write_table_rows(table, ids, table_rows(table, init_ids[: len(tokens)]).clone())
    return ids


def set_embeddings(text_encoder, token_ids: list[int], embeds: torch.Tensor) -> None:
    """Write learned rows (k, dim) into the text encoder's embedding table."""
    table = text_encoder.get_input_embeddings()
    if embeds.shape != (len(token_ids), table_width(table)):
        raise ConfigError(
            f"embedding: shape {tuple(embeds.shape)} does not fit the text encoder "
            f"({len(token_ids)} token(s) of dimension {table_width(table)})"
        )
    write_table_rows(table, token_ids, embeds)


class PlaceholderEmbedding(nn.Module):
    """A token-embedding table whose placeholder rows are a small trainable parameter.

    The frozen table is never written, so every other row stays bitwise unchanged and only
    (k, dim) numbers take part in the optimiser and in DDP's gradient all-reduce.
    """

    def __init__(self, base: nn.Embedding, token_ids: list[int]):
        super().__init__()
        self.base = base
        rows = table_rows(base, token_ids)  # (k, dim)
        # on the table's device: created after the text encoder moved, a CPU buffer breaks CUDA
        ids = torch.tensor(token_ids, device=rows.device)
        self.register_buffer("token_ids", ids, persistent=False)
        self.learned = nn.Parameter(rows.clone().float())

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight for dtype and size
        return self.base.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = self.base(input_ids)  # (B, T, D)
        match = input_ids.unsqueeze(-1) == self.token_ids  # (B, T, k)
        slot = match.to(torch.int64).argmax(-1)  # (B, T): which placeholder, 0 elsewhere
        new = self.learned.to(out.dtype)[slot]  # (B, T, D)
        return torch.where(match.any(-1, keepdim=True), new, out)


def install_placeholder_embedding(text_encoder, token_ids: list[int]) -> PlaceholderEmbedding:
    """Swap the text encoder's embedding table for a PlaceholderEmbedding around it."""
    module = PlaceholderEmbedding(text_encoder.get_input_embeddings(), token_ids)
    text_encoder.set_input_embeddings(module)
    return module


def remove_placeholder_embedding(text_encoder, module: PlaceholderEmbedding) -> torch.Tensor:
    """Put the plain table back, with the learned rows written into it; return the rows."""
    learned = module.learned.detach().clone()
    text_encoder.set_input_embeddings(module.base)
    set_embeddings(text_encoder, module.token_ids.tolist(), learned)
    return learned


def prompt_positions(
    tokenizer, prompt: str, placeholder_ids: list[int], category: str | None
) -> tuple[torch.Tensor, int, int]:
    """Tokenise the training prompt; return (input_ids (1, 77), s, c).

    s is the first placeholder position, c = s + k the first category sub-token: the
    regularisation target (docs/method.md; for a multi-token category only the first sub-token).
    """
    ids = tokenizer(
        prompt,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    full = tokenizer(prompt, add_special_tokens=True).input_ids
    if len(full) > tokenizer.model_max_length:
        raise ConfigError(
            f"--instance_prompt: {len(full)} tokens, more than the text encoder's "
            f"{tokenizer.model_max_length}; truncation would cut it"
        )
    row = ids[0].tolist()
    k = len(placeholder_ids)
    if placeholder_ids[0] not in row:
        raise ConfigError("--instance_prompt: the placeholder '{}' is lost in tokenisation")
    s = row.index(placeholder_ids[0])
    if row[s : s + k] != placeholder_ids:
        raise ConfigError("--instance_prompt: the placeholder tokens are not contiguous")
    c = s + k
    if category is None:  # [V] alone in the prompt: there is no target to regularise toward
        return ids, s, c
    cat = category_token_ids(tokenizer, category)
    if row[c : c + len(cat)] != cat:
        raise ConfigError(
            f"--instance_prompt: the category {category!r} must directly follow '{{}}' "
            "(its first sub-token is the regularisation target)"
        )
    return ids, s, c


def regularisation_columns(
    tokenizer, prompt: str, placeholder_ids: list[int], category: str | None, all_sub_tokens: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids (1, 77), columns (1, k + m)) of the training prompt.

    The columns are the k placeholder positions, then the category's first sub-token (m = 1,
    the original's target) or all m of its sub-tokens (--reg_category_target all); they are
    contiguous because prompt_positions checks that the category follows the placeholders.
    Without a category in the prompt (category None) m = 0: nothing to regularise toward.
    """
    ids, s, _ = prompt_positions(tokenizer, prompt, placeholder_ids, category)
    if category is None:
        m = 0
    else:
        m = len(category_token_ids(tokenizer, category)) if all_sub_tokens else 1
    cols = torch.arange(s, s + len(placeholder_ids) + m, device=ids.device).unsqueeze(0)
    return ids, cols
