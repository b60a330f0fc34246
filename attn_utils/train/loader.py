"""The batches a stage's loop reads: augmented images or latent-pool indices, class images
for prior preservation, split over processes, loaded in worker processes on a GPU."""

from __future__ import annotations

from torch.utils.data import DataLoader

from attn_utils.config import StageConfig
from attn_utils.sdxl import is_sdxl
from attn_utils.train.data import InstanceDataset, StepBatches
from attn_utils.train.latents import LatentPool, PoolIndices
from attn_utils.train.placement import loader_workers
from attn_utils.train.prior import with_class_images


def stage_loader(trainer, sc: StageConfig, start: int) -> DataLoader:
    """Micro-batches start..end of stage sc for this process (resumable: no iteration state).

    With --cache_latents the pool is encoded on the first call and kept for later stages.
    """
    cfg, acc, k = trainer.cfg, trainer.acc, sc.index
    aug = dict(flip_p=sc.flip_p, rotate_p=sc.rotate_p, rotate_degrees=sc.rotate_degrees,
               crop=sc.crop)  # fmt: skip
    if not cfg.cache_latents:
        dataset = InstanceDataset(
            trainer.images, cfg.resolution, cfg.center_crop, cfg.repeats, cfg.seed, k, **aug,
            time_ids=is_sdxl(trainer.text_encoder),  # SDXL: the crop each sample got
        )  # fmt: skip
    else:
        if trainer.pool is None or trainer.pool.augmentation != aug:  # a stage of its own
            with trainer._autocast():
                trainer.pool = LatentPool(
                    trainer.images, trainer.vae, cfg.resolution, cfg.center_crop,
                    cfg.cache_latents_variants, cfg.seed, trainer.device, **aug,
                )  # fmt: skip
        dataset = PoolIndices(len(trainer.pool), cfg.seed, k)
    dataset = with_class_images(trainer, dataset, k)
    ga = sc.gradient_accumulation_steps
    sampler = StepBatches(
        sc.batch_size, start * ga, sc.train_steps * ga, acc.process_index, acc.num_processes
    )
    workers = loader_workers(cfg.dataloader_num_workers, trainer.device, cfg.cache_latents)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        prefetch_factor=4 if workers else None,
        pin_memory=trainer.device.type == "cuda",  # so the copies to the GPU run async
    )
