"""What one benchmark step computes in each mode, for a Variant of speed features.

  ours      the library: capture_cross_attention (explicit maps on attn2 only, fused
            self-attention), text states cached (stages 2-3) or at batch 1 (stage 1),
            stage 1 trains only the placeholder row(s).
  original  the original's way: explicit probabilities in EVERY attention layer, the text
            encoder on B copies of the prompt every step, stage 1 trains the whole embedding
            table and restores the other rows after each step.
bench_train.py times these steps; report.py turns the timings into tables.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import torch

# Paper step counts (docs/method.md); "fast" is the paper's fast stage 3. Validations per recipe:
# steps // validate_every, i.e. 60//30 + 100//50 + 500//100 (fast: 200//100).
RECIPES = {"paper": {1: 60, 2: 100, 3: 500}, "fast": {1: 60, 2: 100, 3: 200}}
VALIDATIONS = {"paper": 9, "fast": 6}
MODES = ("ours", "original")


@dataclasses.dataclass(frozen=True)
class Variant:
    """One configuration of speed features; its name is its '+'-joined feature list."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; master weights stay fp32)
    tf32: bool = False
    fused_adam: bool = False
    adam8bit: bool = False
    grad_ckpt: bool = False
    channels_last: bool = False
    compile: bool = False
    cache_latents: bool = False
    no_text_cache: bool = False  # ours with the text encoder on B copies every step
    # issue 19: rank-R LoRA adapters in stages 2-3 ("lora" = rank 4, "lora16" = rank 16) on
    # the stage's default targets (stage 2: attn2; stage 3: every attention projection)
    lora_rank: int = 0

    @property
    def name(self) -> str:
        flags = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) is True]
        lora = [f"lora{self.lora_rank}"] if self.lora_rank else []
        return "+".join([self.precision] + flags + lora)

    @classmethod
    def parse(cls, spec: str) -> Variant:
        kw: dict = {}
        for tok in filter(None, spec.strip().split("+")):
            if tok in ("fp32", "bf16", "fp16"):
                if "precision" in kw:
                    raise ValueError(f"variant {spec!r}: more than one precision")
                kw["precision"] = tok
            elif tok.startswith("lora") and (tok[4:].isdigit() or tok == "lora"):
                kw["lora_rank"] = int(tok[4:] or 4)
            elif tok in {f.name for f in dataclasses.fields(cls)} - {"precision", "lora_rank"}:
                kw[tok] = True
            else:
                names = ", ".join(f.name for f in dataclasses.fields(cls)[1:-1]) + ", lora<R>"
                raise ValueError(
                    f"variant {spec!r}: unknown feature {tok!r} (fp32|bf16|fp16, {names})"
                )
        if kw.get("fused_adam") and kw.get("adam8bit"):
            raise ValueError(f"variant {spec!r}: fused_adam and adam8bit are two optimisers")
        return cls(**kw)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)


# ---------------------------------------------------------------- the original's attention
@contextlib.contextmanager
def original_attention(unet, controller):
    """The original's hook: explicit softmax probabilities in EVERY attention layer.

    Self-attention (attn1) loses the fused kernel: diffusers' classic AttnProcessor saves its
    (B*H, N, N) probabilities for backward. Cross-attention maps go to the controller
    through the library's capture, whose fallback is now that same explicit processor.
    """
    from diffusers.models.attention_processor import AttnProcessor

    from attn_utils.method.capture import capture_cross_attention

    previous = dict(unet.attn_processors)
    unet.set_attn_processor({k: AttnProcessor() for k in previous})
    try:
        with capture_cross_attention(unet, controller):
            yield
    finally:
        unet.set_attn_processor(previous)


