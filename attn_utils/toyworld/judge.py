"""The judge: a small CNN that says, per image, which concept individuals appear in it.

It is its own network, not an oracle head: the oracle is taught from captions' attributes and
is shipped and measured already; the judge learns looks no caption names, from renders of each
concept anywhere against its lookalikes (judge_data.py), clean, through the shipped toy VAE,
blurred and tinted. One sigmoid per concept, from the largest of a 1x1 head's logits over an
8x8 feature map, so a small concept counts as much as a big one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from attn_utils.evaluate.oracle import conv_body
from attn_utils.toyworld.draw import render
from attn_utils.toyworld.judge_data import KINDS, NAMES, concept_set, degrade, labels, lookalike_set
from attn_utils.toyworld.loop import step_rng, torch_gen

CONFIG, WEIGHTS, REPORT = "config.json", "model.safetensors", "report.json"
SIZE = 64
TARGETS = {"recognised": 0.95, "taken": 0.05}  # issue 29 item 2
# Images per concept (training: positives, each lookalike kind; ordinary scenes are shared).
TRAIN = {"concept": 600, "same_body": 200, "same_pattern": 200, "ordinary": 1000}
HELDOUT = 200  # per concept and per (concept, lookalike kind)


class JudgeNet(nn.Module):
    """Three stride-2 conv blocks to an 8x8 map, a 1x1 conv to one logit per concept per
    location, and the largest over locations."""

    def __init__(self, n: int, width: int = 32):
        super().__init__()
        self.body, c_in = conv_body((width, 2 * width, 3 * width), (2, 2, 2))
        self.head = nn.Conv2d(c_in, n, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, 3, 64, 64) in [-1, 1] -> (B, n) logits."""
        return self.head(self.body(x)).amax(dim=(2, 3))


def pixels(images) -> torch.Tensor:
    """(B, 3, 64, 64) in [-1, 1] from PIL images (resized bicubic if another size)."""
    from PIL import Image

    arrays = [
        np.asarray(im.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BICUBIC), np.float32)
        for im in images
    ]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1


@torch.inference_mode()
def reconstruct(vae, x: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """x through the VAE (the latent distribution's mode), as a generated image passes it."""
    out = [vae.decode(vae.encode(c).latent_dist.mode()).sample for c in x.split(batch)]
    return torch.cat(out).clamp(-1, 1)


def load_vae(base: Path):
    """The toy base model's VAE (base/vae), in eval mode."""
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(Path(base) / "vae")).eval()


def training_scenes() -> list:
    """Every training scene: each concept anywhere, its lookalikes, ordinary world scenes."""
    out = []
    for name in NAMES:
        out += concept_set("train", name, TRAIN["concept"])
        for kind in ("same_body", "same_pattern"):
            out += lookalike_set("train", name, kind, TRAIN[kind])
    return out + lookalike_set("train", "all", "ordinary", TRAIN["ordinary"])


def train(vae, seed: int = 0, steps: int = 1500, batch: int = 64, log=print) -> JudgeNet:
    """Train a JudgeNet on training_scenes(): each step's images are clean or VAE-reconstructed
    (half each), then blurred and tinted at random (degrade)."""
    scenes = training_scenes()
    y = torch.from_numpy(np.stack([labels(s) for s in scenes]))
    clean = pixels([render(s, SIZE) for s in scenes])
    recon = reconstruct(vae, clean)
    log(f"judge: {len(scenes)} training scenes rendered and reconstructed")
    torch.manual_seed(seed)
    net = JudgeNet(len(NAMES))
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        rng = step_rng(seed, "judge", step)
        idx = torch.randint(len(scenes), (batch,), generator=torch_gen(rng))
        use_recon = torch.from_numpy(rng.random(batch) < 0.5)[:, None, None, None]
        x = degrade(torch.where(use_recon, recon[idx], clean[idx]), rng)
        loss = F.binary_cross_entropy_with_logits(net(x), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"judge: step {step + 1}/{steps} loss {loss.item():.4f}")
    return net.eval()


@torch.inference_mode()
def probabilities(net: JudgeNet, x: torch.Tensor) -> np.ndarray:
    """(B, len(NAMES)) sigmoid probabilities."""
    return torch.cat([net(c).sigmoid() for c in x.split(256)]).numpy()


