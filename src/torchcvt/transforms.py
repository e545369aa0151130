"""Evaluation preprocessing: image in, normalised ``[3, H, W]`` float32 tensor out.

It reproduces transformers' ``ConvNextImageProcessor`` (PIL backend, what ``AutoImageProcessor`` gives
for the public CvT checkpoints), so a model predicts the same here and there:

1. decode and convert to RGB as transformers' ``load_image`` does (its image-classification
   pipeline passes every input through it): EXIF orientation, then Pillow's ``convert("RGB")``,
   which drops alpha. The processor alone fails on most non-RGB input unless called with
   ``do_convert_rgb=True``, and then composites alpha onto white instead;
2. resize the uint8 image with Pillow: below 384 pixels the shorter side goes to
   ``int(image_size / crop_pct)`` and a centred ``image_size`` square is cropped; from 384 up
   the image is squashed to ``image_size x image_size`` (``crop_pct=None``), like the official
   CvT evaluation code; 3. rescale by 1/255 and normalise in float32.

Decoding (step 1, and every input type a user may hand us) is ``images.py``. This module also owns
the shared pixel plumbing: ``normalize``/``denormalize`` and ``resample_filter``.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image

from .errors import ConfigError
from .fileio import atomic_write_text
from .images import ImageSource, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

Channels = Union[Sequence[float], torch.Tensor]  # one number per channel: mean or std

# Our resample names and the PIL filter numbers transformers stores in preprocessor_config.json.
RESAMPLE_FILTERS: dict[str, int] = {
    "nearest": int(Image.Resampling.NEAREST),
    "lanczos": int(Image.Resampling.LANCZOS),
    "bilinear": int(Image.Resampling.BILINEAR),
    "bicubic": int(Image.Resampling.BICUBIC),
}
_FILTER_NAMES = {number: name for name, number in RESAMPLE_FILTERS.items()}

# ConvNextImageProcessor keeps the aspect ratio and crops only below this size; from it up, it squashes.
_SQUASH_FROM = 384
_RESCALE_FACTOR = 1 / 255

# Defaults that transformers fills in for keys a preprocessor_config.json leaves out.
_PROCESSOR_DEFAULTS: dict[str, dict[str, Any]] = {
    "convnext": {"size": {"shortest_edge": 384}, "resample": 3, "crop_pct": 224 / 256},
    "vit": {"size": {"height": 224, "width": 224}, "resample": 2},
}
# transformers' IMAGENET_STANDARD_MEAN and _STD, the default mean and std of both processors.
_IMAGENET_STANDARD = (0.5, 0.5, 0.5)

@dataclass(frozen=True)
class PreprocessConfig:
    """How an image becomes model input at evaluation time.

    ``crop_pct`` set: resize the shorter side to ``int(image_size / crop_pct)``, keep the aspect
    ratio, crop the centred ``image_size`` square. ``crop_pct=None``: squash to
    ``image_size x image_size``. ``max_pixels``: larger images are refused before they are decoded
    (None: Pillow's ``Image.MAX_IMAGE_PIXELS``; 0: no limit). Calling the config preprocesses one image.
    """

    image_size: int = 224
    crop_pct: float | None = 0.875
    resample: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.image_size, bool) or not isinstance(self.image_size, int) or self.image_size < 1:
            raise ConfigError(f"image_size must be a positive integer, got {self.image_size!r}")
        if self.crop_pct is not None:
            if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)):
                raise ConfigError(f"crop_pct must be a number in (0, 1] or None, got {self.crop_pct!r}")
            # Above 1 the resized image would be smaller than the crop and need padding.
            if not 0 < self.crop_pct <= 1:
                raise ConfigError(f"crop_pct must lie in (0, 1], got {self.crop_pct!r}")
            object.__setattr__(self, "crop_pct", float(self.crop_pct))
        resample_filter(self.resample)  # raises ConfigError for an unknown name
        for name in ("mean", "std"):
            object.__setattr__(self, name, _three_floats(name, getattr(self, name)))
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"std must be positive, got {self.std}")
        if self.max_pixels is not None and (isinstance(self.max_pixels, bool) or not isinstance(self.max_pixels, int)
                                            or self.max_pixels < 0):
            raise ConfigError(f"max_pixels must be None, 0 (no limit) or a positive integer, got {self.max_pixels!r}")

    @classmethod
    def for_resolution(cls, image_size: int) -> PreprocessConfig:
        """The official CvT evaluation recipe: centre crop at 87.5% below 384 pixels, squash from 384 up."""
        return cls(image_size=image_size, crop_pct=0.875 if image_size < _SQUASH_FROM else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessConfig:
        """Read a transformers ``preprocessor_config.json`` dict as transformers would apply it.

        ConvNext dicts (also the older ``ConvNextFeatureExtractor`` ones, whose ``size`` is an int)
        and ViT dicts (a plain square resize) are understood. Missing keys take that processor's
        transformers defaults, so the result matches what ``AutoImageProcessor`` would do with the
        same file, not what a CvT checkpoint usually wants.
        """
        kind = _processor_kind(d)
        defaults = _PROCESSOR_DEFAULTS[kind]
        for key, what in (("do_resize", "resizing"), ("do_rescale", "rescaling by 1/255")):
            if d.get(key) is False:
                raise ConfigError(f"{key}=false is not supported: preprocessing always includes {what}")
        if d.get("do_center_crop"):
            raise ConfigError("do_center_crop is not supported; use size and crop_pct")
        factor = d.get("rescale_factor")
        if factor is not None and not (isinstance(factor, (int, float)) and math.isclose(factor, _RESCALE_FACTOR)):
            raise ConfigError(f"rescale_factor must be 1/255, got {factor!r}")

        image_size, squash = _parse_size(d.get("size", defaults["size"]), kind)
        if squash or image_size >= _SQUASH_FROM:
            # A {height, width} size is a plain resize, and ConvNextImageProcessor ignores crop_pct
            # from 384 up and squashes.
            crop_pct = None
        else:
            crop_pct = d.get("crop_pct")
            crop_pct = defaults["crop_pct"] if crop_pct is None else crop_pct

        resample = d.get("resample")
        resample = defaults["resample"] if resample is None else resample
        if isinstance(resample, str) and resample in RESAMPLE_FILTERS:
            resample_name = resample
        elif isinstance(resample, int) and not isinstance(resample, bool) and resample in _FILTER_NAMES:
            resample_name = _FILTER_NAMES[resample]
        else:
            raise ConfigError(
                f"resample {resample!r} is not supported; use one of "
                + ", ".join(f"{number} ({name})" for number, name in sorted(_FILTER_NAMES.items()))
            )

        if d.get("do_normalize") is False:
            mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
        else:
            mean = d.get("image_mean")
            std = d.get("image_std")
            mean = _IMAGENET_STANDARD if mean is None else mean
            std = _IMAGENET_STANDARD if std is None else std
        return cls(image_size=image_size, crop_pct=crop_pct, resample=resample_name, mean=mean, std=std)

    def to_dict(self) -> dict[str, Any]:
        """A ``preprocessor_config.json`` dict that transformers' ``AutoImageProcessor`` applies identically.

        The CvT recipes (crop below 384, squash from 384) are written as ``ConvNextImageProcessor``.
        A squash below 384 cannot be said with it, so it is written as ``ViTImageProcessor`` (a plain
        resize to ``size``, then rescale and normalise). A crop from 384 up has no transformers
        equivalent and raises ``ConfigError``.
        """
        common = {"do_resize": True, "resample": RESAMPLE_FILTERS[self.resample], "do_rescale": True,
                  "rescale_factor": _RESCALE_FACTOR, "do_normalize": True,
                  "image_mean": list(self.mean), "image_std": list(self.std)}
        n = self.image_size
        if self.crop_pct is not None and n >= _SQUASH_FROM:
            raise ConfigError(
                f"a centre crop at image_size {n} cannot be written for transformers: its "
                f"ConvNextImageProcessor squashes from {_SQUASH_FROM} up; use crop_pct=None"
            )
        if self.crop_pct is None and n < _SQUASH_FROM:
            return {"image_processor_type": "ViTImageProcessor", "size": {"height": n, "width": n}, **common}
        d = {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": n}, **common}
        # From 384 up ConvNextImageProcessor never reads crop_pct, so none is written (transformers 5
        # fails on an explicit null if the size is later edited below 384).
        if self.crop_pct is not None:
            d["crop_pct"] = self.crop_pct
        return d

    def __call__(self, image: ImageSource) -> torch.Tensor:
        return preprocess(image, self)


def read_preprocessor_config(directory: str | os.PathLike) -> PreprocessConfig | None:
    """The ``preprocessor_config.json`` of a checkpoint folder, or None when it has none.

    A path to the JSON file itself is accepted too.
    """
    path = Path(directory)
    if path.is_dir():
        path = path / PREPROCESSOR_CONFIG_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    try:
        return PreprocessConfig.from_dict(data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def write_preprocessor_config(cfg: PreprocessConfig, directory: str | os.PathLike) -> None:
    """Write ``directory/preprocessor_config.json`` atomically, formatted as transformers writes it."""
    text = json.dumps(cfg.to_dict(), indent=2, sort_keys=True) + "\n"
    atomic_write_text(Path(directory) / PREPROCESSOR_CONFIG_NAME, text)


def preprocess(image: ImageSource, cfg: PreprocessConfig, name: str | None = None) -> torch.Tensor:
    """One image as a normalised float32 ``[3, image_size, image_size]`` tensor (``name``: for messages)."""
    rgb = _resize_and_crop(load_image(image, max_pixels=cfg.max_pixels, name=name), cfg)
    pixels = np.asarray(rgb, dtype=np.uint8)  # [H, W, 3]
    table = _pixel_table(tuple(cfg.mean), tuple(cfg.std))  # [3, 256]
    out = np.empty((3, *pixels.shape[:2]), dtype=np.float32)
    for c in range(3):  # one NumPy gather a channel: no float64 pass, no torch thread pool
        np.take(table[c], pixels[..., c], out=out[c])
    return torch.from_numpy(out)


@functools.cache
def _pixel_table(mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Every uint8 value's model input per channel, computed as transformers does (rescaled in float64,
    cast, normalised in float32): a lookup gives the same bits as the arithmetic, at a gather's cost."""
    values = torch.arange(256, dtype=torch.float64).mul_(_RESCALE_FACTOR).to(torch.float32)
    return normalize(values.view(1, 1, 256).expand(len(mean), 1, 256), mean, std)[:, 0].numpy()


def preprocess_batch(images: Iterable[ImageSource], cfg: PreprocessConfig) -> torch.Tensor:
    """Several images as one ``[B, 3, image_size, image_size]`` batch."""
    tensors = [preprocess(image, cfg) for image in images]
    if not tensors:
        return torch.empty((0, 3, cfg.image_size, cfg.image_size))
    return torch.stack(tensors)


# --------------------------------------------------------------------------------- pixel plumbing
def normalize(pixels: torch.Tensor, mean: Channels, std: Channels) -> torch.Tensor:
    """``(pixels - mean) / std`` per channel: 0..1 pixels ``[..., C, H, W]`` -> model input.

    Computed in ``pixels``' dtype (float32 for images), the one definition every pipeline uses.
    ``mean`` and ``std``: C numbers, or a tensor of them (which a per-item caller can keep, as
    converting a tuple costs a few microseconds each call).
    """
    mean_t = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device).view(-1, 1, 1)
    return (pixels - mean_t) / std_t


