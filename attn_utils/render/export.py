"""The learned concept as a pipeline: find its files, load it, export it.

A concept is a base model, placeholder token(s) with their learned embedding rows, a category
word, (after stage 2 or 3) a fine-tuned U-Net and (dreambooth --train_text_encoder) a
fine-tuned text encoder. It comes from a training run folder, from the
authors' flags (base model + embedding file + checkpoint folder), or from a pipeline exported
here, whose tokenizer already holds the placeholder.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from attn_utils.config import ConfigError, load_run_config
from attn_utils.method.tokens import (
    add_to_second_tokenizer,
    fill_prompt,
    table_width,
    write_table_rows,
)
from attn_utils.models import check_model_source, load_base_model
from attn_utils.render.lora import load_unet_lora, lora_folder
from attn_utils.render.pipeline import make_pipeline
from attn_utils.runfiles import (
    EMBEDS_FILE,
    UNET_LORA_DIR,
    load_embeddings,
    load_text_encoder,
    stage_dir,
    stage_info,
    trained_text_encoder,
    write_dir_atomically,
)

log = logging.getLogger(__name__)

CONCEPT_FILE = "attndreambooth_concept.json"  # written beside model_index.json on export


@dataclass
class ConceptSource:
    """Where each part of the concept comes from; resolved from flags, nothing loaded yet."""

    model: str  # base model: Hub id or diffusers folder
    revision: str | None
    embedding_path: str | None  # None: tokens already in the model's tokenizer, or no concept
    unet_path: str | None  # a diffusers U-Net folder; None: the base model's own
    stage: int | None  # the run stage the U-Net comes from (1: the base U-Net)
    tokens: list[str]  # placeholder tokens, in order; [] when no concept is known
    category: str | None
    local_files_only: bool = False
    run_dir: str | None = None
    text_encoder_path: str | None = None  # a trained text encoder's folder; None: the base's
    token_alone: bool = False  # '{}' becomes [V] without the category (ti --token_alone)
    # LoRA folders (unet_lora/) merged into that U-Net in this order: the LoRA stages after it
    unet_loras: list[str] = field(default_factory=list)
    identifier: str | None = None  # dreambooth: the rare word that `category` begins with

    @property
    def prompt_category(self) -> str | None:
        """What follows [V] where a prompt says '{}'."""
        return None if self.token_alone and self.tokens else self.category

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Concept:
    """The loaded modules, placeholder rows already written into the text encoder."""

    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    scheduler_config: dict
    token_ids: list[int]
    source: ConceptSource


def _natural_order(tokens: list[str]) -> list[str]:
    """new_concept_v0 .. _v10 in numeric order; any other names as the file lists them."""
    m = [re.fullmatch(r"(.*)_v(\d+)", t) for t in tokens]
    if all(m):
        return [t for _, t in sorted(zip([(x.group(1), int(x.group(2))) for x in m], tokens))]
    return tokens


def _unet_folder(path: Path, flag: str) -> str:
    """A folder holding unet/ (or a U-Net folder itself); one clear error otherwise."""
    for cand in (path / "unet", path):
        if (cand / "config.json").is_file() and any(cand.glob("diffusion_pytorch_model*")):
            return str(cand)
    raise ConfigError(
        f"{flag}: {path} holds no diffusers U-Net (expected {path / 'unet'}/ or "
        f"{path / UNET_LORA_DIR}/)"
    )


def _run_stage(run: Path, stage: int | None, checkpoint_path: str | None):
    """(stage, U-Net folder, LoRA folders) of a run folder: --stage, else the last completed
    stage. A LoRA stage stacks on the stages before it, down to a full U-Net or the base."""
    done = [k for k in (1, 2, 3) if stage_info(run, k) is not None]
    if stage is None and checkpoint_path is None:
        stage = max([k for k in done if k >= 2], default=1)  # 1: the base U-Net
    if stage is None or stage == 1:
        return stage, None, []
    if stage not in done:
        have = ", ".join(map(str, done)) or "none"
        raise ConfigError(
            f"--stage {stage}: {stage_dir(run, stage)} is not complete (completed stages: {have})"
        )
    loras: list[str] = []
    for k in [k for k in done if 2 <= k <= stage][::-1]:
        lora = lora_folder(stage_dir(run, k))
        if lora is None:
            return stage, _unet_folder(stage_dir(run, k), f"--stage {stage}"), loras
        loras.insert(0, str(lora))
    return stage, None, loras


def _run_embedding(run: Path, stage: int) -> Path:
    """The embedding a run's stage renders with: the newest completed stage up to it that
    wrote one (stage 1's, or a U-Net stage's that trained it too: ti_db)."""
    for k in range(stage, 0, -1):
        if stage_info(run, k) is not None and (stage_dir(run, k) / EMBEDS_FILE).is_file():
            return stage_dir(run, k) / EMBEDS_FILE
    raise ConfigError(f"--run_dir: {stage_dir(run, 1)} is missing (stage 1 not done)")


def resolve_source(
    run_dir: str | None = None,
    stage: int | None = None,
    model: str | None = None,
    revision: str | None = None,
    embedding_path: str | None = None,
    checkpoint_path: str | None = None,
    category: str | None = None,
    local_files_only: bool = False,
) -> ConceptSource:
    """Decide the base model, embedding file, U-Net and tokens from the flags; check files.

    Explicit flags override what the run folder (or an exported pipeline) says.
    """
    if stage is not None and run_dir is None:
        raise ConfigError("--stage: needs --run_dir (or give --checkpoint_path)")
    if stage is not None and checkpoint_path is not None:
        raise ConfigError("--stage and --checkpoint_path: give one of them")
    tokens: list[str] = []
    unet_path, token_alone, loras, identifier = None, False, [], None
    if run_dir is not None:
        run = Path(run_dir)
        if not run.is_dir():
            raise ConfigError(f"--run_dir: {run} is not a folder")
        cfg = load_run_config(run)
        model = model or cfg.pretrained_model_name_or_path
        revision = revision or cfg.revision
        category = category or cfg.category
        local_files_only = local_files_only or cfg.local_files_only
        tokens, token_alone = cfg.placeholder_tokens, cfg.token_alone
        if cfg.identifier is not None:  # dreambooth: a rare word of the vocabulary, no file
            category, tokens = " ".join([*tokens, category or ""]).strip(), []
            identifier = cfg.identifier
        stage, unet_path, loras = _run_stage(run, stage, checkpoint_path)
        if cfg.identifier is None and embedding_path is None:
            embedding_path = str(_run_embedding(run, stage or 3))
    elif model is None:
        raise ConfigError("--run_dir or --pretrained_model_name_or_path: give one of them")
    check_model_source(model)
    if checkpoint_path is not None:  # a unet/ folder, or a unet_lora/ one on the base U-Net
        lora = lora_folder(checkpoint_path)
        loras = [str(lora)] if lora is not None else []
        if lora is None:
            unet_path = _unet_folder(Path(checkpoint_path), "--checkpoint_path")
    # text_encoder/ beside unet/ (stage_3/ of a --train_text_encoder run)
    text_encoder_path = trained_text_encoder(Path(unet_path).parent) if unet_path else None
    if embedding_path is not None:
        emb = load_embeddings(embedding_path)  # validates the file before any model loads
        if run_dir is None:
            tokens = _natural_order(list(emb))  # n_object_embedding is read back from the file
        missing = [t for t in tokens if t not in emb]
        if missing:
            raise ConfigError(f"{embedding_path}: has no entry for {missing[0]!r}")
    meta = Path(model) / CONCEPT_FILE
    if run_dir is None and meta.is_file():  # an exported pipeline: its tokenizer holds the token
        data = json.loads(meta.read_text())
        tokens = tokens or list(data.get("placeholder_tokens", []))
        category = category or data.get("category")
    elif run_dir is None and embedding_path is None:
        log.warning("no --learned_embedding_path: '{}' becomes the category alone (a baseline)")
    if tokens and not category:
        log.warning("no --category_token: '{}' becomes the placeholder token(s) alone")
    return ConceptSource(
        model=str(model),
        revision=revision,
        embedding_path=None if embedding_path is None else str(embedding_path),
        unet_path=unet_path,
        stage=stage,
        tokens=tokens,
        category=category,
        local_files_only=local_files_only,
        run_dir=None if run_dir is None else str(run_dir),
        text_encoder_path=text_encoder_path,
        token_alone=token_alone,
        unet_loras=loras,
        identifier=identifier,
    )


def ensure_tokens(tokenizer, text_encoder, tokens: list[str]) -> tuple[list[int], list[str]]:
    """Ids of the placeholder tokens, adding those not yet in the tokenizer; (ids, added).

    A token already added (an exported pipeline) is reused as it is, unlike in training.
    """
    present = tokenizer.get_added_vocab()
    added = [t for t in tokens if t not in present]
    for t in added:
        if tokenizer.add_tokens([t]) != 1:
            raise ConfigError(f"placeholder token {t!r}: the tokenizer refused to add it")
    if added:
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    add_to_second_tokenizer(text_encoder, tokens, ids)  # SDXL: tokenizer_2 holds them too
    for t, i in zip(tokens, ids):
        if tokenizer(t, add_special_tokens=False).input_ids != [i]:
            raise ConfigError(f"placeholder token {t!r}: does not tokenise as a single token")
    return ids, added


def load_concept(src: ConceptSource) -> Concept:
    """Load the base model and U-Net, add the placeholder tokens and write their rows."""
    m = load_base_model(src.model, src.revision, src.local_files_only, unet_path=src.unet_path)
    widths = getattr(m.text_encoder, "widths", None)  # SDXL: the file holds clip_l and clip_g
    table = m.text_encoder.get_input_embeddings()
    emb = {}
    if src.embedding_path:  # a file for the other family is refused here, naming it
        emb = load_embeddings(src.embedding_path, table_width(table), widths)
    for folder in src.unet_loras:  # merged: a plain U-Net renders and exports as before
        load_unet_lora(m.unet, folder)
    if src.text_encoder_path:  # before the tokens: a dreambooth run adds none
        load_text_encoder(src.text_encoder_path, m.text_encoder)
    hidden = table_width(table)
    if m.unet.config.cross_attention_dim != hidden:
        flag = "--checkpoint_path" if src.stage is None else f"--stage {src.stage}"
        raise ConfigError(
            f"{flag}: the U-Net in {src.unet_path} expects text features of size "
            f"{m.unet.config.cross_attention_dim}, the base model's text encoder gives {hidden}"
        )
    ids, added = ensure_tokens(m.tokenizer, m.text_encoder, src.tokens)
    if any(t not in emb for t in added):
        raise ConfigError(
            f"--learned_embedding_path: needed for {added[0]!r}, which {src.model} does not hold"
        )
    if src.tokens and emb:
        rows = []
        for t in src.tokens:
            v = emb[t]  # (dim,): load_embeddings splits an (n, dim) entry into n tokens
            if tuple(v.shape) != (hidden,):
                raise ConfigError(
                    f"{src.embedding_path}: {t!r} has shape {tuple(v.shape)}, the text encoder "
                    f"of {src.model} needs ({hidden},)"
                )
            rows.append(v)
        table = m.text_encoder.get_input_embeddings()  # resized: a new table
        write_table_rows(table, ids, torch.stack(rows))  # (k, dim)
    for mod in (m.text_encoder, m.vae, m.unet):
        mod.eval()
    return Concept(
        m.tokenizer, m.text_encoder, m.vae, m.unet, dict(m.noise_scheduler.config), ids, src
    )


def check_export_dir(path: str | Path) -> Path:
    """Refuse to replace a folder that is not empty and not an earlier export."""
    p = Path(path)
    if p.exists() and (not p.is_dir() or (any(p.iterdir()) and not (p / CONCEPT_FILE).is_file())):
        raise ConfigError(
            f"--export_pipeline: {p} exists and is not an exported pipeline; choose a new folder"
        )
    return p


def build_pipeline(concept: Concept, scheduler: str = "dpm"):
    """A StableDiffusionPipeline around the loaded concept with the named sampler."""
    return make_pipeline(
        concept.tokenizer,
        concept.text_encoder,
        concept.vae,
        concept.unet,
        concept.scheduler_config,
        scheduler,
    )


def export_pipeline(concept: Concept, path: str | Path, scheduler: str = "dpm") -> Path:
    """Write a complete diffusers pipeline whose tokenizer holds the placeholder, atomically."""
    pipe = build_pipeline(concept, scheduler)
    src = concept.source
    meta = {
        "placeholder_tokens": src.tokens,
        "category": src.category,
        # '{}' filled as inference fills it: "a photo of a [V] cup"
        "prompt_example": fill_prompt("a photo of a {}", src.tokens, src.prompt_category)
        if src.tokens
        else None,
        "source": src.to_dict(),
    }

    def write(tmp: Path) -> None:
        pipe.save_pretrained(str(tmp), safe_serialization=True)
        (tmp / CONCEPT_FILE).write_text(json.dumps(meta, indent=2))

    return write_dir_atomically(check_export_dir(path), write)
