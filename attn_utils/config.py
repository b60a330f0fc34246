"""Run configuration: documented dataclasses and the checks of their values.

The base of the library: it imports nothing of it. The run's own flag groups are in
run_flags.py; the recipes (--method) and the speed flags add theirs, and
train_attndreambooth.py assembles the parser from all of them.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass, field
from pathlib import Path

STAGE_NAMES = {1: "ti", 2: "attn", 3: "unet"}  # flag prefixes, as in the authors' launch script
STAGE_TITLES = {1: "embedding", 2: "cross-attention", 3: "unet"}


class ConfigError(ValueError):
    """A bad flag or flag combination; the message names the flag."""


def vector_tokens(name: str, n: int) -> list[str]:
    """The tokens of an n-vector [V] called `name`: name_v0 .. name_v{n-1}."""
    return [f"{name}_v{i}" for i in range(n)]


def first_line(e: BaseException, limit: int | None = None) -> str:
    """An exception's message cut to its first line (and `limit` characters), for one-line
    errors; the exception's type name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__


@dataclass
class StageConfig:
    """One stage of the recipe (docs/method.md table)."""

    index: int  # 1 embedding, 2 cross-attention, 3 whole U-Net
    learning_rate: float
    train_steps: int  # optimiser steps
    batch_size: int  # per process; the regularisation sums over it, so it scales the reg term
    reg_mean_weight: float
    reg_var_weight: float
    validation_steps: int  # 0: never mid-stage
    gradient_accumulation_steps: int = 1
    checkpointing_steps: int = 0  # 0: only the stage result at the end
    # Augmentation, the method's reference's (train/methods.py). The paper's is the authors':
    # RandomRotation(45) with p 0.75, then flip p 0.25; the diffusers examples never rotate.
    flip_p: float = 0.25  # horizontal-flip probability
    rotate_p: float = 0.75  # probability of a rotation (class images are never rotated)
    rotate_degrees: float = 45.0  # uniform in [-d, d], canvas expanded, black corners
    crop: str = "random"  # random | center (shorter side to R first) | resize (squash to R)
    max_grad_norm: float | None = None  # clip the gradient norm; None: never (the paper's)
    templates: bool = False  # each sample's prompt is a Textual Inversion template
    tune_embedding: bool = False  # a U-Net stage also trains [V]'s embedding (TI+DB)
    embedding_learning_rate: float | None = None  # its rate (None: the stage's)
    # CoRe's stage 1 (train/core.py): its two context losses and its norm hold window
    context_embedding_weight: float = 0.0
    context_attention_weight: float = 0.0
    norm_hold_start: int = 0  # the step whose norm is kept (0: no hold)
    norm_hold_end: int = 0  # the last step after which [V] is rescaled to it
    # LoRA adapters instead of the stage's full trainable set (stages 2-3, train/lora.py)
    lora_rank: int = 0  # 0: the full weights train (the paper's)
    lora_alpha: float | None = None  # scale alpha / rank; None: the rank (scale 1)
    lora_dropout: float = 0.0  # on the adapters' input
    lora_targets: str | None = None  # stage 2: attn2; stage 3: attention | all

    @property
    def name(self) -> str:
        return STAGE_NAMES[self.index]


# The paper's recipe (docs/method.md); the fast version only changes stage 3.
PAPER_STAGES = {
    1: dict(
        learning_rate=1e-3,
        train_steps=60,
        batch_size=8,
        reg_mean_weight=0.1,
        reg_var_weight=0.0,
        validation_steps=30,
    ),
    2: dict(
        learning_rate=2e-5,
        train_steps=100,
        batch_size=8,
        reg_mean_weight=2.0,
        reg_var_weight=5.0,
        validation_steps=50,
    ),
    3: dict(
        learning_rate=2e-6,
        train_steps=500,
        batch_size=8,
        reg_mean_weight=2.0,
        reg_var_weight=5.0,
        validation_steps=100,
    ),
}
FAST_STAGE_3 = dict(learning_rate=1e-5, train_steps=200, batch_size=4)


