"""SDXL's two text encoders as one module, and its micro-conditioning (docs/sdxl.md).

SDXL conditions its U-Net on the penultimate hidden states of two CLIP text encoders (ViT-L,
768 wide, and OpenCLIP bigG, 1280 wide, with a projection) side by side, (B, 77, 2048), plus
the pooled, projected output of the second (B, 1280) and six "time ids" per image: original
size, crop top-left and target size. `SDXLTextEncoders` makes the pair look like the one text
encoder the rest of the library drives: ids in, (hidden, pooled) out, one embedding table
whose rows are both encoders' rows side by side, so a learned [V] is a single (k, 2048)
parameter (one row in each table, trained together, split again on save).

The two SDXL tokenizers share CLIP's vocabulary and merges and differ only in the pad token
(tokenizer: "<|endoftext|>", tokenizer_2: "!"). The library therefore tokenises with the first
and derives the second's ids by re-padding after the end token; `check_tokenizers` refuses a
pair whose vocabularies differ, and the tests compare the derived ids with tokenizer_2's own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from attn_utils.config import ConfigError

EMBED_KEYS = ("clip_l", "clip_g")  # the embedding file's keys, as diffusers' SDXL examples
TOKENS_META = "tokens"  # the file's safetensors metadata: the tokens (JSON), in row order


class ConcatEmbedding(nn.Module):
    """Both encoders' token tables seen as one: a lookup gives (B, T, w1 + w2)."""

    def __init__(self, first: nn.Embedding, second: nn.Embedding) -> None:
        super().__init__()
        self.parts = nn.ModuleList([first, second])
        self.widths = (first.weight.shape[1], second.weight.shape[1])
        self.embedding_dim = sum(self.widths)

    @property
    def weight(self) -> torch.Tensor:
        """A copy of both tables side by side (writes go through write_rows)."""
        return torch.cat([p.weight for p in self.parts], dim=1)

    def rows(self, ids) -> torch.Tensor:
        """(k, w1 + w2) rows of the token ids, detached."""
        return torch.cat([p.weight.detach()[ids] for p in self.parts], dim=1)

    def write_rows(self, ids, rows: torch.Tensor) -> None:
        """Write (k, w1 + w2) rows: the first w1 columns into table 1, the rest into table 2."""
        w1 = self.widths[0]
        with torch.no_grad():
            for part, chunk in zip(self.parts, (rows[:, :w1], rows[:, w1:])):
                part.weight[ids] = chunk.to(part.weight.device, part.weight.dtype)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.cat([p(input_ids) for p in self.parts], dim=-1)


class _Slice(nn.Module):
    """Columns a:b of a joint embedding module, installed as one encoder's token table."""

    def __init__(self, joint: nn.Module, a: int, b: int, table: nn.Embedding) -> None:
        super().__init__()
        self.joint, self.a, self.b = joint, a, b
        self.table = table  # the encoder's own table: .weight for transformers' dtype reads

    @property
    def weight(self) -> torch.Tensor:
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.joint(input_ids)[..., self.a : self.b]


class SDXLTextEncoders(nn.Module):
    """CLIPTextModel + CLIPTextModelWithProjection driven as one: forward(ids) -> (hidden
    (B, 77, w1 + w2) from both penultimate layers, pooled (B, P) from the second)."""

    is_sdxl = True

    def __init__(self, text_encoder, text_encoder_2, tokenizer_2) -> None:
        super().__init__()
        self.text_encoder, self.text_encoder_2 = text_encoder, text_encoder_2
        self.tokenizer_2 = tokenizer_2  # the pipeline's second tokenizer (not a module)
        self._joint: nn.Module | None = None  # an installed PlaceholderEmbedding, or None

    @property
    def widths(self) -> tuple[int, int]:
        return (self.text_encoder.config.hidden_size, self.text_encoder_2.config.hidden_size)

    @property
    def config(self):  # what pipelines and dtype checks read: the first encoder's
        return self.text_encoder.config

    @property
    def dtype(self) -> torch.dtype:
        return self.text_encoder.dtype

    def _tables(self) -> tuple[nn.Embedding, nn.Embedding]:
        out = []
        for te in (self.text_encoder, self.text_encoder_2):
            t = te.get_input_embeddings()
            out.append(t.table if isinstance(t, _Slice) else t)
        return out[0], out[1]

    def get_input_embeddings(self) -> nn.Module:
        return self._joint if self._joint is not None else ConcatEmbedding(*self._tables())

    def set_input_embeddings(self, module: nn.Module) -> None:
        """A ConcatEmbedding puts the plain tables back; anything else (a PlaceholderEmbedding
        around one) is installed in both encoders, each reading its own columns."""
        t1, t2 = self._tables()
        if isinstance(module, ConcatEmbedding):
            self.text_encoder.set_input_embeddings(module.parts[0])
            self.text_encoder_2.set_input_embeddings(module.parts[1])
            self._joint = None
            return
        w1, w2 = self.widths
        self.text_encoder.set_input_embeddings(_Slice(module, 0, w1, t1))
        self.text_encoder_2.set_input_embeddings(_Slice(module, w1, w1 + w2, t2))
        self._joint = module

    def resize_token_embeddings(self, n: int, mean_resizing: bool = False) -> None:
        for te in (self.text_encoder, self.text_encoder_2):
            te.resize_token_embeddings(n, mean_resizing=mean_resizing)

    def second_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        """tokenizer_2's ids of the same prompts: every position after the end token
        becomes tokenizer_2's pad token (the only difference between the two)."""
        eos = self.tokenizer_2.eos_token_id  # the configs may hold CLIP's legacy 2
        is_eos = input_ids == eos  # (B, T)
        after = is_eos.to(torch.int64).cumsum(-1) - is_eos.to(torch.int64) > 0
        return input_ids.masked_fill(after, self.tokenizer_2.pad_token_id)

    def forward(self, input_ids: torch.Tensor):
        o1 = self.text_encoder(input_ids, output_hidden_states=True)
        o2 = self.text_encoder_2(self.second_ids(input_ids), output_hidden_states=True)
        hidden = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)  # (B, T, 2048)
        return hidden, o2.text_embeds  # (B, P): the second encoder's projected pooled output


