"""Score one inference.py output folder: per image, per prompt, per prompt class, overall.

Writes metrics.json, metrics.csv and metrics.md (each atomically). The real photos are
embedded once; generated images are read from the folder's index.json, batch by batch.
"""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np

from attn_utils.config import ConfigError
from attn_utils.evaluate.metrics import MetricModels, clip_t_scores, clip_t_text, pairwise_mean
from attn_utils.images import load_image, load_instance_images, shown
from attn_utils.runfiles import write_text_atomically

METRICS = ("clip_t", "clip_i", "dino")
# With --oracle_model (a world that has one, such as the toy world's), a fourth column: the
# fraction of the attributes a prompt names that the oracle sees (evaluate/oracle.py).
ORACLE = "oracle"
TITLES = {"clip_t": "CLIP-T", "clip_i": "CLIP-I", "dino": "DINO", ORACLE: "Oracle"}


def metric_keys(result: dict) -> tuple[str, ...]:
    """The metrics a metrics.json result holds: METRICS, then the oracle's if it was used."""
    return tuple(result.get("settings", {}).get("metrics", METRICS))


PROMPT_CLASSES = ("background", "style", "accessory", "property")
_STYLE = re.compile(
    r"\b(painting|sketch|drawing|illustration|in the style|style of|render|rendering|cartoon|"
    r"statue|sculpture|made of|lego|anime|origami|pixel art|mosaic|comic|engraving|pop art|"
    r"ukiyo-e|graffiti|stained glass|embroidery|claymation|low poly)\b",
    re.I,
)
_ACCESSORY = re.compile(
    r"\b(wearing|outfit|costume|armou?r|holding|with (a|an) (\w+ )?(hat|scarf|crown|cape))\b", re.I
)
# Words between the article and {} modify the subject itself: "a red {}", "a cube shaped {}".
_PROPERTY = re.compile(
    r"^(?:an? (?:photo|picture) of )?(?:an?|the)\s+(?P<adj>[^{}]+?)\s*\{\}", re.I
)


def prompt_class(template: str) -> str:
    """style > accessory > property > background (recontextualisation), from the wording."""
    if _STYLE.search(template):
        return "style"
    if _ACCESSORY.search(template):
        return "accessory"
    m = _PROPERTY.match(template.strip())
    if m and m.group("adj").split()[-1].lower() not in (
        "of",
        "with",
        "and",
        "by",
        "like",
        "a",
        "an",
        "the",
    ):
        return "property"  # not "a photo of {}"
    return "background"


def placeholder_words(settings: dict) -> list[str]:
    """The rendering's placeholder tokens and DreamBooth identifier (index.json's settings)."""
    words = [t for t in settings.get("tokens") or [] if isinstance(t, str)]
    ident = settings.get("identifier")
    return words + ([ident] if isinstance(ident, str) and ident else [])


