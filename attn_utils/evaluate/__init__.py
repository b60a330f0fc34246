"""Metric models, scoring, studies, summaries and plots: the top layer."""
