"""The run folder: its layout, and the file helpers training and inference both use.

    run_config.json                      every resolved setting
    stage_1/learned_embeds.safetensors   {token: tensor[dim]}, or {name: tensor[n, dim]} for
                                          n vectors; stage_info.json
    stage_2/unet/, stage_3/unet/          diffusers layout; stage_info.json
    stage_3/text_encoder/                 only when --train_text_encoder (DreamBooth)
    stage_2/unet_lora/, stage_3/unet_lora/ instead of unet/ with --attn_lora_rank /
                                          --unet_lora_rank: diffusers' LoRA file (safetensors)
    checkpoints/checkpoint-s<k>-<step>/   resumable state (attn_utils.train.checkpoint)

A folder or file appears under its final name only once complete (written beside it, then
renamed); embedding files are safetensors, and legacy pickles are read without running code.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import pickle
import re
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from attn_utils.config import ConfigError, first_line, vector_tokens
from attn_utils.sdxl import EMBED_KEYS as SDXL_KEYS
from attn_utils.sdxl import TOKENS_META, sdxl_file_rows, split_rows

RUN_CONFIG = "run_config.json"
EMBEDS_FILE = "learned_embeds.safetensors"
STAGE_INFO = "stage_info.json"
TEXT_ENCODER_DIR = "text_encoder"  # beside unet/ in a stage folder; the pipeline's subfolder
TEXT_ENCODER_WEIGHTS = "model.safetensors"
UNET_LORA_DIR = "unet_lora"  # a LoRA stage's result, in place of unet/
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name pipe.load_lora_weights looks for


# ---------------------------------------------------------------- layout


def read_prompt_lines(
    path: str | Path, flag: str, check: Callable[[str], str | None] | None = None
) -> list[str]:
    """A prompt file's non-blank lines that do not start with '#'; one ConfigError naming
    `flag` if it is missing, unreadable or holds none, or if `check(prompt)` returns what is
    wrong with one (the message names its line)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{flag}: {p} not found")
    try:
        lines = p.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{flag}: cannot read {p} as UTF-8 text ({e})") from None
    numbered = [(n, s.strip()) for n, s in enumerate(lines, 1)]
    numbered = [(n, s) for n, s in numbered if s and not s.startswith("#")]
    if not numbered:
        raise ConfigError(f"{flag}: {p} has no prompts (only blank lines or # comments)")
    for n, s in numbered if check else ():
        why = check(s)
        if why:
            raise ConfigError(f"{flag}: {p} line {n} {why}: {s!r}")
    return [s for _, s in numbered]


