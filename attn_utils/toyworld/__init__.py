"""The toy world (issue 18): procedural scenes with compositional captions and concept folders.

world.py holds the vocabulary, the scene spec, the seeded sampler, captions and the tokenizer;
draw.py renders a scene to a PIL image; concepts.py holds the concept individuals and writes
their folders; ``python -m attn_utils.toyworld`` is the command line. docs/toyworld.md describes
the world. The pretrained toy model, the metric models and the study are still to come.
"""
