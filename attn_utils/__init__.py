"""AttnDreamBooth's library; docs/architecture.md maps its layers."""

from attn_utils.quiet import hide_torchvision_fallback_notice

hide_torchvision_fallback_notice()  # before any module imports transformers
