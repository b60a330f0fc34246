"""Save / load / rotate / resume. Everything is safetensors + JSON, written atomically.

Layout of a run folder:
    run_config.json
    stage_1/learned_embeds.safetensors   {token: tensor[dim]}; stage_info.json
    stage_2/unet/, stage_3/unet/          diffusers layout; stage_info.json
    checkpoints/checkpoint-s<k>-<step>/   trainable.safetensors, optimizer.safetensors, state.json
A folder appears under its final name only once complete (written beside it, then renamed).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import ConfigError

CKPT_RE = re.compile(r"^checkpoint-s([123])-(\d+)$")
EMBEDS_FILE = "learned_embeds.safetensors"
STAGE_INFO = "stage_info.json"


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    with contextlib.suppress(OSError):
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) in a hidden sibling folder, then swap it in under `final`.

    A crash or a full disk leaves at most a hidden `.tmp-*` folder that nothing reads;
    an existing `final` survives until the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def write_json_atomically(path: Path, data: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------- learned embeddings


def save_embeddings(path: Path, tokens: list[str], embeds: torch.Tensor) -> None:
    """{token: float32 tensor[dim]}: the format diffusers' load_textual_inversion reads."""
    save_file({t: embeds[i].detach().float().cpu().contiguous() for i, t in enumerate(tokens)},
              str(path))  # fmt: skip


def load_embeddings(path: str | Path) -> dict[str, torch.Tensor]:
    """Read {token: tensor[dim]} from .safetensors, or a legacy .bin without unpickling code."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: embedding file not found")
    try:
        if path.suffix == ".safetensors":
            data = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{path}: not a readable embedding file ({msg[:200]})") from None
    if "string_to_param" in data:  # A1111-style textual-inversion file
        data = {"*": data["string_to_param"]["*"]}
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a {{token: tensor}} mapping")
    out = {}
    for k, v in data.items():
        if not isinstance(v, torch.Tensor):
            raise ConfigError(f"{path}: entry {k!r} is not a tensor")
        out[str(k)] = v.float()
    return out


# ---------------------------------------------------------------- stage results


def stage_dir(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"stage_{stage}"


def stage_info(run_dir: Path, stage: int) -> dict | None:
    """The completion record of a stage, or None if the stage has not completed."""
    p = stage_dir(run_dir, stage) / STAGE_INFO
    return json.loads(p.read_text()) if p.is_file() else None


# ---------------------------------------------------------------- resumable checkpoints


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": opt_state["param_groups"], "scalars": {}}
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            name = f"{idx}.{key}"
            if isinstance(val, torch.Tensor):
                tensors[name] = val.detach().cpu().contiguous()
            else:
                rest["scalars"][name] = val
    return tensors, rest


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for name, val in list(tensors.items()) + list(rest["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = val
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(
    run_dir: Path, stage: int, step: int, trainable: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer, extra: dict, total_limit: int | None,
) -> Path:  # fmt: skip
    """Write checkpoints/checkpoint-s<stage>-<step> atomically, then rotate old ones."""
    final = Path(run_dir) / "checkpoints" / f"checkpoint-s{stage}-{step:06d}"
    opt_tensors, opt_rest = _flatten_optimizer(optimizer.state_dict())

    def write(tmp: Path) -> None:
        save_file({k: v.detach().cpu().contiguous() for k, v in trainable.items()},
                  str(tmp / "trainable.safetensors"))  # fmt: skip
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
        state = {"stage": stage, "step": step, "optimizer": opt_rest, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))

    write_dir_atomically(final, write)
    if total_limit:
        for old in list_checkpoints(run_dir)[:-total_limit]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of this run folder, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and (p / "state.json").is_file():
            found.append(((int(m.group(1)), int(m.group(2))), p))
    return [p for _, p in sorted(found)]


def load_checkpoint(path: Path) -> tuple[dict, dict[str, torch.Tensor], dict]:
    """(state, trainable tensors, optimizer state dict) of one checkpoint folder."""
    path = Path(path)
    try:
        state = json.loads((path / "state.json").read_text())
        trainable = load_file(str(path / "trainable.safetensors"))
        opt = _unflatten_optimizer(load_file(str(path / "optimizer.safetensors")),
                                   state["optimizer"])  # fmt: skip
    except Exception as e:  # noqa: BLE001
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"--resume_from_checkpoint: {path} is not a readable checkpoint ({msg})"
        ) from None
    return state, trainable, opt


def resolve_resume(run_dir: Path, arg: str | None) -> Path | None:
    """The checkpoint folder to resume from: None, 'latest' of THIS run folder, or a path."""
    if arg is None:
        return None
    if arg == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    p = Path(arg)
    if not (p / "state.json").is_file():
        raise ConfigError(f"--resume_from_checkpoint: {p} is not a checkpoint folder")
    return p


def recover_interrupted_writes(run_dir: Path) -> None:
    """Undo what a crash mid-save left: drop half-written folders, restore a displaced one."""
    for root in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if p.name.startswith(".tmp-"):
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink()
            elif p.name.startswith(".old-"):
                final = root / p.name[len(".old-") :].rsplit("-", 1)[0]
                if final.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:  # crashed between the two renames: the old copy is the good one
                    os.replace(p, final)