def denormalize(x: torch.Tensor, mean: Channels, std: Channels) -> torch.Tensor:
    """The inverse of ``normalize``, clamped to 0..1: model input ``[..., C, H, W]`` -> the pixels it shows.

    ``load_image`` of the result (a 0..1 tensor) gives the 8-bit RGB image, ``round(v * 255)``.
    """
    mean_t = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std_t = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * std_t + mean_t).clamp(0, 1)


def resample_filter(name: str) -> Image.Resampling:
    """Pillow's filter for one of our resample names (nearest, lanczos, bilinear, bicubic)."""
    if name not in RESAMPLE_FILTERS:
        raise ConfigError(f"resample must be one of {', '.join(RESAMPLE_FILTERS)}, got {name!r}")
    return Image.Resampling(RESAMPLE_FILTERS[name])


# --------------------------------------------------------------------------------------- helpers


def _three_floats(name: str, value: Any) -> tuple[float, float, float]:
    """Three finite floats; a single number is repeated per channel, as transformers does."""
    if isinstance(value, (int, float)):
        value = (value,) * 3
    try:
        values = tuple(float(v) for v in value) if not isinstance(value, str) else ()
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) for v in values):
        raise ConfigError(f"{name} must be three finite numbers (R, G, B), got {value!r}")
    return values  # type: ignore[return-value]