def read_index(samples_dir: str | Path) -> tuple[dict, list[dict]]:
    """(index.json, [{prompt, template, files: [Path], grid}]) of an inference.py folder."""
    root = Path(samples_dir)
    path = root / "index.json"
    if not path.is_file():
        raise ConfigError(
            f"--samples_dir: {shown(path)} not found (not an inference.py output folder, "
            "or its rendering did not finish)"
        )
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        entries = index["prompts"]
        prompts = [
            {
                "prompt": p,
                "template": e.get("template", p),
                "files": [root / f for f in e["files"]],
                "grid": e.get("grid"),
            }
            for p, e in entries.items()
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ConfigError(f"--samples_dir: {shown(path)} is not a valid index ({e!r})") from None
    if not prompts:
        raise ConfigError(f"--samples_dir: {shown(path)} lists no prompts")
    for p in prompts:
        if not p["files"]:  # its means would be NaN, and metrics.json invalid JSON
            raise ConfigError(
                f"--samples_dir: {shown(path)} lists no images for prompt {p['prompt']!r} "
                "(an unfinished or edited render; render it again)"
            )
        for f in p["files"]:
            if not f.is_file():
                raise ConfigError(f"--samples_dir: {shown(f)} listed in index.json is missing")
    return index, prompts


def embed_real(models: MetricModels, folder: str | Path, skip_bad: bool = False) -> dict:
    """{clip, dino: (R, D) unit embeddings, files} of a concept's photos, computed once."""
    images, paths = load_instance_images(folder, 0, skip_bad)
    clip, dino = models.embed_images(images, lambda im: im, desc="real images")
    return {"clip": clip, "dino": dino, "files": [str(p) for p in paths]}


def _stats(rows: list[dict], keys: tuple[str, ...] = METRICS) -> dict:
    out: dict = {"n_images": len(rows)}
    for m in keys:
        v = np.array([r[m] for r in rows], dtype=np.float64)
        v = v[~np.isnan(v)]  # the oracle has nothing to check in a prompt naming no attribute
        out[m], out[f"{m}_std"] = (float(v.mean()), float(v.std())) if len(v) else (np.nan,) * 2
    return out


def oracle_scores(oracle, files: list[Path], texts: list[str], batch: int = 64) -> np.ndarray:
    """(N,) the oracle's text-alignment score of each image against its prompt's text."""
    out = []
    for s in range(0, len(files), batch):
        images = [load_image(f) for f in files[s : s + batch]]
        out.append(oracle.scores(images, texts[s : s + batch]))
    return np.concatenate(out) if out else np.zeros(0)


def score_samples(
    models: MetricModels,
    samples_dir: str | Path,
    real: dict,
    category: str,
    text_mode: str = "category",
) -> dict:
    """Every metric per image, per prompt, per prompt class and overall (mean over images)."""
    index, prompts = read_index(samples_dir)
    files = [f for p in prompts for f in p["files"]]
    owner = [i for i, p in enumerate(prompts) for _ in p["files"]]  # prompt of each image
    gen_clip, gen_dino = models.embed_images(files, load_image, desc="generated images")
    hidden = placeholder_words(index.get("settings", {}))  # never in CLIP-T's text
    texts = [clip_t_text(p["template"], category, text_mode, hidden) for p in prompts]
    text_emb = models.clip_text(texts)[owner]  # (N, D): each image's prompt text
    clip_t = clip_t_scores(gen_clip, text_emb)
    clip_i = pairwise_mean(gen_clip, real["clip"])
    dino = pairwise_mean(gen_dino, real["dino"])
    oracle = getattr(models, "oracle", None)
    keys = METRICS + ((ORACLE,) if oracle is not None else ())
    if oracle is not None:  # the prompt with {} -> category: the words the oracle can check
        named = [clip_t_text(p["template"], category, "category", hidden) for p in prompts]
        oracle_of = oracle_scores(oracle, files, [named[o] for o in owner])
    root = Path(samples_dir)
    per_image = [
        {
            "file": f.relative_to(root).as_posix(),
            "prompt": prompts[owner[i]]["prompt"],
            "clip_t": float(clip_t[i]),
            "clip_i": float(clip_i[i]),
            "dino": float(dino[i]),
            **({ORACLE: float(oracle_of[i])} if oracle is not None else {}),
        }
        for i, f in enumerate(files)
    ]
    per_prompt, by_class = [], {}
    for i, p in enumerate(prompts):
        rows = [r for r, o in zip(per_image, owner) if o == i]
        cls = prompt_class(p["template"])
        by_class.setdefault(cls, []).extend(rows)
        entry = {"prompt": p["prompt"], "template": p["template"], "text": texts[i]}
        per_prompt.append({**entry, "class": cls, "grid": p["grid"], **_stats(rows, keys)})
    per_class = {
        c: {**_stats(by_class[c], keys), "n_prompts": sum(p["class"] == c for p in per_prompt)}
        for c in PROMPT_CLASSES
        if c in by_class
    }
    settings = {
        "samples_dir": str(samples_dir),
        "category": category,
        "clip_t_text": text_mode,
        "clip_model": models.names[0],
        "dino_model": models.names[1],
        **({"oracle_model": models.oracle_name} if oracle is not None else {}),
        "metrics": list(keys),
        "dtype": str(models.dtype).removeprefix("torch."),
        "preprocessing": models.preprocessing(),
        "real_files": real["files"],
        "render": index.get("settings", {}),
    }
    overall = {**_stats(per_image, keys), "n_prompts": len(prompts), "n_real": len(real["files"])}
    return {
        "format": 1,
        "settings": settings,
        "overall": overall,
        "per_class": per_class,
        "per_prompt": per_prompt,
        "per_image": per_image,
    }


def mean_std(row: dict, m: str) -> str:
    """'mean ± std' of metric m in a table row."""
    return f"{row[m]:.4f} ± {row[m + '_std']:.4f}"


def metrics_csv(result: dict) -> str:
    """One row per prompt, per prompt class and overall."""
    keys = metric_keys(result)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["level", "name", "class", "n_images", *keys, *(f"{m}_std" for m in keys)])
    for p in result["per_prompt"]:
        vals = [p[m] for m in keys] + [p[f"{m}_std"] for m in keys]
        w.writerow(["prompt", p["template"], p["class"], p["n_images"], *vals])
    for c, s in result["per_class"].items():
        vals = [s[m] for m in keys] + [s[f"{m}_std"] for m in keys]
        w.writerow(["class", c, c, s["n_images"], *vals])
    o = result["overall"]
    w.writerow(
        ["overall", "all", "", o["n_images"], *(o[m] for m in keys)] + [o[f"{m}_std"] for m in keys]
    )
    return buf.getvalue()


