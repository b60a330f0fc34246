"""Pipelines from a base model plus what a run learned: prompt files, heatmaps, export.

Never imports train/.
"""