# ---------------------------------------------------------------- one stage in one mode
class StageRun:
    """A stage's trainable set, optimiser and step on resident models, in one mode.

    `with StageRun(...) as run: run.step(i)`; leaving it restores processors and freezes.
    """

    def __init__(self, m, stage: int, mode: str, v: Variant, pixels, pool=None) -> None:
        from attn_utils.config import PAPER_STAGES, RunConfig, StageConfig
        from attn_utils.method.capture import TokenStats
        from attn_utils.train.lora import TARGETS
        from attn_utils.train.runtime import build_optimizer
        from attn_utils.train.stages import select_trainable

        self.m, self.stage, self.mode, self.v = m, stage, mode, v
        self.pixels, self.pool = pixels, pool  # (B, 3, R, R) in [-1, 1]; LatentPool or None
        self.device = pixels.device
        b = pixels.shape[0]
        lora = dict(lora_rank=v.lora_rank, lora_targets=TARGETS[stage][0]) if v.lora_rank else {}
        if stage == 1:
            lora = {}  # no U-Net weights train in stage 1
        self.sc = StageConfig(index=stage, **{**PAPER_STAGES[stage], "batch_size": b, **lora})
        self.stats = TokenStats()
        self.stats.columns = m.columns
        self.keep = None  # original stage 1: rows of the table to restore after each step
        if mode == "original" and stage == 1:
            table = m.text_encoder.get_input_embeddings().weight
            for p in list(m.unet.parameters()) + list(m.text_encoder.parameters()):
                p.requires_grad_(False)
            table.requires_grad_(True)
            self.keep = torch.ones(len(table), dtype=torch.bool, device=table.device)
            self.keep[m.token_ids] = False
            self.frozen_rows = table.detach().clone()
            self.params, plist = None, [table]
        else:
            self.params = select_trainable(stage, m.unet, m.text_encoder, m.token_ids,
                                           lora=self.sc)  # fmt: skip
            plist = list(self.params.named.values())
        self.plist = plist
        self.n_trainable = sum(p.numel() for p in plist)
        run_cfg = RunConfig(
            "random", "-", "-", "-", use_8bit_adam=v.adam8bit, fused_adam=v.fused_adam
        )
        self.optimizer = build_optimizer(plist, self.sc, run_cfg)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=v.precision == "fp16")
        self.cached = None
        t0 = time.perf_counter()
        if mode == "ours" and stage >= 2 and not v.no_text_cache:
            with (
                torch.no_grad(),
                self.autocast(self.v, self.device),
            ):  # frozen encoder, fixed prompt: once
                self.cached = m.text_encoder(m.input_ids.to(self.device))[0].float()
        self.setup_ms = (time.perf_counter() - t0) * 1e3

    @staticmethod
    def autocast(v: Variant, device: torch.device):
        dt = v.autocast_dtype
        return torch.autocast(device.type, dtype=dt, enabled=dt is not None)

    def __enter__(self) -> StageRun:
        from attn_utils.method.capture import capture_cross_attention

        self._ctx = contextlib.ExitStack()
        if self.mode == "ours":
            self._ctx.enter_context(capture_cross_attention(self.m.unet, self.stats))
        else:
            self._ctx.enter_context(original_attention(self.m.unet, self.stats))
        return self

    def __exit__(self, *exc) -> None:
        from attn_utils.train.stages import finish_trainable

        self._ctx.close()
        if self.params is not None:
            finish_trainable(self.stage, self.params, self.m.text_encoder, self.m.unet)
        for p in self.m.text_encoder.parameters():
            p.requires_grad_(False)
        self.optimizer = None

    def optimizer_bytes(self) -> int:
        """Bytes of the optimiser's state tensors (AdamW: two moments per trained number)."""
        return sum(
            t.numel() * t.element_size()
            for st in self.optimizer.state.values()
            for t in st.values()
            if isinstance(t, torch.Tensor)
        )

    def text(self) -> torch.Tensor:
        """(1 or B, 77, D) text states, the way this mode gets them."""
        if self.cached is not None:
            return self.cached
        ids = self.m.input_ids.to(self.device)
        if self.mode == "original" or self.v.no_text_cache:
            ids = ids.expand(len(self.pixels), -1)  # B copies of one fixed prompt
        return self.m.text_encoder(ids)[0]

    def losses(self, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        from attn_utils.method.step import denoise_losses, encode_latents

        if self.pool is not None:
            idx = torch.arange(len(self.pixels), device=self.device) % len(self.pool)
            latents = self.pool.sample(idx, gen) * self.m.vae.config.scaling_factor
        else:
            latents = encode_latents(self.m.vae, self.pixels, gen)
        sc = self.sc
        return denoise_losses(
            self.m.unet, self.m.scheduler, latents, self.text(), gen, self.stats,
            len(self.m.token_ids), sc.reg_mean_weight, sc.reg_var_weight, 0.0,
            self.v.channels_last,
        )  # fmt: skip

    def step(self, i: int) -> float:
        """One optimiser step, as the trainer takes it; returns the loss."""
        gen = torch.Generator(self.device).manual_seed(1000 * self.stage + i)
        with self.autocast(self.v, self.device):
            mse, reg = self.losses(gen)
            loss = mse + reg
        self.scaler.scale(loss).backward()
        if self.mode == "ours":  # the trainer's update: finiteness flag, skipped on the device
            from attn_utils.train.runtime import optimizer_step

            optimizer_step(self.optimizer, self.scaler, self.plist, None)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.optimizer.zero_grad(set_to_none=True)
        if self.keep is not None:  # the original's "restore every row but the placeholder"
            with torch.no_grad():
                table = self.m.text_encoder.get_input_embeddings().weight
                table[self.keep] = self.frozen_rows[self.keep]
        return loss.item()


def place(m, v: Variant, device: torch.device) -> None:
    """What attn_utils.train.placement.place_models does for these features."""
    from attn_utils.method.vae import vae_weight_dtype

    if v.tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    m.vae.to(dtype=vae_weight_dtype(m.vae, v.autocast_dtype))  # fp16: fp32 if force_upcast
    if v.channels_last:
        m.unet.to(memory_format=torch.channels_last)
    if v.grad_ckpt:
        m.unet.enable_gradient_checkpointing()
    # eval mode as the trainer's: diffusers checkpoints whenever gradients are on, in either
    # mode, and the U-Net has no dropout
    m.unet.eval()
    if v.compile:
        m.unet.compile()
