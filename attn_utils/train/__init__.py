"""The stage loop and what it delegates to.

Recipes (--method), data, latents, prior preservation, optimiser and run time,
checkpoints, placement and speed flags.
"""
