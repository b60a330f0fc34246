"""The paper's baselines as named recipes of the same stage machinery (--method).

    attndreambooth  stages 1, 2, 3 with the regulariser: the paper (docs/method.md)
    ti              stage 1 alone, no regulariser: the diffusers textual_inversion example
    dreambooth      stage 3 alone on a rare word, prior preservation: the diffusers DreamBooth
                    example
    ti_db           stage 1 then stage 3, no regulariser: the paper's TI+DB baseline

docs/methods.md lists each recipe's source, its numbers and where ours differ.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from attn_utils.config import (
    FAST_STAGE_3,
    PAPER_STAGES,
    STAGE_KEYS,
    STAGE_NAMES,
    ConfigError,
    RunConfig,
    StageConfig,
    parse_stages,
    validate,
)
from attn_utils.method.templates import TI_OBJECT_TEMPLATES
from attn_utils.run_flags import refuse_absent_stage_flags
from attn_utils.train.core import (
    DEFAULT_PROMPTS,
    add_core_flags,
    check_core_flags,
    core_overrides,
    read_core_prompts,
)
from attn_utils.train.family_defaults import check_family, family_presets, resolve_family
from attn_utils.train.lora import lora_fields, validate_lora
from attn_utils.train.speed_flags import validate_speed_flags
from attn_utils.train.text_training import (
    add_text_encoder_flags,
    check_text_encoder_flags,
    text_encoder_identity,
)

NO_REG = dict(reg_mean_weight=0.0, reg_var_weight=0.0)
# diffusers textual_inversion README: batch 1 x accumulation 4, lr 5e-4 with --scale_lr
# (x accumulation x batch x processes), 3000 steps, constant lr. Scaled here for one process.
# The example flips with p 0.5 and never rotates; each sample's prompt is a template.
TI_STAGE_1 = dict(
    learning_rate=5e-4 * 4 * 1,
    train_steps=3000,
    batch_size=1,
    gradient_accumulation_steps=4,
    validation_steps=100,  # the example's --validation_steps default
    flip_p=0.5,
    rotate_p=0.0,
    rotate_degrees=0.0,
    crop="resize",  # without --center_crop the example squashes the image to a square
    templates=True,
    **NO_REG,
)
# diffusers DreamBooth README: lr 5e-6, batch 1, no accumulation, 800 steps with prior
# preservation (200 class images, weight 1.0), constant lr; 2e-6 when the text encoder trains.
# The example resizes and crops only (class images too) and clips at norm 1.0.
DREAMBOOTH_STAGE_3 = dict(
    learning_rate=5e-6,
    train_steps=800,
    batch_size=1,
    gradient_accumulation_steps=1,
    validation_steps=100,
    flip_p=0.0,
    rotate_p=0.0,
    rotate_degrees=0.0,
    max_grad_norm=1.0,  # the example's --max_grad_norm default
    **NO_REG,
)
# CoRe's launch script: stage 1 is textual inversion on "a photo of a {}" (no category) at
# 5e-3, batch 6, 300 steps, with the context embedding (1.5e-4) and attention (0.05) losses and
# the norm held from step 120 to 180; stage 2 fine-tunes the whole U-Net at 2e-6, batch 4,
# 1000 steps. Augmentation is not in what we read: the textual_inversion example's here.
CORE_STAGE_1 = dict(
    learning_rate=5e-3, train_steps=300, batch_size=6, gradient_accumulation_steps=1,
    validation_steps=100, flip_p=0.5, rotate_p=0.0, rotate_degrees=0.0,
    context_embedding_weight=1.5e-4, context_attention_weight=0.05, norm_hold_start=120,
    norm_hold_end=180, **NO_REG,
)  # fmt: skip
CORE_STAGE_3 = dict(
    learning_rate=2e-6, train_steps=1000, batch_size=4, gradient_accumulation_steps=1,
    validation_steps=250, flip_p=0.5, rotate_p=0.0, rotate_degrees=0.0, **NO_REG,
)  # fmt: skip
CORE_SOURCE = "Wu et al., CoRe, AAAI 2025 (arXiv 2408.15914), and its authors' launch script"
DREAMBOOTH_PRIOR = dict(with_prior_preservation=True, num_class_images=200, prior_loss_weight=1.0)
TI_SOURCE = "https://github.com/huggingface/diffusers/tree/main/examples/textual_inversion"
DB_SOURCE = "https://github.com/huggingface/diffusers/tree/main/examples/dreambooth"
PAPER_SOURCE = "Pang et al., AttnDreamBooth, NeurIPS 2024 (arXiv 2406.05000), and its code"


@dataclass(frozen=True)
class Recipe:
    """A method: which stages run with which preset values, and where the numbers come from."""

    name: str
    stages: dict[int, dict]
    source: str
    prompt: str = "a photo of a {} {category}"  # default --instance_prompt
    identifier: bool = False  # {} is an existing rare word: no token is added or learned
    prior: dict = field(default_factory=dict)  # prior-preservation presets
    token_alone: bool = False  # prompts and renders write [V] without the category


RECIPES = {
    "attndreambooth": Recipe("attndreambooth", dict(PAPER_STAGES), PAPER_SOURCE),
    "ti": Recipe("ti", {1: TI_STAGE_1}, TI_SOURCE),
    "dreambooth": Recipe(
        "dreambooth",
        {3: DREAMBOOTH_STAGE_3},
        DB_SOURCE,
        prompt="a photo of {} {category}",  # the example's "a photo of sks dog"
        identifier=True,
        prior=DREAMBOOTH_PRIOR,
    ),
    # The paper's TI+DB: Textual Inversion, then DreamBooth's fine-tuning on the learned token,
    # the embedding still training (the paper's analysis: it "remains largely unchanged").
    "ti_db": Recipe(
        "ti_db",
        {1: TI_STAGE_1, 3: {**DREAMBOOTH_STAGE_3, "tune_embedding": True}},
        f"the paper's TI+DB: the ti recipe ({TI_SOURCE}), then the dreambooth recipe "
        f"({DB_SOURCE}) on [V], its embedding training too",
        prompt="a photo of {} {category}",
        prior=DREAMBOOTH_PRIOR,
    ),
}
RECIPES["core"] = Recipe(
    "core", {1: CORE_STAGE_1, 3: CORE_STAGE_3}, CORE_SOURCE, prompt="a photo of a {}",
    token_alone=True,
)  # fmt: skip
# The paper's ablation figure: AttnDreamBooth with one part removed, everything else its own.
# Without stage 1, [V] keeps its initialisation (the category's embedding) and the first
# stage writes it beside its U-Net; without the regulariser every weight is 0.
ABLATIONS = {
    "no_stage1": ({2: PAPER_STAGES[2], 3: PAPER_STAGES[3]}, "without stage 1"),
    "no_stage2": ({1: PAPER_STAGES[1], 3: PAPER_STAGES[3]}, "without stage 2"),
    "no_stage3": ({1: PAPER_STAGES[1], 2: PAPER_STAGES[2]}, "without stage 3"),
    "no_reg": ({k: {**v, **NO_REG} for k, v in PAPER_STAGES.items()}, "without the regulariser"),
    # the recipe ti_db had before it became the paper's TI+DB
    "no_stage2_no_reg": (
        {1: {**PAPER_STAGES[1], **NO_REG}, 3: {**PAPER_STAGES[3], **NO_REG}},
        "without stage 2 and without the regulariser",
    ),
}
for _name, (_stages, _what) in ABLATIONS.items():
    RECIPES[_name] = Recipe(_name, _stages, f"ablation of the paper's figure: AttnDreamBooth "
                            f"{_what} ({PAPER_SOURCE})")  # fmt: skip


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """--method and the prior-preservation flags (names as in the diffusers examples)."""
    g = p.add_argument_group("method and prior preservation (docs/methods.md)")
    g.add_argument(
        "--method",
        choices=list(RECIPES),
        default="attndreambooth",
        help="the paper's method, a baseline (ti, dreambooth, ti_db: the paper's TI+DB), the "
        "authors' successor CoRe (core) or an ablation of the paper's figure (no_stage1, "
        "no_stage2, no_stage3, no_reg; no_stage2_no_reg)",
    )
    g.add_argument(
        "--identifier", default=None, help="dreambooth: the rare existing word (default 'sks')"
    )
    g.add_argument(
        "--with_prior_preservation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="add W x the denoising loss on generated class images (stage 3; default: on for "
        "dreambooth, off otherwise)",
    )
    g.add_argument("--class_data_dir", default=None, help="default: <output_dir>/class_images")
    g.add_argument("--class_prompt", default=None, help="default: --instance_prompt without {}")
    g.add_argument("--num_class_images", type=int, default=None, help="default 200 / 100")
    g.add_argument("--prior_loss_weight", type=float, default=None, help="default 1.0")
    g.add_argument("--sample_batch_size", type=int, default=4, help="class-image generation")
    g.add_argument("--class_inference_steps", type=int, default=50, help="class-image sampler")
    g.add_argument(
        "--num_vectors",
        type=int,
        default=None,
        help="ti: learn N vectors for [V], all initialised from the initialiser "
        "token (the example's --num_vectors; default 1)",
    )
    g.add_argument(
        "--token_alone",
        action="store_true",
        help="ti: prompts hold [V] without the category word, as the example's "
        "('a photo of a [V]'); inference renders {} the same way",
    )
    add_core_flags(g)
    g.add_argument(
        "--tune_embedding",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ti_db: [V]'s embedding keeps training in the U-Net stage (default: on, as the "
        "paper's TI+DB; --no-tune_embedding freezes it)",
    )
    g.add_argument(
        "--embedding_learning_rate",
        type=float,
        default=None,
        help="ti_db: the embedding's rate in the U-Net stage (default: that stage's)",
    )
    add_text_encoder_flags(g)


def _stage_overrides(ns: argparse.Namespace, idx: int, preset: dict) -> dict:
    """What the global flags set in every stage: augmentation, clipping, the embedding."""
    out = {k: getattr(ns, k) for k in ("flip_p", "rotate_p", "rotate_degrees", "crop")}
    out = {k: v for k, v in out.items() if v is not None}
    if ns.center_crop:
        if ns.crop not in (None, "center"):
            raise ConfigError(f"--center_crop: means --crop center, not --crop {ns.crop}")
        out["crop"] = "center"
    if ns.max_grad_norm is not None:
        out["max_grad_norm"] = ns.max_grad_norm or None  # 0: never clip
    tunes = "tune_embedding" in preset
    for flag in ("tune_embedding", "embedding_learning_rate"):
        if getattr(ns, flag) is not None and not tunes and idx == 3:
            raise ConfigError(f"--{flag}: only --method ti_db trains the embedding with the U-Net")
    if tunes and ns.tune_embedding is not None:
        out["tune_embedding"] = ns.tune_embedding
    if tunes and ns.embedding_learning_rate is not None:
        out["embedding_learning_rate"] = ns.embedding_learning_rate
    return out


def stage_presets(method: str, fast: bool) -> dict[int, dict]:
    """Preset values of the method's stages; --fast is the paper's fast stage 3."""
    rec = RECIPES[method]
    out = {i: dict(v) for i, v in rec.stages.items()}
    if fast:
        if method != "attndreambooth" and (method not in ABLATIONS or 3 not in out):
            raise ConfigError(f"--fast: the paper's fast stage 3, not part of --method {method}")
        out[3].update(FAST_STAGE_3)
    return out


def method_fields(ns: argparse.Namespace, category: str, output_dir: str) -> dict:
    """RunConfig fields that the method and the prior-preservation flags decide."""
    rec = RECIPES[ns.method]
    prompt = ns.instance_prompt or rec.prompt.replace("{category}", category)
    prior = rec.prior
    with_prior = ns.with_prior_preservation
    with_prior = prior.get("with_prior_preservation", False) if with_prior is None else with_prior
    for flag in ("class_data_dir", "class_prompt", "num_class_images", "prior_loss_weight"):
        if getattr(ns, flag) is not None and not with_prior:
            raise ConfigError(f"--{flag}: only means something with --with_prior_preservation")
    if ns.identifier is not None and not rec.identifier:
        raise ConfigError(f"--identifier: only --method dreambooth uses it, not {ns.method}")
    for flag in ("num_vectors", "token_alone"):
        if getattr(ns, flag) not in (None, False) and ns.method != "ti":
            raise ConfigError(f"--{flag}: only --method ti uses it, not {ns.method}")
    if ns.num_vectors is not None and ns.n_object_embedding != 1:
        raise ConfigError("--num_vectors: give it or --n_object_embedding, not both")
    token_alone = ns.token_alone or rec.token_alone
    if ns.token_alone and ns.instance_prompt is None:
        prompt = "a photo of a {}"
    has_core = any("context_embedding_weight" in s for s in rec.stages.values())
    check_core_flags(ns, has_core)
    templates = None
    if any(s.get("templates") for s in rec.stages.values()):
        after = "" if token_alone else " " + category
        templates = [t.replace("{}", "{}" + after) for t in TI_OBJECT_TEMPLATES]
    return dict(
        method=ns.method,
        instance_prompt=prompt,
        num_vectors=ns.num_vectors,
        n_object_embedding=ns.num_vectors or ns.n_object_embedding,
        token_alone=token_alone,
        core_prompts=(ns.core_prompts or str(DEFAULT_PROMPTS)) if has_core else None,
        identifier=(ns.identifier or "sks") if rec.identifier else None,
        prompt_templates=templates,
        with_prior_preservation=with_prior,
        class_data_dir=ns.class_data_dir or f"{output_dir}/class_images",
        class_prompt=ns.class_prompt or " ".join(prompt.replace("{}", " ").split()),
        num_class_images=ns.num_class_images or prior.get("num_class_images", 100),
        prior_loss_weight=(
            ns.prior_loss_weight
            if ns.prior_loss_weight is not None
            else prior.get("prior_loss_weight", 1.0)
        ),
        sample_batch_size=ns.sample_batch_size,
        class_inference_steps=ns.class_inference_steps,
    )


def validate_method(cfg: RunConfig) -> None:
    """Checks of the method and prior-preservation settings: one ConfigError naming the flag."""
    from pathlib import Path

    if cfg.identifier is not None and (not cfg.identifier.strip() or " " in cfg.identifier):
        raise ConfigError("--identifier: must be one word, e.g. 'sks'")
    if cfg.core_prompts is not None:
        read_core_prompts(cfg.core_prompts)  # before any model loads
        for s in cfg.stages:
            if s.context_embedding_weight < 0 or s.context_attention_weight < 0:
                raise ConfigError("--core_embedding_weight / --core_attention_weight: must be >= 0")
    if cfg.num_vectors is not None and cfg.num_vectors < 1:
        raise ConfigError("--num_vectors: must be >= 1")
    if cfg.token_alone and any(s.reg_mean_weight or s.reg_var_weight for s in cfg.stages):
        raise ConfigError(
            "--token_alone: the attention regulariser needs the category after [V] in the prompt"
        )
    for s in cfg.stages:
        if s.embedding_learning_rate is not None and s.embedding_learning_rate <= 0:
            raise ConfigError("--embedding_learning_rate: must be > 0")
        if s.tune_embedding and cfg.offload_text_encoder:
            raise ConfigError(
                "--offload_text_encoder: ti_db's U-Net stage encodes [V] every step (its "
                "embedding trains); add --no-tune_embedding to freeze it and park the encoder"
            )
    check_text_encoder_flags(cfg)  # fills in its default lr
    if not cfg.with_prior_preservation:
        return
    if 3 not in [s.index for s in cfg.stages]:
        raise ConfigError(
            f"--with_prior_preservation: --method {cfg.method} does not train the U-Net"
        )
    for flag in ("num_class_images", "sample_batch_size", "class_inference_steps"):
        if getattr(cfg, flag) < 1:
            raise ConfigError(f"--{flag}: must be >= 1")
    if cfg.prior_loss_weight < 0:
        raise ConfigError("--prior_loss_weight: must be >= 0")
    if not cfg.class_prompt.strip():
        raise ConfigError("--class_prompt: must not be empty")
    a, b = Path(cfg.class_data_dir).resolve(), Path(cfg.instance_data_dir).resolve()
    if a == b or a in b.parents or b in a.parents:
        raise ConfigError(
            f"--class_data_dir: {cfg.class_data_dir} overlaps --instance_data_dir; class "
            "images must never mix with instance images"
        )


def writes_embedding(cfg: RunConfig, stage: int) -> bool:
    """Does this U-Net stage's result hold [V]'s embedding? When [V] trained in it (ti_db),
    and in the first stage of a recipe without stage 1 (no_stage1), whose [V] is the
    initialised one: inference finds it there."""
    if stage == 1 or cfg.identifier is not None:
        return False
    first = min(s.index for s in cfg.stages)
    return cfg.stage(stage).tune_embedding or (first != 1 and stage == first)


def recipe_identity(cfg: RunConfig) -> dict:
    """What the method and its options add to a stage's fingerprint ({} for the paper's
    default recipe, so folders trained before --method existed stay valid)."""
    ident = {}
    if cfg.method != "attndreambooth":
        ident.update(method=cfg.method, identifier=cfg.identifier, templates=cfg.prompt_templates)
    if cfg.num_vectors is not None:
        ident["num_vectors"] = cfg.num_vectors
    if cfg.token_alone:
        ident["token_alone"] = True
    if cfg.core_prompts is not None:  # the prompts themselves, wherever the file lies
        ident["core_prompts"] = read_core_prompts(cfg.core_prompts)
    if cfg.initializer_token and cfg.initializer_token != cfg.category:
        ident["initializer"] = cfg.initializer_token
    if cfg.with_prior_preservation:
        ident["prior"] = [cfg.class_prompt, cfg.num_class_images, cfg.prior_loss_weight]
    ident.update(text_encoder_identity(cfg))  # {} unless --train_text_encoder
    return ident


def config_from_args(ns: argparse.Namespace) -> RunConfig:
    """The RunConfig of parsed flags: the --method recipe's stages, --fast, then the global and
    per-stage flags over them; validated (one ConfigError naming the flag)."""
    words = " ".join(ns.initialize_token or []).strip() or None
    category = (ns.category or words or "").strip()
    family = resolve_family(ns)  # SDXL has defaults of its own (train/family_defaults.py)
    presets = family_presets(ns, stage_presets(ns.method, ns.fast and family != "sdxl"), family)
    lora, stages = lora_fields(ns, presets, ns.method), []
    refuse_absent_stage_flags(ns, ns.method, set(presets))
    for idx, prefix in STAGE_NAMES.items():
        given = {k: getattr(ns, f"{prefix}_{k}") for k in STAGE_KEYS}
        given = {k: v for k, v in given.items() if v is not None}
        if idx not in presets:
            continue
        vals = {**presets[idx], "checkpointing_steps": ns.checkpointing_steps or 0, **given}
        vals.update(_stage_overrides(ns, idx, presets[idx]))
        vals.update(core_overrides(ns, idx, presets[idx]), **lora.get(idx, {}))
        stages.append(StageConfig(index=idx, **vals))
    # Every other field is the flag of the same name.
    same = {f.name for f in dataclasses.fields(RunConfig)} & set(vars(ns))
    kw = {k: getattr(ns, k) for k in same}
    kw.update(category=category, initializer_token=words, stages=stages)
    kw["run_stages"] = parse_stages(ns.stages) if ns.stages else sorted(presets)
    kw["method_source"] = RECIPES[ns.method].source
    cfg = RunConfig(**{**kw, **method_fields(ns, category, ns.output_dir)})
    check_family(ns, cfg, family)
    validate(cfg)
    validate_speed_flags(cfg)
    validate_method(cfg)
    validate_lora(cfg)
    return cfg
