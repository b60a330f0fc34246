"""What the explicit cross-attention path keeps for the backward pass, measured on the CPU.

    python bench/attn2_saved_memory.py

One attention layer of each SDXL resolution at 1024 px (64x64 latents: 640 channels, 10
heads; 32x32: 1280 channels, 20 heads; 77 text tokens 2048 wide), batch 1: the bytes of
every tensor autograd saves (saved_tensors_hooks, each storage counted once) with our capture
processor and with the fused SDPA processor. The difference over heads x N x 77 is the cost
per attention probability (docs/performance.md, "SDXL").
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers.models.attention_processor import Attention, AttnProcessor2_0  # noqa: E402

from attn_utils.method.capture import CrossAttnCaptureProcessor, TokenStats  # noqa: E402

LAYERS = ((4096, 640, 10), (1024, 1280, 20))  # (pixels N, channels, heads)


def saved_bytes(capture: bool, n: int, ch: int, heads: int, bf16: bool) -> int:
    torch.manual_seed(0)
    attn = Attention(query_dim=ch, cross_attention_dim=2048, heads=heads, dim_head=64)
    stats = TokenStats()
    stats.columns = torch.tensor([[5, 6]], device="cpu")
    fused = AttnProcessor2_0()
    attn.set_processor(CrossAttnCaptureProcessor("l", stats, fused) if capture else fused)
    x = torch.randn(1, n, ch, requires_grad=True)
    enc = torch.randn(1, 77, 2048)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            attn(x, encoder_hidden_states=enc)
    return sum(seen.values())


def main() -> None:
    for n, ch, heads in LAYERS:
        for bf16 in (False, True):
            extra = saved_bytes(True, n, ch, heads, bf16) - saved_bytes(False, n, ch, heads, bf16)
            per = extra / (heads * n * 77)
            print(f"N={n} heads={heads} {'bf16 autocast' if bf16 else 'fp32'}: the capture "
                  f"keeps {extra / 2**20:.1f} MiB more than fused, {per:.2f} bytes per "
                  "probability")  # fmt: skip


if __name__ == "__main__":
    main()
