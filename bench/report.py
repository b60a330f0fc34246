"""Benchmark report: ratios, the projected recipe time, and the markdown tables."""

from __future__ import annotations

from bench.modes import RECIPES


def summarise(report: dict) -> None:
    """Add ratios and the projected recipe time to the report, in place."""
    rows = {(r["variant"], r["stage"], r["mode"]): r for r in report["results"]}
    base = report["variants"][0]
    steps = RECIPES[report["config"]["recipe"]]
    ratios, projection = [], []
    measured = {r["variant"] for r in report["results"]}
    for v in (v for v in report["variants"] if v in measured):  # failed ones: in "errors"
        for s in report["config"]["stages"]:
            ours, orig = rows.get((v, s, "ours")), rows.get((v, s, "original"))
            b, both = rows.get((base, s, "ours")), ours and orig
            ratios.append(dict(
                variant=v, stage=s,
                speedup_vs_original=orig["ms"] / ours["ms"] if both else None,
                memory_vs_original=ours["peak_mib"] / orig["peak_mib"] if both else None,
                speedup_vs_baseline=b["ms"] / ours["ms"] if ours and b else None,
            ))  # fmt: skip
        for mode in report["config"]["modes"]:
            got = {s: rows[(v, s, mode)]["ms"] for s in steps if (v, s, mode) in rows}
            if got:
                per = {s: ms * steps[s] / 1e3 for s, ms in got.items()}
                projection.append(dict(
                    variant=v, mode=mode, recipe_s=sum(per.values()), per_stage_s=per,
                    complete=len(got) == len(steps),
                ))  # fmt: skip
    report["ratios"], report["projection"] = ratios, projection


def _f(x: float | None, spec: str = "{:.1f}") -> str:
    return "n/a" if x is None else spec.format(x)


def _trainable_table(report: dict, rows: dict) -> list[str]:
    """What each variant trains (ours): parameters and optimiser-state bytes against the
    baseline variant (LoRA against full fine-tuning when the baseline is a full one)."""
    base = report["variants"][0]
    out = [
        "",
        f"Trained parameters and optimiser state (ours; baseline {base}):",
        "",
        "| variant | stage | trained params | optimiser state MiB | params vs baseline "
        "| state vs baseline |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for q in report["ratios"]:
        o, b = rows.get((q["variant"], q["stage"], "ours")), rows.get((base, q["stage"], "ours"))
        if not o or "optimizer_bytes" not in o:
            continue
        rel = [o[k] / b[k] if b and b.get(k) else None for k in ("trainable", "optimizer_bytes")]
        out.append(
            f"| {q['variant']} | {q['stage']} | {o['trainable']:,} "
            f"| {o['optimizer_bytes'] / 2**20:.2f} | {_f(rel[0], '{:.4f}x')} "
            f"| {_f(rel[1], '{:.4f}x')} |"
        )
    return out


def markdown(report: dict) -> str:
    """The report as markdown tables: steps, projected recipe, validation, errors."""
    c, env = report["config"], report["env"] or {}
    where = env.get("gpu") or f"{env.get('cpu', '?')}, {env.get('cpu_threads', '?')} threads"
    metric = next((r["memory_metric"] for r in report["results"]), "n/a")
    rows = {(r["variant"], r["stage"], r["mode"]): r for r in report["results"]}
    out = [
        f"### Training step: {c['model']} shapes, {c['resolution']} px, batch {c['batch_size']}, "
        f"{c['device']} ({where})",
        "",
        f"Median of {c['steps']} timed steps after {c['warmup']} warm-up. Memory: {metric}. "
        f"torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
        f"transformers {env.get('transformers')}. Speedups: reference ms / this ms; "
        f"baseline = {report['variants'][0]} (ours).",
        "",
        "| variant | stage | ours ms/step | original ms/step | speedup vs original "
        "| ours peak MiB | original peak MiB | speedup vs baseline |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for q in report["ratios"]:
        o = rows.get((q["variant"], q["stage"], "ours")) or {}
        g = rows.get((q["variant"], q["stage"], "original")) or {}
        out.append(
            f"| {q['variant']} | {q['stage']} | {_f(o.get('ms'))} | {_f(g.get('ms'))} "
            f"| {_f(q['speedup_vs_original'], '{:.2f}x')} | {_f(o.get('peak_mib'), '{:.0f}')} "
            f"| {_f(g.get('peak_mib'), '{:.0f}')} | {_f(q['speedup_vs_baseline'], '{:.2f}x')} |"
        )
    steps = "/".join(str(n) for n in c["recipe_steps"].values())
    out += [
        "",
        f"Projected training time of the {c['recipe']} recipe ({steps} steps at batch "
        f"{c['batch_size']}; median step x steps, summed over stages; no loading or validation):",
        "",
        "| variant | mode | stage 1 s | stage 2 s | stage 3 s | recipe s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for pr in report["projection"]:
        per = [_f(pr["per_stage_s"].get(s)) for s in (1, 2, 3)]
        total = _f(pr["recipe_s"]) + ("" if pr["complete"] else " (partial)")
        out.append(f"| {pr['variant']} | {pr['mode']} | {' | '.join(per)} | {total} |")
    out += _trainable_table(report, rows)
    val = report.get("validation")
    if val and "error" not in val:
        out += [
            "",
            f"Validation pipeline, {c['model']} shapes ({val['validations_in_recipe']} "
            "validations in the recipe):",
            "",
            "| how | ms per validation | recipe total s |",
            "|---|---:|---:|",
            f"| resident modules (make_pipeline) | {val['resident_ms']:.1f} "
            f"| {val['resident_ms'] * val['validations_in_recipe'] / 1e3:.3f} |",
            f"| reload from disk (from_pretrained + .to(device), page cache warm) "
            f"| {val['reload_ms']:.1f} | {val['reload_recipe_s']:.1f} |",
        ]
    if report.get("pool_ms"):
        pools = ", ".join(f"{k}: {v:.0f} ms" for k, v in report["pool_ms"].items())
        out += ["", f"Latent pool build (once per run, not in the projection): {pools}."]
    errors = report["errors"] + (
        [{"variant": "validation", **val}] if val and "error" in val else []
    )
    out += [""] + [f"- not measured: {e['variant']}: {e['error']}" for e in errors]
    return "\n".join(out).rstrip() + "\n"
