"""Where and how the models run: device, precision, compilation, attention kernels, loaders.

Everything here is a speed or memory choice that leaves the recipe's math unchanged; each has
a flag, and `auto` picks what pays on the device at hand (docs/performance.md has the numbers).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from attn_utils.config import ConfigError
from attn_utils.method.vae import vae_weight_dtype

# The blocks that regional compilation compiles: every transformer and resnet block of SD's
# U-Net (16 + 22 in SD2.1); each compiles once per distinct shape and is then reused.
COMPILED_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")


def place_models(trainer) -> None:
    """Move, freeze and prepare the resident models for training (Trainer.__init__)."""
    cfg, device = trainer.cfg, trainer.device
    for m in (trainer.text_encoder, trainer.vae, trainer.unet):
        m.requires_grad_(False)
    trainer.text_encoder.to(device).eval()
    # The VAE is frozen and only encodes: half precision halves its cost, except fp16 where
    # its config says force_upcast (SDXL's VAE overflows fp16): that one stays fp32.
    trainer.vae.to(device).eval()
    trainer.vae.to(dtype=vae_weight_dtype(trainer.vae, trainer.autocast_dtype))
    trainer.unet.to(device)  # fp32 master weights in every mode
    if cfg.channels_last:
        trainer.unet.to(memory_format=torch.channels_last)
    if cfg.gradient_checkpointing:
        trainer.unet.enable_gradient_checkpointing()
    if cfg.enable_xformers_memory_efficient_attention:
        try:
            trainer.unet.enable_xformers_memory_efficient_attention()
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"--enable_xformers_memory_efficient_attention: {e}") from None
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    compile_unet(trainer.unet, cfg.torch_compile)
    if cfg.compile_vae and not cfg.cache_latents:  # a pool encodes once: nothing to gain
        _persistent_inductor_cache()
        trainer.vae.encoder.compile()  # the per-step encode; decoding (validation) stays eager
    trainer.prompts = {  # the columns are read by every cross-attention layer
        k: (ids.to(device), cols.to(device)) for k, (ids, cols) in trainer.prompts.items()
    }


def compile_unet(unet, mode: str) -> None:
    """none | unet (the whole forward) | blocks (each transformer / resnet block).

    Inductor's caches persist across runs (TORCHINDUCTOR_CACHE_DIR, by default under
    ~/.cache/attndreambooth), so a second run on the same shapes compiles in seconds.
    """
    if mode == "none":
        return
    _persistent_inductor_cache()
    if mode == "unet":
        unet.compile()
        return
    # One code object serves every block of a kind: allow a compiled graph per shape.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for m in unet.modules():
        if type(m).__name__ in COMPILED_BLOCKS:
            m.compile()


def _persistent_inductor_cache() -> None:
    default = Path.home() / ".cache" / "attndreambooth" / "inductor"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(default))


def attention_backend(name: str):
    """Context that pins scaled_dot_product_attention (self-attention) to one kernel."""
    if name == "auto":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kind = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]
    return sdpa_kernel([kind])


def loader_workers(requested: int | None, device: torch.device, pooled: bool) -> int:
    """Data-loader processes: as asked, else up to 4 on a GPU (512 px augmentation costs
    tens of ms per batch on one core) and none on the CPU or with a latent pool."""
    if requested is not None:
        return requested
    if pooled or device.type != "cuda":
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    per_process = (cpus or 1) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(4, per_process - 1))


def offloads_text_encoder(requested: bool | None, device: torch.device) -> bool:
    """Stages 2-3 need the text encoder's output once: park it on the CPU (GPU memory)."""
    return requested if requested is not None else device.type == "cuda"


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """{'peak_gib': max_memory_allocated} on CUDA since the last reset_peak; {} elsewhere."""
    if device.type != "cuda":
        return {}
    return {"peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3)}