def writable_dir(path: str | Path, flag: str) -> Path:
    """Refuse, with one ConfigError naming the flag, a folder that cannot be made or written.

    Called before any model loads, so a bad folder costs a second, not a load. Nothing is
    left behind: the folder itself is made later, by whatever writes into it.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag}: {path} exists and is not a folder")
    probe_in = path
    while not probe_in.exists():  # the nearest existing folder above it must take files
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ConfigError(f"{flag}: cannot create {path}: {probe_in} is not a folder")
    probe = probe_in / f".tmp-write-test-{uuid.uuid4().hex[:8]}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        why = e.strerror or first_line(e)
        raise ConfigError(f"{flag}: cannot write to {probe_in} ({why})") from None
    return path


def stage_dir(run_dir: Path, stage: int) -> Path:
    return Path(run_dir) / f"stage_{stage}"


def stage_info(run_dir: Path, stage: int) -> dict | None:
    """The completion record of a stage, or None if the stage has not completed."""
    p = stage_dir(run_dir, stage) / STAGE_INFO
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{p}: unreadable ({first_line(e, 200)}); "
            f"delete {p.parent} to train stage {stage} again"
        ) from None


# ---------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in sorted(root.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(root)


def write_dir_atomically(final: Path, write: Callable[[Path], None]) -> Path:
    """Run write(tmp) in a hidden sibling folder, then swap it in under `final`.

    A crash or a full disk leaves at most a hidden `.tmp-*` folder that nothing reads;
    an existing `final` survives until the new one is complete.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{uuid.uuid4().hex[:8]}"
    old = None
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        if final.exists():
            old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
            os.replace(final, old)
        os.replace(tmp, final)
        _fsync_dir(final.parent)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not final.exists():
            os.replace(old, final)  # the previous copy goes back under its name
        if _is_disk_full(e):  # safetensors reports it as its own error type
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(final)) from e
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _is_disk_full(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return bool(re.search(rf"os error ({errno.ENOSPC}|{errno.EDQUOT})\b", str(e)))


def remove_dir(path: Path) -> None:
    """Delete a folder so that no half-deleted copy is ever seen under its name."""
    path = Path(path)
    doomed = path.parent / f".tmp-rm-{path.name}-{uuid.uuid4().hex[:8]}"
    try:
        os.replace(path, doomed)
    except FileNotFoundError:
        return
    shutil.rmtree(doomed, ignore_errors=True)


def write_text_atomically(path: Path, text: str) -> None:
    """Write text to a hidden sibling, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomically(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(data, indent=2, sort_keys=True))


def recover_interrupted_writes(run_dir: Path) -> None:
    """Undo what a crash mid-save left: drop half-written folders, restore a displaced one."""
    for root in (Path(run_dir), Path(run_dir) / "checkpoints"):
        if not root.is_dir():
            continue
        for p in sorted(root.iterdir()):
            if p.name.startswith(".tmp-"):  # a write or a delete that never finished
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
            elif p.name.startswith(".old-"):
                final = root / p.name[len(".old-") :].rsplit("-", 1)[0]
                if final.exists():
                    shutil.rmtree(p, ignore_errors=True)
                else:  # crashed between the two renames: the old copy is the good one
                    os.replace(p, final)


# ---------------------------------------------------------------- learned embeddings


def save_embeddings(
    path: Path, tokens: list[str], embeds: torch.Tensor, widths: tuple[int, int] | None = None
) -> None:
    """The learned rows, float32, in the layouts diffusers' load_textual_inversion reads.

    One vector: {token: (dim,)}. n vectors new_concept_v0 .. _v{n-1}: {"new_concept": (n, dim)}
    (diffusers refuses a key per vector; it loads this as new_concept, new_concept_1, .. and
    expands "new_concept" in a prompt into all n). SDXL (`widths`): {"clip_l": (k, w1),
    "clip_g": (k, w2)}, the tokens in the metadata (docs/sdxl.md loads it in diffusers).
    """
    rows = embeds.detach().float().cpu()  # (k, dim)
    if widths is not None:
        save_file({k: v.contiguous() for k, v in split_rows(rows, widths).items()}, str(path),
                  metadata={TOKENS_META: json.dumps(tokens)})  # fmt: skip
        return
    name = tokens[0].removesuffix("_v0")
    if len(tokens) > 1 and tokens != vector_tokens(name, len(tokens)):
        raise ValueError(f"several vectors are saved as <name>_v0 .. _v<n-1>, not {tokens}")
    entries = {name: rows} if len(tokens) > 1 else {tokens[0]: rows[0]}
    save_file({k: v.contiguous() for k, v in entries.items()}, str(path))


def file_kind(path: Path) -> str:
    """'safetensors', 'zip' (torch.save), 'pickle' (protocol 2+) or 'unknown', by content."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(9)
    header_len = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    if head[8:9] == b"{" and 2 <= header_len <= size - 8:  # u64 length, then a JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
        return "pickle"
    return "unknown"


def _load_tensor_pickle(path: Path):
    """torch.load restricted to tensors and plain containers: pickled code is refused."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < (2, 6):
        # weights_only could be bypassed before torch 2.6 (CVE-2025-32434)
        raise ConfigError(f"{path}: pickled files need torch >= 2.6 to be read safely; "
                          "convert it to .safetensors")  # fmt: skip
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with open(path, "rb") as f:  # a file object: torch.load never guesses by suffix
                return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        why = next((ln.strip() for ln in str(e).splitlines() if "GLOBAL" in ln), "")
        why = f" ({why[:160]})" if why else ""
        raise ConfigError(
            f"{path}: refused: a pickle that holds more than plain tensors{why}; nothing in it "
            "was run. Only tensors are read; re-save it as .safetensors from a trusted source"
        ) from None


def load_embeddings(
    path: str | Path, dim: int | None = None, widths: tuple[int, int] | None = None
) -> dict[str, torch.Tensor]:
    """Read {token: tensor[dim]} from .safetensors, or a legacy .bin without unpickling code.

    An entry {name: (n, dim)} of n > 1 rows (save_embeddings' multi-vector layout, diffusers'
    too) gives tokens name_v0 .. name_v{n-1}; a key per token (the original's layout) is read
    as it is. With `dim` (the text encoder's width), a vector of another width is refused,
    naming the file. With `widths` (SDXL's two encoders), the file must hold clip_l and clip_g
    of those widths; each token's vector is then both rows side by side.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: embedding file not found")
    try:
        kind = file_kind(path)
        if kind == "safetensors" or (kind == "unknown" and path.suffix == ".safetensors"):
            data = load_file(str(path))
        elif kind in ("zip", "pickle"):
            data = _load_tensor_pickle(path)
        else:
            raise ValueError("neither safetensors nor a torch.save file")
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - any failure here means the file is unusable
        raise ConfigError(f"{path}: not a readable embedding file ({first_line(e, 200)})") from None
    if isinstance(data, dict) and isinstance(data.get("string_to_param"), dict):
        data = {"*": data["string_to_param"].get("*")}  # A1111-style textual-inversion file
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"{path}: expected a {{token: tensor}} mapping")
    is_sdxl = set(data) == set(SDXL_KEYS)
    if widths is not None and not is_sdxl:
        have = ", ".join(map(repr, sorted(data)))
        raise ConfigError(
            f"{path}: holds {have}; an SDXL base model needs both clip_l and clip_g (one row "
            "for each text encoder)"
        )
    if is_sdxl:
        data = sdxl_file_rows(path, data, widths, one_encoder=dim is not None and widths is None)
        dim = None
    out = {}
    for k, v in data.items():
        if not isinstance(v, torch.Tensor) or not v.is_floating_point():
            raise ConfigError(f"{path}: entry {k!r} is not a floating-point tensor")
        if v.ndim == 2 and v.shape[0] == 1:
            v = v[0]  # (1, dim), as some tools write a single vector
        if v.ndim not in (1, 2) or 0 in v.shape or (dim is not None and v.shape[-1] != dim):
            want = f"({dim},)" if dim is not None else "(dim,)"
            raise ConfigError(
                f"{path}: entry {k!r} has shape {tuple(v.shape)}, but this text encoder needs "
                f"{want} (an embedding made for another base model?)"
            )
        if not torch.isfinite(v).all():
            raise ConfigError(f"{path}: entry {k!r} holds NaN or inf values")
        names = [str(k)] if v.ndim == 1 else vector_tokens(str(k), v.shape[0])
        clash = next((t for t in names if t in out or (t != k and t in data)), None)
        if clash is not None:
            raise ConfigError(f"{path}: holds {clash!r} twice (its own key and a row of {k!r})")
        out.update(zip(names, v.float().reshape(len(names), -1)))
    return out


def load_weights_into(module: torch.nn.Module, weights: Path, what: str, missing: str) -> None:
    """Copy a safetensors state dict into a resident module of the same shapes.

    `what` names the module in the mismatch error ("U-Net"), `missing` says what is
    incomplete when the file is absent; both errors name the file.
    """
    if not Path(weights).is_file():
        raise ConfigError(f"{weights}: not found; {missing} is incomplete")
    state = load_file(str(weights))
    own = module.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ConfigError(f"{weights}: does not match the base model's {what}")
    module.load_state_dict(state)


# ---------------------------------------------------------------- pictures


def image_grid(images: list[Image.Image]) -> Image.Image:
    """Tile images into a near-square grid."""
    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# ---------------------------------------------------------------- a trained text encoder


def save_text_encoder(stage_folder: Path, text_encoder) -> None:
    """Write <stage_folder>/text_encoder/ in transformers layout (config + one safetensors)."""
    # One file whatever the size (SD2.1's is 1.4 GB): load_text_encoder reads just that.
    text_encoder.save_pretrained(str(Path(stage_folder) / TEXT_ENCODER_DIR), max_shard_size="100GB")


def trained_text_encoder(folder: str | Path) -> str | None:
    """<folder>/text_encoder when it holds a saved text encoder, else None."""
    d = Path(folder) / TEXT_ENCODER_DIR
    return (
        str(d) if (d / "config.json").is_file() and (d / TEXT_ENCODER_WEIGHTS).is_file() else None
    )


def load_text_encoder(folder: str | Path, text_encoder) -> None:
    """Copy a saved text encoder's weights into a resident one of the same shape."""
    weights = Path(folder) / TEXT_ENCODER_WEIGHTS
    load_weights_into(text_encoder, weights, "text encoder", "the trained text encoder")
