"""Prompt templates of the Textual Inversion baseline (--method ti), kept as data.

These are the 27 object templates ("imagenet_templates_small") that the diffusers
textual_inversion example samples one of per image. '{}' marks the concept; here it becomes
'<placeholder tokens> <category>', the convention every method of this project trains and
renders with (docs/methods.md explains the difference from the example, which writes the
token alone).
"""

TI_OBJECT_TEMPLATES = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
]
