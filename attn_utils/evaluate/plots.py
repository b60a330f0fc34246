"""A study's pictures (matplotlib, optional: the [eval] extra) and its report.md."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from attn_utils.evaluate.scoring import METRICS, TITLES

log = logging.getLogger(__name__)

SKIPPED = "plots skipped: matplotlib is not installed (pip install -e '.[eval]')"


def _pyplot():
    """matplotlib.pyplot with a file-only backend, or None when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")  # no display needed, and none is touched
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".tmp-{path.name}")
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    os.replace(tmp, path)


def identity_vs_text(plt, summary: dict, path: Path, identity: str = "dino") -> None:
    """Identity (DINO or CLIP-I) against CLIP-T: a large point per variant, small per concept."""
    fig, ax = plt.subplots(figsize=(6, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, row in enumerate(summary["rows"]):
        color = colors[i % len(colors)]
        pts = summary["per_concept"][row["variant"]].values()
        ax.scatter(
            [p["clip_t"] for p in pts], [p[identity] for p in pts], s=18, alpha=0.5, color=color
        )
        ax.scatter(
            row["clip_t"],
            row[identity],
            s=160,
            color=color,
            edgecolor="black",
            label=row["label"],
            zorder=3,
        )
    ax.set_xlabel("CLIP-T (text alignment)")
    ax.set_ylabel(f"{TITLES[identity]} (identity)")
    ax.set_title("Identity vs text alignment (large: mean over concepts)")
    ax.ticklabel_format(useOffset=False)  # plain values: readers compare them with tables
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)
    plt.close(fig)


def per_prompt_bars(plt, summary: dict, path: Path) -> None:
    """One panel per metric: a bar per prompt and variant (mean over concepts)."""
    variants = [r["variant"] for r in summary["rows"]]
    labels = {r["variant"]: r["label"] for r in summary["rows"]}
    prompts = list(summary["per_prompt"][variants[0]])
    n = len(variants)
    width = 0.8 / n
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(6, 0.45 * len(prompts) + 2), 9))
    for ax, m in zip(axes, METRICS):
        for j, v in enumerate(variants):
            vals = [summary["per_prompt"][v].get(p, {}).get(m, float("nan")) for p in prompts]
            xs = [i + (j - (n - 1) / 2) * width for i in range(len(prompts))]
            ax.bar(xs, vals, width=width, label=labels[v])
        ax.set_ylabel(TITLES[m])
        ax.set_xticks(range(len(prompts)))
        ax.set_xticklabels([])
        ax.grid(axis="y", alpha=0.3)
    axes[-1].set_xticklabels(prompts, rotation=70, ha="right", fontsize=7)
    axes[0].legend(fontsize=8)
    axes[0].set_title("Per prompt (mean over concepts)")
    _save(fig, path)
    plt.close(fig)


def write_plots(summary: dict, out: Path, identity: str = "dino") -> dict[str, str]:
    """{name: file} of the plots written; {} (and one log line) without matplotlib."""
    plt = _pyplot()
    if plt is None:
        log.warning(SKIPPED)
        print(SKIPPED)
        return {}
    identity_vs_text(plt, summary, out / "identity_vs_text.png", identity)
    per_prompt_bars(plt, summary, out / "per_prompt.png")
    return {"identity_vs_text": "identity_vs_text.png", "per_prompt": "per_prompt.png"}
