"""Pretrain the toy world's models from scratch: a VAE, a CLIP text encoder with a U-Net (a
Stable-Diffusion-shaped base model), a toy CLIP for the metrics and an oracle.

    python -m attn_utils.toyworld pretrain --work toy_work --out models/toyworld

Phases run in order and each leaves a file in --work; a relaunch skips finished phases and
continues a training phase from its newest checkpoint (every --checkpoint_every steps), so an
interrupted pretraining loses at most that much. Each step's batch and noise come from a
generator seeded by (seed, phase, step), which makes a resumed run take the same steps as an
uninterrupted one. The export writes diffusers / transformers folders and manifest.json (sha256
of every file, the command, seed and commit); `verify` checks shipped files against it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from attn_utils.evaluate.oracle import Oracle, OracleNet, presence
from attn_utils.runfiles import write_json_atomically
from attn_utils.tiny import SD_SCHEDULER
from attn_utils.toyworld.data import (
    caption_text,
    load_data,
    mirror,
    random_flip,
    render_data,
    to_unit,
)
from attn_utils.toyworld.loop import step_rng, torch_gen, train_phase
from attn_utils.toyworld.nets import (
    ORACLE_DENSE,
    ORACLE_HEADS,
    SIZE,
    make_clip,
    make_text_encoder,
    make_unet,
    make_vae,
)
from attn_utils.toyworld.world import Scene, build_tokenizer, scenes

SHORT_P = 0.3  # the first diffusion phase shortens this share of its captions (see data.shorten)
THING_WEIGHT = 2.0  # the diffusion loss on the things' latents, against the background's
PARTS = ("base", "clip", "dino", "oracle")  # the folders under --out


@dataclass(frozen=True)
class Budget:
    """Sizes and step counts of a pretraining; FULL is the shipped one."""

    scenes: int = 32000
    vae_steps: int = 1500
    vae_batch: int = 32
    unet_steps: int = 2400
    unet_batch: int = 64
    clip_steps: int = 600
    short_steps: int = 500  # the U-Net and text encoder on shortened captions
    clip_short_steps: int = 200
    clip_batch: int = 128
    oracle_steps: int = 600
    oracle_batch: int = 64
    report_images: int = 2  # per held-out caption


FULL = Budget()
QUICK = Budget(  # a smoke run of every phase (tests, --quick): minutes, learns little
    scenes=512,
    vae_steps=6,
    vae_batch=8,
    unet_steps=6,
    unet_batch=8,
    clip_steps=6,
    short_steps=4,
    clip_short_steps=4,
    clip_batch=16,
    oracle_steps=6,
    oracle_batch=16,
    report_images=1,
)


# ---------------------------------------------------------------- phases


def _augment(x: torch.Tensor, flip: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """For the oracle: flips where flip (B,) is true, and blur or noise of the strength
    generated images show."""
    x = mirror(x, flip)
    blur = torch.from_numpy(rng.random(len(x)) < 0.5)[:, None, None, None]
    soft = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    x = torch.where(blur, soft, x)
    noise = torch.from_numpy(rng.uniform(0, 0.1, (len(x), 1, 1, 1)).astype(np.float32))
    return x + noise * torch.randn(x.shape, generator=torch_gen(rng))


def _oracle_labels(world: list[Scene]) -> dict[str, np.ndarray]:
    """The oracle's dense targets: {category, colour: (N, 16, 16) uint8} (draw.thing_labels)."""
    from attn_utils.toyworld.draw import thing_labels

    maps = [thing_labels(s, SIZE, SIZE // 4) for s in tqdm(world, desc="oracle labels")]
    return {"category": np.stack([m[0] for m in maps]), "colour": np.stack([m[1] for m in maps])}


class Pretrainer:
    """The phases, each a method that leaves its result in self.work."""

    def __init__(self, work: Path, out: Path, seed: int, budget: Budget, every: int, argv):
        self.work, self.out, self.seed, self.budget, self.every = work, out, seed, budget, every
        self.argv = argv
        self.times: dict[str, float] = {}
        work.mkdir(parents=True, exist_ok=True)
        self.tokenizer = build_tokenizer(work / "tokenizer")
        self._data: dict | None = None

    @property
    def data(self) -> dict:
        if self._data is None:
            self._data = load_data(self.work / "data.npz")
        return self._data

    def _batch(self, phase: str, step: int, size: int) -> tuple[np.ndarray, np.random.Generator]:
        rng = step_rng(self.seed, phase, step)
        return rng.integers(0, len(self.data["images"]), size), rng

    def run(self) -> None:
        timings_path = self.work / "timings.json"
        if timings_path.is_file():
            self.times = json.loads(timings_path.read_text())
        phases = ("data", "masks", "vae", "latents", "unet", "clip", "oracle", "short",
                  "clip_short", "export", "report")  # fmt: skip
        for phase in phases:
            done = self.work / f"{phase}.done"
            if done.is_file():
                continue
            print(f"== {phase}", flush=True)
            t0 = time.time()
            torch.manual_seed(self.seed)  # model construction is seeded per phase
            getattr(self, f"phase_{phase}")()
            self.times[phase] = self.times.get(phase, 0.0) + time.time() - t0
            write_json_atomically(timings_path, self.times)
            done.write_text("ok\n")
        print(f"pretraining done; phase seconds: {json.dumps(self.times)}")

    def phase_data(self) -> None:
        render_data(self.work / "data.npz", self.seed, self.budget.scenes)

    def phase_masks(self) -> None:
        """Where the things are in each training scene: the VAE weighs those pixels more."""
        from attn_utils.toyworld.draw import object_mask

        world = scenes(self.seed, self.budget.scenes, training=True)
        masks = np.stack([object_mask(s, SIZE) for s in tqdm(world, desc="masks")])
        tmp = self.work / "masks.tmp.npz"
        np.savez(tmp, masks=(masks * 255).round().astype(np.uint8))
        os.replace(tmp, self.work / "masks.npz")

    def phase_vae(self) -> None:
        masks = np.load(self.work / "masks.npz", allow_pickle=False)["masks"]
        vae = make_vae()
        opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
        b = self.budget

        def loss_fn(step):
            idx, rng = self._batch("vae", step, b.vae_batch)
            m = torch.from_numpy(masks[idx]).float()[:, None] / 255
            xm = random_flip(torch.cat([to_unit(self.data["images"][idx]), m], 1), rng)
            x, m = xm[:, :3], xm[:, 3:]
            # bfloat16 autocast: the step is about 1.6x faster on a CPU with AVX512-BF16
            # (bench/toy_vae_step.py, docs/toyworld.md); the losses are taken in float32.
            with torch.autocast("cpu", dtype=torch.bfloat16):
                post = vae.encode(x).latent_dist
                eps = torch.randn(post.mean.shape, generator=torch_gen(rng))
                rec = vae.decode(post.mean + post.std * eps).sample
            err = rec.float() - x
            # The things are a fifth of the pixels but all of a concept's identity: their
            # pixels weigh 5x, or the VAE learns backgrounds and blurs what concepts are made of.
            w = 1 + 4 * m
            w = w / w.mean()
            return (w * err.abs()).mean() + (w * err.pow(2)).mean() + 1e-6 * post.kl().mean()

        train_phase("vae", self.work, b.vae_steps, {"vae": vae}, opt, loss_fn, self.every, lr=1e-3)
        vae.save_pretrained(str(self.work / "vae"), safe_serialization=True)

    def _vae(self):
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(str(self.work / "vae")).eval()

    @torch.no_grad()
    def phase_latents(self) -> None:
        vae = self._vae()
        means, stds = [], []
        images = self.data["images"]
        for s in tqdm(range(0, len(images), 256), desc="latents"):
            post = vae.encode(to_unit(images[s : s + 256])).latent_dist
            means.append(post.mean.half())
            stds.append(post.std.half())
        mean, std = torch.cat(means), torch.cat(stds)
        # SD's convention: scale latents to unit variance; the factor goes into the VAE config.
        scale = float(1.0 / mean.float().std())
        tmp = self.work / "latents.tmp.npz"
        np.savez(tmp, mean=mean.numpy(), std=std.numpy(), scale=np.float32(scale))
        os.replace(tmp, self.work / "latents.npz")

    def phase_unet(self) -> None:
        self._diffusion("unet", self.budget.unet_steps, 3e-4, short=SHORT_P)

    def phase_short(self) -> None:
        """The U-Net and text encoder go on from "unet" with shortened captions: a prompt may
        leave out sizes, colours, patterns and the second thing ("a photo of a toy at night")
        and still be in the model's distribution."""
        self._diffusion(
            "short", self.budget.short_steps, 1e-4, short=1.0, start_from="", save_as="_short"
        )

    def _diffusion(
        self,
        name: str,
        steps: int,
        lr: float,
        short: float,
        start_from: str | None = None,
        save_as: str = "",
    ) -> None:
        """Train a U-Net and text encoder for steps and save them as work/unet<save_as> and
        work/text_encoder<save_as>. start_from: the suffix of the saved pair to go on from;
        None builds a new pair."""
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        z = np.load(self.work / "latents.npz", allow_pickle=False)
        mean, std, scale = (
            torch.from_numpy(z["mean"]),
            torch.from_numpy(z["std"]),
            float(z["scale"]),
        )
        captions = self.data["captions"]
        masks = np.load(self.work / "masks.npz", allow_pickle=False)["masks"]
        sched = DDPMScheduler(**SD_SCHEDULER)
        alphas = sched.alphas_cumprod
        snr = alphas / (1 - alphas)
        if start_from is not None:  # from a finished phase's (EMA) weights
            unet = UNet2DConditionModel.from_pretrained(str(self.work / f"unet{start_from}"))
            text = CLIPTextModel.from_pretrained(str(self.work / f"text_encoder{start_from}"))
        else:
            unet, text = make_unet(), make_text_encoder(self.tokenizer)
        params = {f"unet.{k}": p for k, p in unet.named_parameters()}
        params.update({f"text.{k}": p for k, p in text.named_parameters()})
        ema = {k: p.detach().clone() for k, p in params.items()}
        opt = torch.optim.AdamW(params.values(), lr=lr, weight_decay=1e-2)
        b = self.budget

        def loss_fn(step):
            idx, rng = self._batch(name, step, b.unet_batch)
            g = torch_gen(rng)
            lat = mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, generator=g)
            lat = lat * scale
            texts = [
                "" if rng.random() < 0.1 else caption_text(str(captions[i]), rng, short)
                for i in idx
            ]  # 10 % unconditional, for classifier-free guidance
            ids = self.tokenizer(
                texts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
            ).input_ids
            t = torch.from_numpy(rng.integers(0, 1000, len(idx)))
            noise = torch.randn(lat.shape, generator=g)
            noisy = sched.add_noise(lat, noise, t)
            pred = unet(noisy, t, text(ids)[0]).sample
            # The things' latents weigh THING_WEIGHT x (each sample's weights averaging 1): they
            # are a fifth of the picture but all of its categories, colours and identities.
            cover = F.avg_pool2d(torch.from_numpy(masks[idx]).float()[:, None] / 255, 4)
            where = 1 + (THING_WEIGHT - 1) * cover
            where = where / where.mean(dim=(1, 2, 3), keepdim=True)
            # Min-SNR-5 weighting (Hang et al. 2023): faster convergence of a small model.
            w = (torch.clamp(snr[t], max=5.0) / snr[t]).float()
            return (w * ((pred - noise).pow(2) * where).mean(dim=(1, 2, 3))).mean()

        modules = {"unet": unet, "text": text}
        train_phase(name, self.work, steps, modules, opt, loss_fn, self.every, ema, params, lr)
        with torch.no_grad():  # export the EMA weights
            for k, p in params.items():
                p.copy_(ema[k])
        unet.save_pretrained(str(self.work / f"unet{save_as}"), safe_serialization=True)
        text.save_pretrained(str(self.work / f"text_encoder{save_as}"), safe_serialization=True)

    def phase_clip(self) -> None:
        self._clip("clip", self.budget.clip_steps, short=False)

    def phase_clip_short(self) -> None:
        """The toy CLIP goes on with shortened captions too (CLIP-T's texts are short)."""
        self._clip("clip_short", self.budget.clip_short_steps, short=True)

    def _clip(self, name: str, steps: int, short: bool) -> None:
        from transformers import CLIPModel

        if short:
            clip = CLIPModel.from_pretrained(str(self.work / "clip"))
        else:
            clip = make_clip(self.tokenizer)
        opt = torch.optim.AdamW(clip.parameters(), lr=5e-4, weight_decay=0.1)
        b = self.budget
        captions = self.data["captions"]
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]

        def loss_fn(step):
            idx, rng = self._batch(name, step, b.clip_batch)
            x = (random_flip(to_unit(self.data["images"][idx]), rng) + 1) / 2
            texts = [caption_text(str(captions[i]), rng, short) for i in idx]
            tok = self.tokenizer(texts, padding=True, return_tensors="pt")
            out = clip(
                input_ids=tok.input_ids,
                attention_mask=tok.attention_mask,
                pixel_values=(x - mean) / std,
            )
            # Identical captions in a batch are positives for each other, not negatives.
            same = torch.from_numpy(np.array([[a == b for b in texts] for a in texts])).float()
            target = same / same.sum(1, keepdim=True)
            lpi = out.logits_per_image
            return (
                -(
                    (target * lpi.log_softmax(1)).sum(1).mean()
                    + (target * lpi.t().log_softmax(1)).sum(1).mean()
                )
                / 2
            )

        train_phase(name, self.work, steps, {"clip": clip}, opt, loss_fn, self.every, lr=5e-4)
        clip.save_pretrained(str(self.work / name), safe_serialization=True)

    def phase_oracle(self) -> None:
        from attn_utils.toyworld.draw import IGNORE

        net = OracleNet(ORACLE_HEADS, dense=ORACLE_DENSE)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
        b = self.budget
        d = self.data
        maps = _oracle_labels(scenes(self.seed, b.scenes, training=True))

        def loss_fn(step):
            idx, rng = self._batch("oracle", step, b.oracle_batch)
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            out = net(_augment(to_unit(d["images"][idx]), flip, rng))
            loss = F.cross_entropy(out["place"], torch.from_numpy(d["place"][idx])) + (
                F.cross_entropy(out["style"], torch.from_numpy(d["style"][idx]))
            )
            for head in ORACLE_DENSE:  # per location, and the image-level presence it gives
                target = torch.from_numpy(maps[head][idx]).long()
                target = mirror(target, flip)
                loss = loss + F.cross_entropy(out[head], target, ignore_index=IGNORE)
                present = torch.from_numpy(d[head][idx]).float()
                p = presence(out[head]).clamp(1e-6, 1 - 1e-6)
                loss = loss + F.binary_cross_entropy(p, present)
            return loss

        train_phase(
            "oracle", self.work, b.oracle_steps, {"oracle": net}, opt, loss_fn, self.every, lr=2e-3
        )
        config = {"heads": ORACLE_HEADS, "dense": list(ORACLE_DENSE), "image_size": SIZE}
        Oracle(net, config).save(self.work / "oracle")

    def phase_export(self) -> None:
        from attn_utils.toyworld.export import export

        export(self)

    def phase_report(self) -> None:
        from attn_utils.toyworld.report import report

        report(self.out, self.work, self.seed, self.budget)


def main(args) -> None:
    """`python -m attn_utils.toyworld pretrain` (parsed in __main__.py)."""
    budget = QUICK if args.quick else FULL
    if args.scenes:
        budget = dataclasses.replace(budget, scenes=args.scenes)
    torch.set_num_threads(args.threads)
    argv = ["python", "-m", "attn_utils.toyworld", *sys.argv[1:]]
    Pretrainer(
        Path(args.work), Path(args.out), args.seed, budget, args.checkpoint_every, argv
    ).run()