def _processor_kind(d: dict[str, Any]) -> str:
    """Which transformers processor a dict describes, since int sizes and defaults depend on it."""
    name = d.get("image_processor_type") or d.get("feature_extractor_type") or "ConvNextImageProcessor"
    if not isinstance(name, str):
        raise ConfigError(f"image_processor_type must be a string, got {name!r}")
    if name.startswith("ConvNext"):
        return "convnext"
    if name.startswith("ViT"):
        return "vit"
    raise ConfigError(f"image processor {name!r} is not supported; expected ConvNextImageProcessor or ViTImageProcessor")


def _parse_size(size: Any, kind: str) -> tuple[int, bool]:
    """``(image_size, squash)`` from transformers' three spellings of ``size``."""
    if isinstance(size, int) and not isinstance(size, bool):
        # An int is a shortest edge for ConvNext and a square for ViT (transformers' get_size_dict).
        return size, kind == "vit"
    if isinstance(size, dict):
        given = {k: v for k, v in size.items() if v is not None}
        if set(given) == {"shortest_edge"} and kind == "convnext":
            return _positive_int("size.shortest_edge", given["shortest_edge"]), False
        if set(given) == {"height", "width"}:
            height = _positive_int("size.height", given["height"])
            if height != given["width"]:
                raise ConfigError(f"only square outputs are supported, got size {size}")
            return height, True
    raise ConfigError(
        f"size {size!r} is not supported; expected an int, {{'shortest_edge': N}} or {{'height': N, 'width': N}}"
    )


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


def _resize_and_crop(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """ConvNextImageProcessor's resize (and centre crop), done by Pillow on the uint8 RGB image."""
    n = cfg.image_size
    resample = resample_filter(cfg.resample)
    if cfg.crop_pct is None:
        return img.resize((n, n), resample=resample)
    # transformers' get_resize_output_image_size(default_to_square=False): the shorter side becomes
    # `scale`, the longer int(scale * long / short), truncated.
    scale = int(n / cfg.crop_pct)
    width, height = img.size
    if width <= height:
        size = (scale, int(scale * height / width))
    else:
        size = (int(scale * width / height), scale)
    img = img.resize(size, resample=resample)
    # Same offsets as transformers' center_crop: floor of half the excess.
    left, top = (size[0] - n) // 2, (size[1] - n) // 2
    return img.crop((left, top, left + n, top + n))


