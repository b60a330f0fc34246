"""Validation grids and class images during training: sampling with the resident modules."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from attn_utils.method.tokens import fill_prompt
from attn_utils.model_defaults import render_defaults
from attn_utils.render.pipeline import make_pipeline, sample_images
from attn_utils.runfiles import image_grid
from attn_utils.sdxl import is_sdxl


@torch.no_grad()
def encode_validation_prompt(trainer) -> dict[str, torch.Tensor]:
    """The pipeline's embedding arguments for the validation prompt: prompt and negative
    (1, 77, D), on SDXL their pooled (1, P) too; for sampling later without the text
    encoder on the device."""
    pipe = make_pipeline(
        trainer.tokenizer,
        trainer.text_encoder,
        trainer.vae,
        trainer.unet,
        trainer.noise_scheduler.config,
    )
    prompt = fill_prompt(trainer.cfg.validation_prompt, trainer.cfg.placeholder_tokens)
    if is_sdxl(trainer.text_encoder):
        out = pipe.encode_prompt(prompt=prompt, device=trainer.device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=True)  # fmt: skip
        names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                 "negative_pooled_prompt_embeds")  # fmt: skip
    else:
        out = pipe.encode_prompt(prompt, trainer.device, 1, True)
        names = ("prompt_embeds", "negative_prompt_embeds")
    return dict(zip(names, out))


@contextlib.contextmanager
def sampling_mode(trainer) -> Iterator[None]:
    """U-Net in eval mode, VAE weights in fp32, the run's autocast, no gradients; the
    training state comes back on exit. Autocast would still run the VAE's decode in half
    precision: sample with render.pipeline.sample_images, whose decode turns autocast off
    where fp16 overflows the VAE (force_upcast)."""
    unet, vae = trainer.unet, trainer.vae
    was_training, vae_dtype = unet.training, vae.dtype
    unet.eval()
    if vae_dtype != torch.float32:
        vae.to(torch.float32)
    try:
        with torch.no_grad(), trainer._autocast():
            yield
    finally:
        if vae_dtype != torch.float32:
            vae.to(vae_dtype)
        unet.train(was_training)


def render_validation(trainer, out: Path) -> Path:
    """Sample the validation prompt with the resident modules; write a PNG grid atomically.

    All images in one batched call; with trainer.validation_embeds set (stages 2-3) the
    text encoder is not used, so it may rest on the CPU.
    """
    cfg, embeds, n = trainer.cfg, trainer.validation_embeds, trainer.cfg.num_validation_images
    # the sampler and guidance the base model folder names (the toy world's), else the paper's
    render = render_defaults(cfg.pretrained_model_name_or_path)
    with sampling_mode(trainer):
        pipe = make_pipeline(
            trainer.tokenizer,
            trainer.text_encoder if embeds is None else None,
            trainer.vae,
            trainer.unet,
            trainer.noise_scheduler.config,
            render["scheduler"],
        )
        gen = torch.Generator(trainer.device).manual_seed(cfg.seed)
        if embeds is None:
            text = {"prompt": [fill_prompt(cfg.validation_prompt, cfg.placeholder_tokens)] * n}
        else:
            text = {k: v.expand(n, *v.shape[1:]) for k, v in embeds.items()}
        images = sample_images(
            pipe,
            **text,
            generator=gen,
            num_inference_steps=cfg.validation_inference_steps,
            guidance_scale=render["guidance_scale"],
            height=cfg.resolution,
            width=cfg.resolution,
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    image_grid(images).save(tmp, format="PNG")
    tmp.replace(out)
    return out