@dataclass
class RunConfig:
    """Everything one launch needs; written to run_config.json."""

    pretrained_model_name_or_path: str
    instance_data_dir: str
    category: str
    output_dir: str
    revision: str | None = None
    placeholder_token: str = "new_concept"  # tokens new_concept_v0 .. _v{n-1}
    n_object_embedding: int = 1
    instance_prompt: str = "a photo of a {} {category}"  # {} -> placeholder tokens
    # The regulariser's target for a category of several sub-tokens ("teddy bear"): "first"
    # is the original's (its first sub-token); "all" averages the maps of all its sub-tokens.
    reg_category_target: str = "first"
    validation_prompt: str | None = None  # same convention as instance_prompt
    num_validation_images: int = 4
    validation_inference_steps: int = 25
    stages: list[StageConfig] = field(default_factory=list)
    run_stages: list[int] = field(default_factory=lambda: [1, 2, 3])
    fast: bool = False
    seed: int = 0
    # None on the command line: the base model's native size, read from its U-Net and VAE
    # configs (train/family_defaults.py); the resolved value is recorded here
    resolution: int = 512
    center_crop: bool = False  # the original crops at random
    repeats: int = 100  # each instance image appears this often per epoch
    skip_bad_images: bool = False
    # no | fp16 | bf16 (autocast; master weights stay fp32); None: what accelerate says
    mixed_precision: str | None = None
    allow_tf32: bool = False
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    fused_adam: bool | None = None  # None: fused AdamW wherever torch has the kernel
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    # --max_grad_norm for every stage (None: each stage's own, the method's); in the
    # fingerprint as before, so run folders of earlier versions stay valid
    max_grad_norm: float | None = None
    noise_offset: float = 0.0
    enable_xformers_memory_efficient_attention: bool = False
    channels_last: bool = False
    torch_compile: str = "none"  # none | unet | blocks (regional)
    compile_vae: bool = False  # compile the VAE encoder (the exact path's per-step encode)
    sdpa_backend: str = "auto"  # self-attention kernel: auto | flash | cudnn | efficient | math
    offload_text_encoder: bool | None = None  # stages 2-3; None: on CUDA
    logging_steps: int = 10  # losses read from the device (one sync) every N steps
    profile_steps: int = 0  # torch.profiler over N steps of each stage (<output_dir>/profile)
    cache_latents: bool = False  # changes augmentation statistics: opt-in
    cache_latents_variants: int = 16  # augmented copies per image in the pool
    dataloader_num_workers: int | None = None  # None: up to 4 on a GPU, 0 on the CPU
    report_to: str = "none"  # none | tensorboard | wandb
    checkpoints_total_limit: int | None = 2
    resume_from_checkpoint: str | None = None  # None / "latest": newest; "none"; or a folder
    local_files_only: bool = False
    # --method and prior preservation (methods.py, docs/methods.md)
    method: str = "attndreambooth"  # attndreambooth | ti | dreambooth | ti_db
    identifier: str | None = None  # dreambooth: the rare existing word '{}' becomes
    prompt_templates: list[str] | None = None  # ti: one sampled per image instead of the prompt
    num_vectors: int | None = None  # ti: N vectors, all from the initialiser (the example's)
    token_alone: bool = False  # ti: prompts hold [V] without the category (the example's)
    core_prompts: str | None = None  # core: the regularisation prompt file
    initializer_token: str | None = None  # initialises [V]; None: the category
    validate_before_training: bool = False  # the authors validate at step 0 of every stage
    with_prior_preservation: bool = False
    class_data_dir: str | None = None
    class_prompt: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    sample_batch_size: int = 4  # class-image generation
    class_inference_steps: int = 50
    train_text_encoder: bool = False  # dreambooth: stage 3 trains the text encoder too
    text_encoder_learning_rate: float | None = None  # None: stage 3's learning rate
    method_source: str = ""  # where the --method recipe comes from (set with the recipe)
    # The base model's family (sd1 | sd2 | sdxl, attn_utils/families.py), read from its files;
    # family_guess says why it was guessed from the name instead: a plan may show that, a
    # run stops (train/family_defaults.py)
    family: str | None = None
    family_guess: str | None = None

    @property
    def placeholder_tokens(self) -> list[str]:
        if self.identifier is not None:  # dreambooth: no learned token, the rare word itself
            return [self.identifier]
        return vector_tokens(self.placeholder_token, self.n_object_embedding)

    def stage(self, index: int) -> StageConfig:
        return next(s for s in self.stages if s.index == index)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["placeholder_tokens"] = self.placeholder_tokens
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        d = {k: v for k, v in d.items() if k in {f.name for f in dataclasses.fields(cls)}}
        d["stages"] = [StageConfig(**s) for s in d.get("stages", [])]
        return cls(**d)

    def plan(self) -> dict:
        """The resolved plan that --dry_run prints."""
        stages = []
        for s in self.stages:
            d = dataclasses.asdict(s)
            if not s.lora_rank:  # full fine-tuning: the plan reads as before LoRA existed
                d = {k: v for k, v in d.items() if not k.startswith("lora_")}
            d["name"] = s.name
            d["run"] = s.index in self.run_stages
            stages.append(d)
        rest = {k: v for k, v in self.to_dict().items() if k != "stages"}
        return {"stages": stages, **rest}


