"""An oracle: a small classifier that knows a procedural world's attributes (place, style, the
categories and colours of its things), and the text-alignment score it gives a prompt.

The world's vocabulary lives in the oracle's own config.json, so this module knows no world:
the toy world (attn_utils/toyworld) trains one and evaluate.py loads it with --oracle_model.
Scene heads (place, style) classify the image's pooled features. Thing heads (category,
colour) are dense, detector-style: every location of a quarter-size feature map is classified
as nothing or one of the head's labels (trained on where the renderer drew each thing), and
an image shows a label where some location gives it p > 0.5, so a small thing counts as much
as a large one. A prompt is scored on the attributes it names: for each head, every label that
appears in the prompt as a whole word must be what the oracle sees (the argmax for a scene
head; present for a thing head).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


def conv_body(widths: tuple[int, ...], strides: tuple[int, ...]) -> tuple[nn.Sequential, int]:
    """A plain image tower of (conv, group norm, SiLU) x 2 blocks, one per width, and the
    channels it ends with; the oracle's and the toy judge's."""
    layers, c_in = [], 3
    for c_out, stride in zip(widths, strides):
        layers += [
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
            nn.Conv2d(c_out, c_out, 3, padding=1),
            nn.GroupNorm(8, c_out),
            nn.SiLU(),
        ]
        c_in = c_out
    return nn.Sequential(*layers), c_in


class OracleNet(nn.Module):
    """Four conv blocks (strides 2, 2, 1, 1: a map of a quarter of the input's side). Scene
    heads: a linear layer on the map's mean. Dense heads: a 1x1 conv giving, per location,
    logits of (nothing, *labels)."""

    def __init__(self, heads: dict[str, list[str]], width: int = 32, dense: tuple = ()):
        super().__init__()
        self.body, c_in = conv_body((width, 2 * width, 3 * width, 3 * width), (2, 2, 1, 1))
        self.dense = tuple(dense)
        self.heads = nn.ModuleDict(
            {
                k: nn.Conv2d(c_in, len(v) + 1, 1) if k in self.dense else nn.Linear(c_in, len(v))
                for k, v in heads.items()
            }
        )

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x: (B, 3, H, W) in [-1, 1] -> {scene head: (B, labels) logits, dense head:
        (B, 1 + labels, H/4, W/4) logits, channel 0 meaning nothing}."""
        h = self.body(x)
        pooled = h.mean(dim=(2, 3))
        return {k: head(h if k in self.dense else pooled) for k, head in self.heads.items()}


def presence(dense_logits: torch.Tensor) -> torch.Tensor:
    """(B, 1 + L, h, w) logits -> (B, L): per label, its largest probability over locations
    (after a 2x2 average, so one stray location does not make a thing)."""
    p = F.avg_pool2d(dense_logits.softmax(1), 2, stride=1)
    return p[:, 1:].amax(dim=(2, 3))


def to_pixels(images: list[Image.Image], size: int) -> torch.Tensor:
    """(B, 3, size, size) in [-1, 1]: each image resized (bicubic) to the oracle's input."""
    arrays = [
        np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BICUBIC), np.float32)
        for im in images
    ]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return x / 127.5 - 1


class Oracle:
    """A loaded oracle: its net, heads {name: labels}, which heads are multi-label, input size."""

    def __init__(self, net: OracleNet, config: dict):
        self.net = net.eval()
        self.heads: dict[str, list[str]] = config["heads"]
        self.dense = set(config.get("dense", []))
        self.multi_label = set(config.get("multi_label", [])) | self.dense
        self.image_size = int(config["image_size"])

    @classmethod
    def load(cls, folder: str | Path) -> Oracle:
        """From folder/config.json and folder/model.safetensors; ValueError naming what lacks."""
        from safetensors.torch import load_file

        folder = Path(folder)
        for name in (CONFIG, WEIGHTS):
            if not (folder / name).is_file():
                raise ValueError(f"--oracle_model: {folder / name} does not exist")
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        net = OracleNet(config["heads"], config.get("width", 32), tuple(config.get("dense", ())))
        net.load_state_dict(load_file(str(folder / WEIGHTS)))
        return cls(net, config)

    def save(self, folder: str | Path, extra: dict | None = None) -> None:
        """Write config.json and model.safetensors into folder."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "heads": self.heads,
            "multi_label": sorted(self.multi_label),
            "image_size": self.image_size,
            "width": self.net.body[0].out_channels,
            "dense": list(self.net.dense),
            **(extra or {}),
        }
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        state = {k: v.contiguous() for k, v in self.net.state_dict().items()}
        save_file(state, str(folder / WEIGHTS))

    @torch.inference_mode()
    def predict(self, images: list[Image.Image]) -> dict[str, np.ndarray]:
        """{head: (B, labels)} probabilities: softmax for a scene head, presence for a dense
        head, sigmoid for another multi-label head."""
        logits = self.net(to_pixels(images, self.image_size))
        out = {}
        for k, v in logits.items():
            if k in self.dense:
                out[k] = presence(v).numpy()
            else:
                out[k] = (v.sigmoid() if k in self.multi_label else v.softmax(-1)).numpy()
        return out

    def named(self, prompt: str) -> dict[str, list[int]]:
        """{head: indices of its labels the prompt names as whole words}; empty heads omitted."""
        words = set(re.findall(r"[a-z]+", prompt.lower()))
        out = {}
        for head, labels in self.heads.items():
            hit = [i for i, label in enumerate(labels) if label in words]
            if hit:
                out[head] = hit
        return out

    def checks(self, probs: dict[str, np.ndarray], row: int, prompt: str) -> dict[str, bool]:
        """{head: whether what the prompt names in it is what the oracle sees in image row}."""
        out = {}
        for head, hit in self.named(prompt).items():
            p = probs[head][row]
            if head in self.multi_label:
                out[head] = bool(all(p[i] > 0.5 for i in hit))
            else:  # one label per image: the prompt's (first) label must be the argmax
                out[head] = int(p.argmax()) == hit[0]
        return out

    def scores(self, images: list[Image.Image], prompts: list[str]) -> np.ndarray:
        """(B,) per image: the fraction of the prompt's named attributes the oracle confirms
        (nan where the prompt names none)."""
        probs = self.predict(images)
        out = np.full(len(images), np.nan)
        for row, prompt in enumerate(prompts):
            checks = self.checks(probs, row, prompt)
            if checks:
                out[row] = float(np.mean(list(checks.values())))
        return out
