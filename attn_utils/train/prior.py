"""DreamBooth's prior preservation: class images (generated once, resumable), the class
stream of the data, and the loss over one batch that concatenates instance and class samples.

Class images live in their own folder (--class_data_dir), never among the instance images.
Missing ones are sampled with the base model already in memory, before any stage changes
it, by every process (its share of the batches); each is written atomically, so an
interrupted generation resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from attn_utils.config import ConfigError
from attn_utils.images import data_fingerprint, load_image, readable_suffixes, shown
from attn_utils.method.step import denoise_losses, encode_latents
from attn_utils.sdxl import is_sdxl
from attn_utils.train.conditioning import encode_text, split_batch, unet_cond
from attn_utils.train.data import InstanceDataset, _seed
from attn_utils.train.runtime import EXIT_OTHER_PROCESS, TrainingStopped, first_failed_process

log = logging.getLogger(__name__)

PRIOR_STAGE = 3  # the stage that trains the whole U-Net takes the prior term
T = TypeVar("T")


def class_image_files(folder: Path) -> list[Path]:
    """Image files of a class folder, by name; hidden files (our .tmp-*) are not images."""
    suffixes = readable_suffixes()
    if not folder.is_dir():
        return []
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in suffixes
    )  # fmt: skip


def load_class_images(files: list[Path]) -> list[Image.Image]:
    """Decode every class image; the first unreadable one is one clear error naming it."""
    images = []
    for p in files:
        try:
            images.append(load_image(p))
        except (ValueError, OSError) as e:
            raise ConfigError(
                f"--class_data_dir: {shown(p)}: {e}; delete it (missing class images are "
                "generated) or choose another folder"
            ) from None
    return images


def class_name(i: int) -> str:
    """Image i's file name: the same on every process and every launch."""
    return f"class_{i:05d}.png"


def missing_class_indices(folder: Path, n: int) -> list[int]:
    """The indices to generate: the first n - (images present) without their file."""
    have = class_image_files(folder)
    names = {p.name for p in have}
    return [i for i in range(n) if class_name(i) not in names][: max(0, n - len(have))]


def generate_class_images(
    folder: Path,
    n: int,
    sample: Callable[[list[int]], list[Image.Image]],
    batch_size: int,
    seed: int,
    show_bar: bool = True,
    *,
    rank: int = 0,
    world: int = 1,
    agree: Callable[[bool], int | None] | None = None,
) -> int:
    """Top the folder up to n images; return how many this process made.

    Image i is class_<i>.png from the noise of its own seed, so a generation interrupted
    and resumed writes the same files as one that ran through. The missing images are cut
    into batches in index order, as one process would cut them, and batch j goes to process
    j % world: each image is computed in the same batch whatever the number of processes,
    so the files are the same bytes. Each file is written under a hidden name, then renamed:
    a partial file is never counted.

    `agree(failed)` is called at the same points on every process (a barrier): it returns
    the first process that failed, or None; one process alone needs none.
    """
    agree = agree or (lambda failed: rank if failed else None)

    def clean() -> None:  # one process only: another's .tmp-* may be a write in progress
        if rank == 0:
            folder.mkdir(parents=True, exist_ok=True)
            for tmp in folder.glob(".tmp-class_*"):  # left by an interrupted write
                tmp.unlink(missing_ok=True)

    def todo() -> list[int]:
        load_class_images(class_image_files(folder))  # refuse an unreadable folder early
        return missing_class_indices(folder, n)

    def complete() -> None:
        left = missing_class_indices(folder, n)
        if left:
            raise ConfigError(
                f"--class_data_dir: {shown(folder)}: {len(left)} class image(s) missing after "
                "generation (several machines must share this folder)"
            )

    _together(clean, agree)
    missing = _together(todo, agree)  # every process lists before any writes
    batches = [missing[s : s + batch_size] for s in range(0, len(missing), batch_size)]
    mine = batches[rank::world]
    _together(lambda: _write_batches(folder, mine, sample, seed, show_bar), agree)
    _together(complete, agree)
    return sum(len(b) for b in mine)


