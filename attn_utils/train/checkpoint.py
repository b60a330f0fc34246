"""Resumable mid-stage checkpoints: save / list / load / rotate, safetensors + JSON.

    <run>/checkpoints/checkpoint-s<k>-<step>/   trainable.safetensors, optimizer.safetensors,
                                                state.json
Written atomically through attn_utils.runfiles; the rest of the run folder's layout is there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from attn_utils.config import ConfigError, first_line
from attn_utils.runfiles import remove_dir, write_dir_atomically
from attn_utils.train.background import BackgroundWriter, HostSnapshot

CKPT_RE = re.compile(r"^checkpoint-s([123])-(\d+)$")
CKPT_FILES = ("state.json", "trainable.safetensors", "optimizer.safetensors")


# ---------------------------------------------------------------- resumable checkpoints


def _flatten_optimizer(opt_state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, rest = {}, {"param_groups": opt_state["param_groups"], "scalars": {}}
    for idx, st in opt_state["state"].items():
        for key, val in st.items():
            name = f"{idx}.{key}"
            if isinstance(val, torch.Tensor):
                tensors[name] = val.detach()  # still on the device: the caller copies
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
    snapshot: HostSnapshot | None = None, writer: BackgroundWriter | None = None,
) -> Path:  # fmt: skip
    """Write checkpoints/checkpoint-s<stage>-<step> atomically, then rotate old ones.

    With `snapshot` and `writer` the tensors are copied to reused host buffers without a
    device sync and written in the writer's thread; the call returns before the write ends.
    """
    final = Path(run_dir) / "checkpoints" / f"checkpoint-s{stage}-{step:06d}"
    opt_tensors, opt_rest = _flatten_optimizer(optimizer.state_dict())
    both = {f"w:{k}": v for k, v in trainable.items()}
    both.update({f"o:{k}": v for k, v in opt_tensors.items()})
    if snapshot is None:
        host, ready = {k: v.detach().cpu().contiguous() for k, v in both.items()}, lambda: None
    else:
        if writer is not None:
            # The write in flight may still read the reused buffers: copying this step
            # into them now would give that checkpoint a mix of two steps' tensors.
            writer.wait()
        host, ready = snapshot.take(both)

    def write(tmp: Path) -> None:
        ready()
        for prefix, name in (("w:", "trainable"), ("o:", "optimizer")):
            part = {k[2:]: v for k, v in host.items() if k.startswith(prefix)}
            save_file(part, str(tmp / f"{name}.safetensors"))
        state = {"stage": stage, "step": step, "optimizer": opt_rest, **extra}
        (tmp / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True))

    def job() -> None:
        try:
            write_dir_atomically(final, write)
        finally:
            if snapshot is not None:
                snapshot.release()
        if total_limit:
            for old in list_checkpoints(run_dir)[:-total_limit]:
                remove_dir(old)

    if writer is None:
        job()
    else:
        writer.submit(job)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of this run folder, oldest first; anything partial is ignored."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = CKPT_RE.match(p.name)
        if m and all((p / f).is_file() for f in CKPT_FILES):
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
    except Exception as e:  # noqa: BLE001 - whatever is wrong, the checkpoint is unusable
        raise ConfigError(
            f"--resume_from_checkpoint: {path} is not a readable checkpoint "
            f"({first_line(e, 200)}); only safetensors and JSON are read"
        ) from None
    return state, trainable, opt


def resolve_resume(run_dir: Path, arg: str | None) -> Path | None:
    """The checkpoint to continue from: by default (None, or 'latest') the newest one of THIS
    run folder; 'none' starts an interrupted stage over; otherwise the folder given."""
    if arg == "none":
        return None
    if arg is None or arg == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    p = Path(arg)
    missing = [f for f in CKPT_FILES if not (p / f).is_file()]
    if missing:
        pickles = sorted(x.name for x in p.glob("*") if x.suffix in (".bin", ".pt", ".pkl", ".pth"))
        hint = f"; pickled files ({', '.join(pickles)}) are never loaded" if pickles else ""
        raise ConfigError(
            f"--resume_from_checkpoint: {p} is not a checkpoint of this trainer "
            f"(no {missing[0]}){hint}"
        )
    return p


_UNSET = object()


def _differences(old: object, new: object, where: str):
    """(where, old, new) for each leaf that differs between two stage identities."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            yield from _differences(old.get(k, _UNSET), new.get(k, _UNSET), f"{where}.{k}")
    elif where == ".plan" and isinstance(old, list) and isinstance(new, list):
        for o, n in zip(old, new):  # one entry per stage up to this one
            yield from _differences(o, n, f" stage {n.get('index')}")
        if len(old) != len(new):
            yield "stages", len(old), len(new)
    elif old != new:
        yield where.lstrip("."), old, new


def _shown(value: object) -> str:
    text = "unset" if value is _UNSET else json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def identity_change(old: dict | None, new: dict) -> str:
    """' (key: old -> new; ...)' for the settings that differ, or '' when `old` was not
    recorded (a folder written before identities were)."""
    if not isinstance(old, dict):
        return ""
    found = [f"{k.strip()}: {_shown(o)} -> {_shown(n)}" for k, o, n in _differences(old, new, "")]
    more = f"; and {len(found) - 3} more" if len(found) > 3 else ""
    return f" ({'; '.join(found[:3])}{more})" if found else ""


def restore_checkpoint(
    path: Path, fingerprint: str, trainable: dict[str, torch.Tensor], optimizer, scaler,
    identity: dict | None = None,
) -> dict:  # fmt: skip
    """Load a checkpoint into the stage's tensors, optimiser and scaler; return its state
    (state.json: its step and what the loop keeps beside the tensors).

    Refused (naming the flag, and what changed) when it was written for other data, model,
    settings or tensors.
    """
    state, tensors, opt_state = load_checkpoint(path)
    if state.get("fingerprint") != fingerprint:
        change = identity_change(state.get("identity"), identity) if identity else ""
        raise ConfigError(
            f"--resume_from_checkpoint: {path} was written with different data, base model "
            f"or settings{change}; refusing to mix them (use a new --output_dir, or pass "
            "--resume_from_checkpoint none to start the stage over)"
        )
    if set(tensors) != set(trainable):
        raise ConfigError(f"--resume_from_checkpoint: {path} holds other parameters")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(tensors[name].to(p.device, p.dtype))
    optimizer.load_state_dict(opt_state)
    scaler.load_state_dict(state.get("scaler") or {})
    return state
