"""The toy world's VAE training step on the CPU, float32 against bfloat16 autocast.

    python bench/toy_vae_step.py [--steps 20] [--batch 32] [--threads 2]

Times forward and backward of the pretraining's VAE (attn_utils/toyworld/nets.py) on random
64 px batches, both ways in the same process, alternating blocks of steps so that a busy
machine slows both alike, and prints the ratio. On CPUs without AVX512-BF16 or AMX the
bfloat16 path can be slower; pretrain.py's choice rests on this ratio measured on the 2-core
machine docs/toyworld.md names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from attn_utils.toyworld.nets import SIZE, make_vae  # noqa: E402
from bench.interleaved import time_interleaved  # noqa: E402


def step(vae, opt, x: torch.Tensor, bf16: bool) -> None:
    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    with ctx:
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.mean + post.std * torch.randn_like(post.mean)).sample
    loss = (rec.float() - x).abs().mean()
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per way")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-4)
    x = torch.rand(args.batch, 3, SIZE, SIZE) * 2 - 1
    per_step, _, n = time_interleaved(
        {"float32": lambda: step(vae, opt, x, False), "bfloat16": lambda: step(vae, opt, x, True)},
        args.steps,
    )
    result = {
        "batch": args.batch,
        "threads": args.threads,
        "steps_each": n,
        "float32_s_per_step": round(per_step["float32"], 4),
        "bfloat16_s_per_step": round(per_step["bfloat16"], 4),
        "speedup_bf16": round(per_step["float32"] / per_step["bfloat16"], 3),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
