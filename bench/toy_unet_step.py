"""The toy world's diffusion training step on the CPU: float32, bfloat16 autocast and
torch.compile, measured against each other in one run.

    python bench/toy_unet_step.py [--steps 20] [--batch 64] [--threads 2] [--no_compile]

Times forward and backward of the pretraining's U-Net with its text encoder
(attn_utils/toyworld/nets.py; captions padded to 77 tokens, as pretrain.py does) on random
latents, the ways in turn in blocks of steps so that a busy machine slows them alike, and
prints each way's seconds per step and its speedup over float32. The compiled way's first
call (the compilation) is reported apart and left out of its time. docs/toyworld.md says why
the pretraining runs this step in float32 and eagerly: on the 2-core machine it names neither
other way was faster, unlike the VAE's step (bench/toy_vae_step.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_utils.toyworld.nets import SIZE, make_text_encoder, make_unet  # noqa: E402
from attn_utils.toyworld.world import build_tokenizer  # noqa: E402
from bench.interleaved import time_interleaved  # noqa: E402

CAPTION = "a photo of a big red toy next to a small blue ball on the beach"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per way")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no_compile", action="store_true", help="leave torch.compile out")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer(Path(tmp) / "tokenizer")
    unet, text = make_unet(), make_text_encoder(tokenizer)
    opt = torch.optim.AdamW([*unet.parameters(), *text.parameters()], lr=1e-4)
    ids = tokenizer(
        [CAPTION] * args.batch, padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    side = unet.config.sample_size
    x = torch.randn(args.batch, unet.config.in_channels, side, side)
    t = torch.randint(0, 1000, (args.batch,))

    def forward(x, t, ids):
        return unet(x, t, text(ids)[0]).sample

    def step(fn, bf16: bool) -> None:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with ctx:
            pred = fn(x, t, ids)
        loss = pred.float().pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    ways = {"float32": lambda: step(forward, False), "bfloat16": lambda: step(forward, True)}
    if not args.no_compile:
        compiled = torch.compile(forward)
        ways["compiled"] = lambda: step(compiled, False)
    per_step, first, n = time_interleaved(ways, args.steps)  # compiles in its first call
    result = {
        "image_size": SIZE,
        "latent": [unet.config.in_channels, side, side],
        "batch": args.batch,
        "threads": args.threads,
        "steps_each": n,
        **{f"{w}_s_per_step": round(s, 4) for w, s in per_step.items()},
        **{
            f"speedup_{w}": round(per_step["float32"] / s, 3)
            for w, s in per_step.items()
            if w != "float32"
        },
    }
    if "compiled" in ways:
        result["compiled_first_call_s"] = round(first["compiled"], 1)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
