"""Metric models (CLIP, DINO) and the three scores: CLIP-T, CLIP-I and DINO.

- CLIP-T: cosine between a generated image and its prompt's text, in CLIP's projected space.
- CLIP-I: mean cosine over all (generated, real) pairs of CLIP's projected image embeddings.
- DINO: the same with the CLS token (last_hidden_state[:, 0]) of a DINO ViT.
Images are preprocessed here, with PIL and numpy, as the original CLIP and DINO code does
(resize the shortest side, centre crop, normalise), so the numbers do not depend on which
transformers image-processor backend is installed. See docs/evaluation.md.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from tqdm.auto import tqdm

from attn_utils.config import ConfigError, first_line
from attn_utils.models import _load_kwargs, hub_reachable, verify_shipped

log = logging.getLogger(__name__)

DEFAULT_CLIP = "openai/clip-vit-base-patch32"  # DreamBooth / Textual Inversion evaluations
DEFAULT_DINO = "facebook/dino-vits16"  # DreamBooth's DINO metric (ViT-S/16)
MIXED_PRECISION = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINO's training and evaluation normalisation
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, if a config names none
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# PIL's filters by the number a transformers processor config stores as "resample".
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
BACKEND = (
    f"PIL {PIL.__version__} resize and crop, numpy normalisation (attn_utils.evaluate.metrics)"
)
# A study's protocol names it: numbers from another preprocessing must not be mixed in.
PREPROCESSING = "shortest side resized, centre crop (PIL); DINO 256/224 bicubic, ImageNet"


@dataclass(frozen=True)
class ImageTransform:
    """Resize the shortest side, centre-crop a square, scale to [0, 1] and normalise."""

    resize: int  # the shortest side after resizing
    crop: int  # the square's side
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str = "bicubic"  # a PIL filter name

    def array(self, image: Image.Image) -> np.ndarray:
        """(3, crop, crop) float32 of one image."""
        im = image.convert("RGB")
        w, h = im.size
        # torchvision's Resize(int): the short side becomes `resize`, the long side is truncated.
        long = int(self.resize * max(w, h) / min(w, h))
        size = (self.resize, long) if w <= h else (long, self.resize)
        im = im.resize(size, Image.Resampling[self.resample.upper()])
        # torchvision's CenterCrop offsets (rounded), as the CLIP and DINO repositories use.
        left, top = (int(round((s - self.crop) / 2.0)) for s in size)
        im = im.crop((left, top, left + self.crop, top + self.crop))
        x = np.asarray(im, dtype=np.float32) / np.float32(255.0)  # (H, W, 3)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return x.transpose(2, 0, 1)

    def __call__(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """(B, 3, crop, crop) float32 pixel values."""
        return torch.from_numpy(np.stack([self.array(im) for im in images]))

    def settings(self) -> dict:
        """What metrics.json records: the numbers and the code that applied them."""
        return {**asdict(self), "backend": BACKEND}


def dino_transform(crop: int = 224) -> ImageTransform:
    """The DINO repository's evaluation transform: Resize(256, bicubic), CenterCrop(224),
    ImageNet mean / std (scaled by 256 / 224 for a model of another input size)."""
    return ImageTransform(crop * 256 // 224, crop, IMAGENET_MEAN, IMAGENET_STD, "bicubic")


def _side(value, default: int) -> int:
    """A processor config's size: 224, {"shortest_edge": 224} or {"height": .., "width": ..}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict) and value:
        side = value.get("shortest_edge")
        return int(side or min(value.get("height", default), value.get("width", default)))
    return default


def clip_transform(config: dict, image_size: int) -> ImageTransform:
    """OpenAI CLIP's transform (resize the shortest side, centre crop) with the sizes, filter
    and mean / std of the model's saved processor config."""
    return ImageTransform(
        _side(config.get("size"), image_size),
        _side(config.get("crop_size"), image_size),
        tuple(config.get("image_mean") or CLIP_MEAN),
        tuple(config.get("image_std") or CLIP_STD),
        RESAMPLE.get(config.get("resample", 3), "bicubic"),
    )