def _write_batches(
    folder: Path, batches: list[list[int]], sample, seed: int, show_bar: bool
) -> None:
    total = sum(len(b) for b in batches)
    bar = tqdm(total=total, desc="class images", disable=not show_bar, dynamic_ncols=True)
    with bar:
        for idx in batches:
            images = sample([_seed(seed, "class-image", i) for i in idx])
            for i, img in zip(idx, images):
                final = folder / class_name(i)
                tmp = folder / f".tmp-{final.name}"
                img.save(tmp, format="PNG")
                os.replace(tmp, final)
                bar.update(1)


def _together(step: Callable[[], T], agree: Callable[[bool], int | None]) -> T:
    """Run step here, then learn whether it failed anywhere: a process whose own step failed
    raises its error; the others stop at once instead of waiting for it."""
    try:
        out = step()
    except Exception:
        try:
            agree(True)
        except TrainingStopped:  # no answer from the others: this process's error matters more
            pass
        raise
    first = agree(False)
    if first is not None:
        raise TrainingStopped(
            f"class images: process {first} failed (its error is in its own output); the "
            "images written so far are kept: launch the same command again to go on",
            EXIT_OTHER_PROCESS,
        )
    return out


def trainer_sampler(trainer) -> Callable[[list[int]], list[Image.Image]]:
    """Sample the class prompt with the resident base modules (nothing is reloaded)."""
    from attn_utils.render.pipeline import make_pipeline, sample_images
    from attn_utils.render.renderer import initial_latents
    from attn_utils.train.validation import sampling_mode

    cfg, tr = trainer.cfg, trainer
    pipe = make_pipeline(tr.tokenizer, tr.text_encoder, tr.vae, tr.unet, tr.noise_scheduler.config)
    side = cfg.resolution // pipe.vae_scale_factor
    shape = (tr.unet.config.in_channels, side, side)

    def sample(seeds: list[int]) -> list[Image.Image]:
        with sampling_mode(tr):
            return sample_images(  # its decode honours the VAE's force_upcast under fp16
                pipe,
                prompt=[cfg.class_prompt] * len(seeds),
                latents=initial_latents(seeds, shape).to(tr.device),
                num_inference_steps=cfg.class_inference_steps,
                height=cfg.resolution,
                width=cfg.resolution,
            )

    return sample


@dataclass
class Prior:
    """The class images of a run and the class prompt's ids (its features, once computed)."""

    images: list[Image.Image]
    input_ids: torch.Tensor  # (1, 77)
    text: torch.Tensor | None = None  # (1, 77, D), computed on first use
    pooled: torch.Tensor | None = None  # SDXL: the class prompt's pooled text (1, P), with it