def is_sdxl(text_encoder) -> bool:
    return bool(getattr(text_encoder, "is_sdxl", False))


def check_tokenizers(tokenizer, tokenizer_2, where: str) -> None:
    """The library derives tokenizer_2's ids from tokenizer's: refuse a pair that differs in
    more than the pad token."""
    if tokenizer.get_vocab() != tokenizer_2.get_vocab():
        raise ConfigError(
            f"{where}/tokenizer_2: its vocabulary differs from tokenizer/'s; SDXL's two "
            "tokenizers share CLIP's vocabulary (only the pad token differs)"
        )


def added_cond(pooled: torch.Tensor, time_ids_: torch.Tensor, batch: int) -> dict:
    """The U-Net's added_cond_kwargs for a batch: pooled (1 or B, P) broadcast to B, time ids
    (B, 6) kept in fp32 (bf16 holds integers exactly only up to 256: 1100 px would read 1104;
    the U-Net's sinusoidal embedding of them computes in fp32 anyway)."""
    return {
        "text_embeds": pooled.expand(batch, -1),
        "time_ids": time_ids_.to(pooled.device, torch.float32),
    }


def split_rows(rows: torch.Tensor, widths: tuple[int, int]) -> dict[str, torch.Tensor]:
    """(k, w1 + w2) joint rows -> {"clip_l": (k, w1), "clip_g": (k, w2)}."""
    w1 = widths[0]
    return {EMBED_KEYS[0]: rows[:, :w1], EMBED_KEYS[1]: rows[:, w1:]}


def sdxl_file_rows(
    path: Path, data: dict, widths: tuple[int, int] | None, one_encoder: bool
) -> dict[str, torch.Tensor]:
    """{token: (w1 + w2,)} of an SDXL file, the tokens from its metadata; the widths are
    checked when given."""
    from safetensors import safe_open

    if one_encoder:
        raise ConfigError(
            f"{path}: an SDXL embedding file (clip_l, clip_g); this base model has one text "
            "encoder (an embedding made for another base model?)"
        )
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - a legacy .bin has no metadata
        meta = {}
    try:
        tokens = json.loads(meta[TOKENS_META])
    except (KeyError, ValueError):
        raise ConfigError(f"{path}: an SDXL embedding file without its tokens' names") from None
    l_, g = data[EMBED_KEYS[0]], data[EMBED_KEYS[1]]
    l_, g = (l_[None] if l_.ndim == 1 else l_), (g[None] if g.ndim == 1 else g)
    want = tuple(widths) if widths is not None else (l_.shape[1], g.shape[1])
    if (l_.shape[1], g.shape[1]) != want or not l_.shape[0] == g.shape[0] == len(tokens):
        raise ConfigError(
            f"{path}: clip_l {tuple(l_.shape)} and clip_g {tuple(g.shape)} do not fit this "
            f"base model's text encoders ({len(tokens)} token(s) of widths {want[0]} and "
            f"{want[1]})"
        )
    return {t: torch.cat([l_[i], g[i]]) for i, t in enumerate(tokens)}