def parse_stages(text: str) -> list[int]:
    try:
        out = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise ConfigError(f"--stages: expected e.g. '1,2,3' or '2,3', got {text!r}") from None
    if not out or any(i not in STAGE_NAMES for i in out):
        raise ConfigError(f"--stages: stages are 1, 2 and 3, got {text!r}")
    return out


STAGE_KEYS = (
    "learning_rate",
    "train_steps",
    "batch_size",
    "gradient_accumulation_steps",
    "reg_mean_weight",
    "reg_var_weight",
    "validation_steps",
    "checkpointing_steps",
)


def validate(cfg: RunConfig) -> None:
    """Every check of the run's own flags that needs no model: one ConfigError naming the flag."""
    if not cfg.category:
        raise ConfigError("--category: must be a non-empty word, e.g. 'sloth'")
    missing = sorted(set(cfg.run_stages) - {s.index for s in cfg.stages})
    if missing:
        raise ConfigError(f"--stages: --method {cfg.method} has no stage {missing[0]}")
    if not cfg.placeholder_token.strip() or any(c.isspace() for c in cfg.placeholder_token):
        raise ConfigError("--placeholder_token: must be one word without spaces")
    if cfg.n_object_embedding < 1:
        raise ConfigError("--n_object_embedding: must be >= 1")
    if cfg.instance_prompt.count("{}") != 1:
        raise ConfigError("--instance_prompt: must contain '{}' exactly once (the placeholder)")
    if cfg.validation_prompt is not None and "{}" not in cfg.validation_prompt:
        raise ConfigError("--validation_prompt: must contain '{}' (the placeholder)")
    if cfg.resolution < 8 or cfg.resolution % 8:
        raise ConfigError("--resolution: must be a positive multiple of 8")
    if cfg.repeats < 1:
        raise ConfigError("--repeats: must be >= 1")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ConfigError("--checkpoints_total_limit: must be >= 1")
    if cfg.max_grad_norm is not None and cfg.max_grad_norm < 0:
        raise ConfigError("--max_grad_norm: must be >= 0 (0: no clipping)")
    needs = {
        "--use_8bit_adam": (cfg.use_8bit_adam, "bitsandbytes"),
        "--enable_xformers_memory_efficient_attention": (
            cfg.enable_xformers_memory_efficient_attention,
            "xformers",
        ),
        f"--report_to {cfg.report_to}": (cfg.report_to != "none", cfg.report_to),
    }
    for flag, (wanted, package) in needs.items():
        if wanted and importlib.util.find_spec(package) is None:
            raise ConfigError(f"{flag}: needs the package {package!r} (pip install {package})")
    for s in cfg.stages:
        p = s.name
        for key in ("train_steps", "batch_size", "gradient_accumulation_steps"):
            if getattr(s, key) < 1:
                raise ConfigError(f"--{p}_{key}: must be >= 1")
        for key in ("validation_steps", "checkpointing_steps"):
            if getattr(s, key) < 0:
                raise ConfigError(f"--{p}_{key}: must be >= 0")
        if s.learning_rate <= 0:
            raise ConfigError(f"--{p}_learning_rate: must be > 0")
        for key in ("flip_p", "rotate_p"):
            if not 0.0 <= getattr(s, key) <= 1.0:
                raise ConfigError(f"--{key}: must be a probability in [0, 1]")
        if not 0.0 <= s.rotate_degrees <= 180.0:
            raise ConfigError("--rotate_degrees: must be in [0, 180]")
        if s.reg_mean_weight < 0 or s.reg_var_weight < 0:
            raise ConfigError(f"--{p}_reg_mean_weight / --{p}_reg_var_weight: must be >= 0")


def load_run_config(run_dir: str | Path) -> RunConfig:
    """Read run_config.json from a training output folder."""
    path = Path(run_dir) / "run_config.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found (is this a training output folder?)")
    return RunConfig.from_dict(json.loads(path.read_text()))