def _looks_local(name: str) -> bool:
    """A path (a folder, or a path-like name), not a Hub id."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).is_dir()


def load_metric_model(
    flag: str, name: str, loader: Callable[[str, dict], object], local_files_only: bool = False
):
    """loader(name, kwargs) from the cache or a local folder first, then the Hub if it answers.

    Every failure is one ConfigError naming the flag and the model; never random weights.
    """
    looks_local = _looks_local(name)
    if looks_local and not Path(name).expanduser().is_dir():
        raise ConfigError(f"{flag}: {name} is not a folder")
    if looks_local:
        name = str(Path(name).expanduser())
        verify_shipped(name, flag)
    kw = _load_kwargs(name, None, local_files_only)
    errors = (OSError, ValueError, EnvironmentError)
    try:
        return loader(name, {**kw, "local_files_only": True})
    except errors as cached_error:
        if kw["local_files_only"]:
            raise ConfigError(
                f"{flag}: cannot load {name!r}: not a complete local model folder or cached "
                f"model ({first_line(cached_error)})"
            ) from None
    if not hub_reachable():
        raise ConfigError(
            f"{flag}: {name!r} is not in the local cache and the Hub is unreachable; "
            "pass a local model folder"
        )
    try:
        return loader(name, kw)
    except errors as e:
        raise ConfigError(f"{flag}: cannot load {name!r} from the Hub ({first_line(e)})") from None


def missing_models_message(failed: list[tuple[str, str, str]]) -> str:
    """One line for the metric models that could not load, with the command that fetches
    the Hub ones once (evaluate.py needs CLIP for CLIP-T / CLIP-I and DINO for DINO)."""
    if len(failed) == 1:
        return failed[0][2]
    hub = [name for _, name, _ in failed if not _looks_local(name)]  # a folder is not fetched
    fetch = " && ".join(f"hf download {name}" for name in hub)
    names = " and ".join(f"{flag} {name}" for flag, name, _ in failed)
    return (
        f"{names}: neither model can be loaded ({failed[0][2].split(': ', 1)[-1]}); "
        + (f"fetch both once with `{fetch}` (or " if fetch else "(")
        + "pass local model folders)"
    )


def _load_clip(name: str, kw: dict):
    from transformers import AutoTokenizer, CLIPModel, ImageProcessingMixin

    model = CLIPModel.from_pretrained(name, **kw)
    # The config file only: no image processor (and so no backend choice) is instantiated.
    config, _ = ImageProcessingMixin.get_image_processor_dict(name, **kw)
    transform = clip_transform(config, model.config.vision_config.image_size)
    return model, transform, AutoTokenizer.from_pretrained(name, **kw)


def _load_dino(name: str, kw: dict):
    from transformers import AutoConfig, AutoModel

    # Only the CLS token is used: a ViT's pooler (absent from DINO's weights) is not built.
    config = AutoConfig.from_pretrained(name, **kw)
    vit = config.model_type == "vit"
    model = AutoModel.from_pretrained(name, **kw, **({"add_pooling_layer": False} if vit else {}))
    # Not the Hub's preprocessor_config.json: for facebook/dino-vits16 it squashes to 224x224.
    return model, dino_transform(getattr(config, "image_size", 224))


def _pooled(out) -> torch.Tensor:
    """get_*_features returns a tensor (transformers 4) or an output with pooler_output (5)."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def normalize(x: torch.Tensor) -> np.ndarray:
    """Rows scaled to unit length, as float64 numpy (cosines are then dot products)."""
    x = x.detach().float().cpu().numpy().astype(np.float64)
    return x / np.linalg.norm(x, axis=-1, keepdims=True).clip(min=1e-12)