def measure(net: JudgeNet, vae, n: int = HELDOUT, threshold: float = 0.5) -> dict:
    """On held-out scenes, per concept: the rate of its images recognised and of each lookalike
    kind's taken for it, on clean renders, VAE reconstructions, and reconstructions blurred and
    tinted (degrade with a fixed generator)."""
    out: dict = {}
    for name in NAMES:
        j = NAMES.index(name)
        sets = {"concept": concept_set("heldout", name, n)}
        sets.update({k: lookalike_set("heldout", name, k, n) for k in KINDS})
        row: dict = {}
        for key, scenes in sets.items():
            clean = pixels([render(s, SIZE) for s in scenes])
            recon = reconstruct(vae, clean)
            noisy = degrade(recon, np.random.default_rng(list(sets).index(key)))
            rates = {}
            for cond, x in (("render", clean), ("vae", recon), ("vae_degraded", noisy)):
                rates[cond] = round(float((probabilities(net, x)[:, j] > threshold).mean()), 4)
            row["recognised" if key == "concept" else f"taken_{key}"] = rates
        out[name] = row
    return out


def meets_targets(measured: dict) -> bool:
    """Whether every concept's rates meet TARGETS in every condition."""
    for row in measured.values():
        for key, rates in row.items():
            for r in rates.values():
                ok = r >= TARGETS["recognised"] if key == "recognised" else r <= TARGETS["taken"]
                if not ok:
                    return False
    return True


class Judge:
    """A loaded judge: its net and the concept names its outputs are."""

    def __init__(self, net: JudgeNet, config: dict):
        self.net, self.names = net.eval(), list(config["names"])
        self.threshold = float(config.get("threshold", 0.5))

    @classmethod
    def load(cls, folder: str | Path) -> Judge:
        """From folder/config.json and model.safetensors, checked against the manifest.json
        beside the folder (attn_utils.models.verify_shipped): ConfigError if they differ."""
        from safetensors.torch import load_file

        from attn_utils.config import ConfigError
        from attn_utils.models import verify_shipped

        folder = Path(folder)
        for name in (CONFIG, WEIGHTS):
            if not (folder / name).is_file():
                raise ConfigError(f"--judge_model: {folder / name} does not exist")
        verify_shipped(folder, "--judge_model")
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        net = JudgeNet(len(config["names"]), int(config.get("width", 32)))
        net.load_state_dict(load_file(str(folder / WEIGHTS)))
        return cls(net, config)

    def predict(self, images) -> np.ndarray:
        """(B, len(names)) probabilities that each concept appears in each PIL image."""
        return probabilities(self.net, pixels(images))

    def sees(self, images, name: str) -> np.ndarray:
        """(B,) bool: whether the judge sees the named concept in each image."""
        return self.predict(images)[:, self.names.index(name)] > self.threshold


def write(out: Path, net: JudgeNet, measured: dict, info: dict) -> None:
    """out/config.json, model.safetensors, report.json (atomically), and, where a shipped
    manifest.json sits beside out, out's files listed in it."""
    from safetensors.torch import save_file

    from attn_utils.models import SHIPPED_KIND, SHIPPED_MANIFEST, file_sha256
    from attn_utils.runfiles import write_dir_atomically, write_text_atomically

    def fill(tmp: Path) -> None:
        config = {"kind": "toy world concept judge", "names": NAMES, "width": 32,
                  "image_size": SIZE, "threshold": 0.5}  # fmt: skip
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS))
        report = {**info, "targets": TARGETS, "meets_targets": meets_targets(measured),
                  "measured": measured}  # fmt: skip
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")

    out = Path(out)
    write_dir_atomically(out, fill)
    manifest = out.parent / SHIPPED_MANIFEST
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        if data.get("kind") == SHIPPED_KIND:
            files = {k: v for k, v in data["files"].items() if not k.startswith(f"{out.name}/")}
            for f in sorted(out.iterdir()):
                files[f"{out.name}/{f.name}"] = file_sha256(f)
            data["files"] = dict(sorted(files.items()))
            write_text_atomically(manifest, json.dumps(data, indent=2) + "\n")


def main(out: Path, base: Path, seed: int = 0, steps: int = 1500, threads: int = 2) -> None:
    """Train the judge, measure it on held-out scenes, write it under out."""
    torch.set_num_threads(threads)
    start = time.time()
    vae = load_vae(base)
    net = train(vae, seed, steps)
    measured = measure(net, vae, HELDOUT)
    info = {
        "command": f"python -m attn_utils.toyworld judge --out {out} --base {base} "
        f"--seed {seed} --steps {steps} --threads {threads}",
        "train_images": {**TRAIN, "per": "concept (ordinary: in all)"},
        "heldout_images": HELDOUT,
        "seconds": round(time.time() - start, 1),
    }
    write(out, net, measured, info)
    print(f"wrote {out} (meets targets: {meets_targets(measured)})")