def setup_prior(trainer) -> Prior | None:
    """Generate missing class images (every process its share), then load them all."""
    cfg, acc = trainer.cfg, trainer.acc
    if not cfg.with_prior_preservation:
        return None
    folder = Path(cfg.class_data_dir)
    made = generate_class_images(
        folder,
        cfg.num_class_images,
        trainer_sampler(trainer),
        cfg.sample_batch_size,
        cfg.seed,
        show_bar=acc.is_local_main_process,
        rank=acc.process_index,
        world=acc.num_processes,
        agree=lambda failed: first_failed_process(failed, trainer.device),
    )
    if made:
        log.info("process %d of %d generated %d class image(s) in %s",
                 acc.process_index, acc.num_processes, made, folder)  # fmt: skip
    files = class_image_files(folder)[: cfg.num_class_images]
    if len(files) < cfg.num_class_images:
        raise ConfigError(f"--class_data_dir: {folder} holds {len(files)} class image(s), "
                          f"fewer than --num_class_images {cfg.num_class_images}")  # fmt: skip
    # The class images are training data: a change to them must not resume a finished stage.
    joined = trainer.data_fp + data_fingerprint(files)
    trainer.data_fp = hashlib.sha256(joined.encode()).hexdigest()
    ids = trainer.tokenizer(
        cfg.class_prompt,
        padding="max_length",
        max_length=trainer.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return Prior(load_class_images(files), ids)


class InstanceAndClass(Dataset):
    """Item g: (instance sample g, class sample g); the two never share a stream."""

    def __init__(self, instance: Dataset, classes: Dataset) -> None:
        self.instance, self.classes = instance, classes

    def __len__(self) -> int:
        return len(self.instance)

    def __getitem__(self, g: int):
        return self.instance[g], self.classes[g]


def with_class_images(trainer, dataset: Dataset, k: int) -> Dataset:
    """The stage's dataset, paired with the class stream when the prior term applies."""
    prior = getattr(trainer, "prior", None)
    if prior is None or k != PRIOR_STAGE:
        return dataset
    cfg = trainer.cfg
    # The instance images' crop and flip, never a rotation: rotated class images would teach
    # the class prompt rotated pictures, against the prior the term exists to keep. Stage -k
    # keeps the class stream's order and draws apart from the instance stream's.
    classes = InstanceDataset(
        prior.images,
        cfg.resolution,
        cfg.center_crop,
        1,
        cfg.seed,
        -k,
        cfg.stage(k).flip_p,
        rotate_p=0.0,
        crop=cfg.stage(k).crop,
        time_ids=is_sdxl(getattr(trainer, "text_encoder", None)),  # SDXL: its crop too
    )
    return InstanceAndClass(dataset, classes)


def encode_class_prompt(trainer, prior: Prior) -> None:
    """The frozen encoder's output on the class prompt (SDXL: its pooled text too), once."""
    with torch.no_grad():
        text, pooled = encode_text(trainer.text_encoder, prior.input_ids.to(trainer.device))
    prior.text = text.float()
    prior.pooled = None if pooled is None else pooled.float()


def prior_losses(trainer, unet, batch, text: torch.Tensor, gen, stats, sc, pooled=None):
    """(instance MSE + W x class MSE, regulariser on the instance half) of one micro-batch;
    on SDXL (`pooled`, the instance prompt's) each half gets its own pooled text and time ids."""
    (inst, inst_ids), (cls, cls_ids) = split_batch(batch[0]), split_batch(batch[1])
    tr = trainer
    if tr.pool is not None:  # --cache_latents: the instance half holds pool indices
        li = tr.pool.sample(inst, gen) * tr.vae.config.scaling_factor
    else:
        li = encode_latents(tr.vae, inst, gen)
    lc = encode_latents(tr.vae, cls, gen)  # (Bc, 4, h, w)
    prior = tr.prior
    if tr.cfg.train_text_encoder:  # it trains (stage 3): every step, with gradients
        class_text = tr.text_encoder(prior.input_ids.to(tr.device))[0]
    else:
        if prior.text is None:  # frozen encoder, fixed prompt: one forward for the run
            encode_class_prompt(tr, prior)
        class_text = prior.text
    bi, bc = li.shape[0], lc.shape[0]
    both = torch.cat([text.expand(bi, -1, -1), class_text.to(text.dtype).expand(bc, -1, -1)])
    cond = None
    if pooled is not None:  # SDXL: the instance half's conditioning, then the class half's
        ci = unet_cond(pooled, inst_ids, tr.pool, inst, bi)
        cc = unet_cond(prior.pooled.to(pooled.dtype), cls_ids, None, cls, bc)
        cond = {k: torch.cat([ci[k], cc[k]]) for k in ci}
    return denoise_losses(
        unet, tr.noise_scheduler, torch.cat([li, lc]), both, gen, stats, len(tr.token_ids),
        sc.reg_mean_weight, sc.reg_var_weight, tr.cfg.noise_offset, tr.cfg.channels_last,
        n_instance=bi, prior_loss_weight=tr.cfg.prior_loss_weight, added_cond=cond,
    )  # fmt: skip