@dataclass
class MetricModels:
    """CLIP (model, transform, tokenizer) and DINO (model, transform) on a device."""

    clip: object
    clip_transform: ImageTransform
    clip_tokenizer: object
    dino: object
    dino_transform: ImageTransform
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 32
    names: tuple[str, str] = (DEFAULT_CLIP, DEFAULT_DINO)
    oracle: object = None  # an evaluate.oracle.Oracle (--oracle_model), or None
    oracle_name: str = ""

    def add_oracle(self, folder: str) -> None:
        """Load --oracle_model (checked against a shipped manifest): the fourth column."""
        from attn_utils.evaluate.oracle import Oracle

        if not Path(folder).is_dir():
            raise ConfigError(f"--oracle_model: {folder} is not a folder")
        verify_shipped(folder, "--oracle_model")
        try:
            self.oracle = Oracle.load(folder)
        except (ValueError, KeyError, RuntimeError, OSError) as e:
            raise ConfigError(f"--oracle_model: cannot load {folder} ({first_line(e)})") from None
        self.oracle_name = folder

    @classmethod
    def load(
        cls,
        clip_model: str = DEFAULT_CLIP,
        dino_model: str = DEFAULT_DINO,
        device: torch.device | str = "cpu",
        mixed_precision: str = "no",
        batch_size: int = 32,
        local_files_only: bool = False,
    ) -> MetricModels:
        """Load both models (one clear error naming --clip_model / --dino_model on failure)."""
        device, dtype = torch.device(device), MIXED_PRECISION[mixed_precision]
        wanted = [
            ("--clip_model", clip_model, _load_clip),
            ("--dino_model", dino_model, _load_dino),
        ]
        loaded, failed = [], []
        for flag, name, loader in wanted:  # try both: one message names all that is missing
            try:
                loaded.append(load_metric_model(flag, name, loader, local_files_only))
            except ConfigError as e:
                failed.append((flag, name, str(e)))
        if failed:
            raise ConfigError(missing_models_message(failed))
        (clip, clip_tf, tok), (dino, dino_tf) = loaded
        for m in (clip, dino):
            m.requires_grad_(False)
            m.eval()
            m.to(device=device, dtype=dtype)
        names = (clip_model, dino_model)
        return cls(clip, clip_tf, tok, dino, dino_tf, device, dtype, batch_size, names)

    def preprocessing(self) -> dict:
        """{clip, dino: the transform's settings and backend}, for metrics.json."""
        return {"clip": self.clip_transform.settings(), "dino": self.dino_transform.settings()}

    def _pixels(self, transform: ImageTransform, images: list[Image.Image]) -> torch.Tensor:
        px = transform(images)  # (B, 3, H, W)
        return px.to(device=self.device, dtype=self.dtype)

    @torch.inference_mode()
    def clip_image(self, images: list[Image.Image]) -> np.ndarray:
        """(B, D) unit CLIP image embeddings (projected)."""
        out = self.clip.get_image_features(pixel_values=self._pixels(self.clip_transform, images))
        return normalize(_pooled(out))

    @torch.inference_mode()
    def dino_image(self, images: list[Image.Image]) -> np.ndarray:
        """(B, D) unit DINO CLS embeddings."""
        out = self.dino(pixel_values=self._pixels(self.dino_transform, images))
        return normalize(out.last_hidden_state[:, 0])  # CLS token

    @torch.inference_mode()
    def clip_text(self, texts: list[str]) -> np.ndarray:
        """(T, D) unit CLIP text embeddings (projected)."""
        limit = self.clip.config.text_config.max_position_embeddings
        tok = self.clip_tokenizer(
            texts, padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        out = self.clip.get_text_features(
            input_ids=tok["input_ids"].to(self.device),
            attention_mask=tok["attention_mask"].to(self.device),
        )
        return normalize(_pooled(out))

    def embed_images(
        self, items: Sequence, load: Callable[[object], Image.Image], desc: str
    ) -> tuple[np.ndarray, np.ndarray]:
        """(CLIP, DINO) unit embeddings of every item, loaded and embedded batch by batch."""
        clip, dino = [], []
        with tqdm(total=len(items), desc=desc, unit="img") as bar:
            for s in range(0, len(items), self.batch_size):
                images = [load(x) for x in items[s : s + self.batch_size]]
                clip.append(self.clip_image(images))
                dino.append(self.dino_image(images))
                bar.update(len(images))
        return np.concatenate(clip), np.concatenate(dino)


def clip_t_scores(image_emb: np.ndarray, text_emb: np.ndarray) -> np.ndarray:
    """(N,) cosine of image i with text i; both (N, D) unit rows."""
    return (image_emb * text_emb).sum(-1)


def pairwise_mean(gen_emb: np.ndarray, real_emb: np.ndarray) -> np.ndarray:
    """(N,) per generated image: its mean cosine over all real images; both unit rows."""
    return (gen_emb @ real_emb.T).mean(-1)  # (N, R) -> (N,)


_BESIDE = r"\s,.;:!?()\[\]\"'"  # what may stand next to a word


def clip_t_text(
    template: str, category: str, mode: str = "category", placeholders: Sequence[str] = ()
) -> str:
    """CLIP-T's text: {} -> the category word, or ('removed', Textual Inversion) nothing; a
    placeholder written out in the prompt (or the category) is removed: CLIP never learned it."""
    filled = template.replace("{}", category if mode == "category" else "")
    for word in placeholders:  # whole words only: 'sks' goes, 'sksa' stays
        filled = re.sub(rf"(?<![^{_BESIDE}]){re.escape(word)}(?![^{_BESIDE}])", "", filled)
    return " ".join(filled.split()).replace(" ,", ",")
