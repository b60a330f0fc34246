"""The paper's math: attention capture, losses, one micro-step, tokens, prompt templates.

Imports no loop, pipeline or file code.
"""
