"""A base model folder's own defaults (attndreambooth_defaults.json): the sampler it was
measured with and the metric models shipped beside it; the paper's where it has none."""

from __future__ import annotations

import os
from pathlib import Path

from attn_utils.config import ConfigError
from attn_utils.models import read_json

# A base model folder may say how this project should use it when flags do not: the toy world's
# (models/toyworld/base) was measured with its own sampler settings and scored with its own
# metric models. Real SD models have no such file; their defaults are the paper's.
MODEL_DEFAULTS = "attndreambooth_defaults.json"
SD_RENDER = {"scheduler": "dpm", "num_inference_steps": 50, "guidance_scale": 7.5}
METRIC_FLAGS = ("clip_model", "dino_model", "oracle_model")


def model_defaults(name_or_path: str | None) -> dict:
    """{"render": {scheduler, num_inference_steps, guidance_scale}, "metric_models": {flag:
    folder}} from a local base model's MODEL_DEFAULTS (folders resolved against it); {} for a
    Hub id or a folder without one. A malformed file is one ConfigError naming it."""
    if not name_or_path or not (Path(name_or_path) / MODEL_DEFAULTS).is_file():
        return {}
    path = Path(name_or_path) / MODEL_DEFAULTS
    data = read_json(path)
    render = data.get("render", {})
    types = {"scheduler": str, "num_inference_steps": int, "guidance_scale": (int, float)}
    metric = data.get("metric_models", {})
    if (
        not isinstance(render, dict)
        or set(render) - set(types)
        or any(not isinstance(v, types[k]) for k, v in render.items())
        or not isinstance(metric, dict)
        or set(metric) - set(METRIC_FLAGS)
        or any(not isinstance(v, str) for v in metric.values())
    ):
        raise ConfigError(
            f"{path}: expected render {{scheduler, num_inference_steps, guidance_scale}} and "
            f"metric_models {{{', '.join(METRIC_FLAGS)}}}"
        )
    folders = {k: os.path.normpath(Path(name_or_path) / v) for k, v in metric.items()}
    return {"render": dict(render), "metric_models": folders}


def render_defaults(name_or_path: str | None) -> dict:
    """The sampler settings to use when no flag says: the model folder's, else SD_RENDER."""
    return {**SD_RENDER, **model_defaults(name_or_path).get("render", {})}


RENDER_FLAGS = {
    "scheduler": "--infer_scheduler",
    "num_inference_steps": "--num_inference_steps",
    "guidance_scale": "--guidance_scale",
}


def render_argv(name_or_path: str | None) -> list[str]:
    """inference.py's flags for the model folder's own render settings; [] if it has none."""
    render = model_defaults(name_or_path).get("render", {})
    fmt = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731 - 4.0 as 4
    return [x for key, value in render.items() for x in (RENDER_FLAGS[key], fmt(value))]