def metrics_md(result: dict) -> str:
    """Markdown tables: overall, per prompt class, per prompt (mean ± std over images)."""
    s, o = result["settings"], result["overall"]
    keys = metric_keys(result)
    head = "| | n images | " + " | ".join(TITLES[m] for m in keys) + " |"
    rule = "|---|---|" + "---|" * len(keys)
    lines = [
        f"# Metrics: {s['samples_dir']}",
        "",
        f"CLIP: `{s['clip_model']}`, DINO: `{s['dino_model']}`, CLIP-T text: {s['clip_t_text']} "
        f"(category '{s['category']}'), {o['n_real']} real image(s). Mean ± std over images."
        + (f" Oracle: `{s['oracle_model']}`." if "oracle_model" in s else ""),
        "",
        head,
        rule,
        f"| overall | {o['n_images']} | " + " | ".join(mean_std(o, m) for m in keys) + " |",
    ]
    for c, row in result["per_class"].items():
        lines.append(
            f"| {c} | {row['n_images']} | " + " | ".join(mean_std(row, m) for m in keys) + " |"
        )
    lines += ["", "| prompt | class | " + " | ".join(TITLES[m] for m in keys) + " |"]
    lines.append("|---|---|" + "---|" * len(keys))
    for p in result["per_prompt"]:
        cells = " | ".join(f"{p[m]:.4f}" for m in keys)
        lines.append(f"| {p['template'].replace('|', '/')} | {p['class']} | {cells} |")
    return "\n".join(lines) + "\n"


def write_metrics(result: dict, out_dir: str | Path) -> Path:
    """metrics.csv, metrics.md, then metrics.json (last: its presence means complete)."""
    out = Path(out_dir)
    (out / "metrics.json").unlink(missing_ok=True)  # an older json must not vouch for new csv/md
    write_text_atomically(out / "metrics.csv", metrics_csv(result))
    write_text_atomically(out / "metrics.md", metrics_md(result))
    write_text_atomically(out / "metrics.json", json.dumps(result, indent=2) + "\n")
    return out / "metrics.json"
