"""A study's aggregate: mean ± std over concepts, per variant and per prompt class.

Each concept counts once: its own mean over images is one sample of the study's mean, so a
concept with more images does not weigh more.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

import numpy as np

from attn_utils.evaluate.plots import SKIPPED, write_plots
from attn_utils.evaluate.scoring import METRICS, PROMPT_CLASSES, TITLES, mean_std, metric_keys
from attn_utils.evaluate.study_plan import metrics_path
from attn_utils.runfiles import write_text_atomically

log = logging.getLogger(__name__)


def _mean_std(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, dtype=np.float64)
    return float(v.mean()), float(v.std())


def _row(samples: list[dict], keys: tuple[str, ...] = METRICS) -> dict:
    """{metric, metric_std, n_concepts} over per-concept results."""
    out: dict = {"n_concepts": len(samples)}
    for m in keys:
        out[m], out[f"{m}_std"] = _mean_std([s[m] for s in samples])
    return out


def summarize(results: dict[str, dict[str, dict]], labels: dict[str, str]) -> dict:
    """results[variant][concept] = a metrics.json result -> the study's tables."""
    rows, per_class, per_prompt, per_concept = [], {}, {}, {}
    every = [metric_keys(r) for by_concept in results.values() for r in by_concept.values()]
    keys = tuple(m for m in every[0] if all(m in k for k in every)) if every else METRICS
    for v, by_concept in results.items():
        overall = [r["overall"] for r in by_concept.values()]
        n_images = sum(o["n_images"] for o in overall)
        rows.append(
            {"variant": v, "label": labels.get(v, v), **_row(overall, keys), "n_images": n_images}
        )
        per_concept[v] = {c: {m: r["overall"][m] for m in keys} for c, r in by_concept.items()}
        per_class[v] = {}
        for cls in PROMPT_CLASSES:
            got = [r["per_class"][cls] for r in by_concept.values() if cls in r["per_class"]]
            if got:
                per_class[v][cls] = {**_row(got, keys), "n_prompts": got[0]["n_prompts"]}
        prompts: dict[str, list[dict]] = {}
        for r in by_concept.values():
            for p in r["per_prompt"]:
                prompts.setdefault(p["template"], []).append(p)
        per_prompt[v] = {
            t: {**_row(ps, keys), "class": ps[0]["class"]} for t, ps in prompts.items()
        }
    return {
        "format": 1,
        "metrics": list(keys),
        "rows": rows,
        "per_class": per_class,
        "per_prompt": per_prompt,
        "per_concept": per_concept,
    }


def summary_md(summary: dict, title: str) -> str:
    """The study's table, its per-class table and its per-concept table."""
    keys = summary.get("metrics", METRICS)
    metrics = " | ".join(TITLES[m] for m in keys)
    lines = [f"# {title}", "", "Mean ± std over concepts (each concept: its mean over images).", ""]
    lines += [f"| method | concepts | {metrics} |", "|---|---|" + "---|" * len(keys)]
    for r in summary["rows"]:
        cells = " | ".join(mean_std(r, m) for m in keys)
        lines.append(f"| {r['label']} | {r['n_concepts']} | {cells} |")
    lines += ["", "## Per prompt class", ""]
    lines += [f"| method | class | prompts | {metrics} |", "|---|---|---|" + "---|" * len(keys)]
    labels = {r["variant"]: r["label"] for r in summary["rows"]}
    for v, classes in summary["per_class"].items():
        for cls, r in classes.items():
            cells = " | ".join(mean_std(r, m) for m in keys)
            lines.append(f"| {labels[v]} | {cls} | {r['n_prompts']} | {cells} |")
    return "\n".join(lines) + "\n"


def summary_csv(summary: dict) -> str:
    """One row per variant (overall) and per variant and prompt class."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    metrics = summary.get("metrics", METRICS)
    keys = [*metrics, *(f"{m}_std" for m in metrics)]
    w.writerow(["variant", "label", "class", "n_concepts", *keys])
    labels = {r["variant"]: r["label"] for r in summary["rows"]}
    for r in summary["rows"]:
        w.writerow([r["variant"], r["label"], "all", r["n_concepts"], *(r[k] for k in keys)])
    for v, classes in summary["per_class"].items():
        for cls, r in classes.items():
            w.writerow([v, labels[v], cls, r["n_concepts"], *(r[k] for k in keys)])
    return buf.getvalue()


def write_report(summary: dict, plan, results: dict, plots: dict[str, str]) -> Path:
    """report.md: the tables, the plots, and each concept's overview next to its numbers."""
    lines = [summary_md(summary, f"Study report: {plan.out.name}")]
    if plots:
        lines += [f"![{name}]({file})\n" for name, file in plots.items()]
    else:
        lines.append(f"_{SKIPPED}._\n")
    lines.append("## Concepts\n")
    keys = summary.get("metrics", METRICS)
    head = "| variant | " + " | ".join(TITLES[m] for m in keys) + " |"
    for c in plan.concepts:
        lines += [f"### {c.name} ({c.category})", "", head, "|---|" + "---|" * len(keys)]
        for v in plan.variants:
            o = results[v.name][c.name]["overall"]
            lines.append(f"| {v.label} | " + " | ".join(f"{o[m]:.4f}" for m in keys) + " |")
        lines.append("")
        for v in plan.variants:
            rel = f"concepts/{c.name}/{v.name}/overview.png"
            lines.append(f"{v.label}: first image of each prompt\n\n![{c.name} {v.name}]({rel})\n")
    path = plan.out / "report.md"
    write_text_atomically(path, "\n".join(lines))
    return path


def write_summary(plan) -> Path:
    """Collect every metrics.json of the plan; write summary.*, the plots and report.md."""
    results = {
        v.name: {c.name: json.loads(metrics_path(plan, c, v).read_text()) for c in plan.concepts}
        for v in plan.variants
    }
    labels = {v.name: v.label for v in plan.variants}
    summary = summarize(results, labels)
    summary["protocol"] = plan.protocol()
    summary["concepts"] = [c.name for c in plan.concepts]
    out = plan.out
    write_text_atomically(out / "summary.csv", summary_csv(summary))
    write_text_atomically(out / "summary.md", summary_md(summary, f"Study: {out.name}"))
    identity = plan.metric_settings.get("identity_metric", "dino")
    plots = write_plots(summary, out, identity)
    write_report(summary, plan, results, plots)
    write_text_atomically(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    print(summary_md(summary, f"Study: {out.name}"))
    return out / "summary.json"
