"""A LoRA stage's result merged into a U-Net, read the way diffusers reads it.

`stage_<k>/unet_lora/pytorch_lora_weights.safetensors` holds one stage's adapters as
diffusers' train_dreambooth_lora.py saves them ("unet."-prefixed keys in peft's names,
`<module>.lora_A.weight` / `.lora_B.weight`; no metadata: alpha / rank is folded into the
lora_B weights, so every reader applies it at scale 1). A stage's adapters were trained on
the U-Net that the stages before it left, so a run's U-Net is the base (or the newest full
unet/ folder) with each later LoRA merged in stage order. Training merges through the same
function, so a resumed run and an uninterrupted one hold bitwise the same U-Net.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from attn_utils.config import ConfigError, first_line
from attn_utils.runfiles import LORA_WEIGHTS, UNET_LORA_DIR

MERGE_ADAPTER = "attndreambooth_merge"  # lives only between loading and merging


def lora_folder(folder: str | Path) -> Path | None:
    """<folder>/unet_lora (or the folder itself) when it holds a LoRA file, else None."""
    for cand in (Path(folder) / UNET_LORA_DIR, Path(folder)):
        if (cand / LORA_WEIGHTS).is_file():
            return cand
    return None


def read_unet_lora(folder: str | Path) -> dict[str, torch.Tensor]:
    """The LoRA file of a unet_lora/ folder; one ConfigError naming it if it is unusable."""
    path = Path(folder) / LORA_WEIGHTS
    if not path.is_file():
        raise ConfigError(f"{path}: not found; the LoRA stage's result is incomplete")
    try:
        state = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - whatever is wrong, the file is unusable
        why = first_line(e, 200)
        raise ConfigError(f"{path}: not a readable safetensors file ({why})") from None
    if not state or not all(k.startswith("unet.") and "lora" in k for k in state):
        raise ConfigError(f"{path}: not a U-Net LoRA file (keys 'unet.<module>.lora...')")
    return state


def merge_unet_lora(unet, state: dict[str, torch.Tensor], where: str) -> None:
    """Add the adapters' low-rank products to the U-Net's weights (diffusers loads them, peft
    merges); the U-Net is a plain one again afterwards."""
    try:
        unet.load_lora_adapter(dict(state), prefix="unet", adapter_name=MERGE_ADAPTER)
    except (ValueError, RuntimeError, KeyError) as e:
        raise ConfigError(f"{where}: does not fit this U-Net ({first_line(e, 200)})") from None
    unet.fuse_lora(adapter_names=[MERGE_ADAPTER])
    unet.unload_lora()


def load_unet_lora(unet, folder: str | Path) -> None:
    """Merge a unet_lora/ folder into a resident U-Net."""
    merge_unet_lora(unet, read_unet_lora(folder), str(Path(folder) / LORA_WEIGHTS))
