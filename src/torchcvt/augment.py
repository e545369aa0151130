"""Training augmentation: the CvT paper's recipe, after timm, without torchvision or timm.

The official CvT training (microsoft/CvT ``lib/dataset/build.py``) calls timm's ``create_transform``
and ``Mixup`` with: random-resized crop (bicubic) -> horizontal flip -> RandAugment
``rand-m9-mstd0.5-inc1`` -> to tensor -> normalise -> random erasing (p 0.25, per-pixel noise), then
per batch mixup 0.8 / cutmix 1.0 (switch 0.5) with label smoothing 0.1. This module re-implements
those pieces with Pillow and torch, following timm's semantics and order of random draws:

* ``train_transform``: the per-image pipeline above (PIL image -> normalised ``[3, H, W]`` tensor).
* ``finetune_transform``: a lighter preset for fine-tuning (crop scale 0.35..1, flip, no RandAugment).
* ``RandAugment``: timm's RandAugment, the increasing-magnitude op set by default.
* ``RandomErasing``: timm's random erasing, on one normalised image or a batch.
* ``RandomAffineTensor``: a small batched rotate/scale/translate on tensors (the digits recipe).
* ``Mixup`` + ``SoftTargetCrossEntropy``: batch mixup/cutmix with smoothed soft targets.

Random number generators. Nothing here owns a ``torch.Generator`` or touches numpy's RNG, so a
trainer that seeds and checkpoints python's ``random`` and torch's global RNG
(``random.getstate()``, ``torch.get_rng_state()``) can resume bit-identically:

* python ``random``: every decision and geometry -- crop box, flip, RandAugment's op choice, apply
  probability, magnitude and sign, random erasing's box, mixup's lambda, mode switch and cutmix box.
* ``torch`` (global CPU generator): tensor noise and batched parameters -- random erasing's pixel
  values and ``RandomAffineTensor``'s per-sample angles, scales and shifts.

In DataLoader workers, PyTorch re-seeds ``random`` and ``torch`` per worker from the main process's
torch RNG when the iterator is created, so restoring the main RNGs at an epoch boundary restores the
workers' draws too.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageEnhance, ImageOps
from torch import nn

from .transforms import IMAGENET_MEAN, IMAGENET_STD

# timm's magnitude scale: a magnitude of 10 is the strongest setting of every op.
_LEVEL_DENOM = 10.0

_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _pil_interpolation(name: str) -> Image.Resampling:
    try:
        return _INTERPOLATIONS[name]
    except KeyError:
        raise ValueError(f"interpolation must be one of {sorted(_INTERPOLATIONS)}, got {name!r}") from None


def _fill_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """The 0..255 colour of the dataset mean: what timm fills uncovered pixels with, so that after
    normalisation they are ~0 rather than a strong black edge."""
    return tuple(min(255, round(255 * m)) for m in mean)  # type: ignore[return-value]


# ------------------------------------------------------------------------------ RandAugment ops
# Each op: (PIL image, level arguments..., fill, resample) -> PIL image. Geometric ops fill the
# uncovered area with the dataset mean colour; colour ops ignore fill and resample.
def _auto_contrast(img, fill, resample):
    return ImageOps.autocontrast(img)


def _equalize(img, fill, resample):
    return ImageOps.equalize(img)


def _invert(img, fill, resample):
    return ImageOps.invert(img)


def _rotate(img, degrees, fill, resample):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def _posterize(img, bits, fill, resample):
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def _solarize(img, threshold, fill, resample):
    return ImageOps.solarize(img, threshold)


def _solarize_add(img, add, fill, resample, threshold=128):
    # Brighten the dark pixels only (timm's SolarizeAdd); one lookup table per RGB channel.
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _color(img, factor, fill, resample):
    return ImageEnhance.Color(img).enhance(factor)


def _contrast(img, factor, fill, resample):
    return ImageEnhance.Contrast(img).enhance(factor)


def _brightness(img, factor, fill, resample):
    return ImageEnhance.Brightness(img).enhance(factor)


def _sharpness(img, factor, fill, resample):
    return ImageEnhance.Sharpness(img).enhance(factor)


def _affine(img, matrix, fill, resample):
    # PIL's AFFINE takes the inverse map: output (x, y) samples input (a x + b y + c, d x + e y + f).
    return img.transform(img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill)


def _shear_x(img, factor, fill, resample):
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def _shear_y(img, factor, fill, resample):
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def _translate_x(img, fraction, fill, resample):
    return _affine(img, (1, 0, fraction * img.size[0], 0, 1, 0), fill, resample)


def _translate_y(img, fraction, fill, resample):
    return _affine(img, (1, 0, 0, 0, 1, fraction * img.size[1]), fill, resample)


# -------------------------------------------------------------- magnitude (0..10) -> op arguments
# Each takes (magnitude, translate_pct) and returns the op's level arguments; signed ones draw
# their direction from python `random` (after the magnitude, as in timm).
def _randomly_negate(value: float) -> float:
    return -value if random.random() > 0.5 else value


def _no_args(magnitude: float, translate_pct: float) -> tuple:
    return ()


def _rotate_args(magnitude, translate_pct):
    return (_randomly_negate(magnitude / _LEVEL_DENOM * 30.0),)


def _shear_args(magnitude, translate_pct):
    return (_randomly_negate(magnitude / _LEVEL_DENOM * 0.3),)


def _translate_args(magnitude, translate_pct):
    return (_randomly_negate(magnitude / _LEVEL_DENOM * translate_pct),)


def _posterize_args(magnitude, translate_pct):
    return (int(magnitude / _LEVEL_DENOM * 4),)


def _posterize_increasing_args(magnitude, translate_pct):
    # Fewer bits kept as the magnitude grows: 4 bits at 0, 0 bits at 10.
    return (4 - _posterize_args(magnitude, translate_pct)[0],)


def _solarize_args(magnitude, translate_pct):
    return (min(256, int(magnitude / _LEVEL_DENOM * 256)),)


def _solarize_increasing_args(magnitude, translate_pct):
    # Lower threshold (more pixels inverted) as the magnitude grows.
    return (256 - _solarize_args(magnitude, translate_pct)[0],)


def _solarize_add_args(magnitude, translate_pct):
    return (min(128, int(magnitude / _LEVEL_DENOM * 110)),)


def _enhance_args(magnitude, translate_pct):
    return (magnitude / _LEVEL_DENOM * 1.8 + 0.1,)


def _enhance_increasing_args(magnitude, translate_pct):
    # A factor further from 1 (either way) as the magnitude grows; >= 0.1 so nothing goes flat.
    return (max(0.1, 1.0 + _randomly_negate(magnitude / _LEVEL_DENOM * 0.9)),)


_COMMON_OPS = {
    "AutoContrast": (_auto_contrast, _no_args),
    "Equalize": (_equalize, _no_args),
    "Invert": (_invert, _no_args),
    "Rotate": (_rotate, _rotate_args),
    "SolarizeAdd": (_solarize_add, _solarize_add_args),
    "ShearX": (_shear_x, _shear_args),
    "ShearY": (_shear_y, _shear_args),
    "TranslateXRel": (_translate_x, _translate_args),
    "TranslateYRel": (_translate_y, _translate_args),
}
# timm's _RAND_INCREASING_TRANSFORMS ("inc1", the CvT recipe): every op gets stronger with magnitude.
INCREASING_OPS = {
    **_COMMON_OPS,
    "PosterizeIncreasing": (_posterize, _posterize_increasing_args),
    "SolarizeIncreasing": (_solarize, _solarize_increasing_args),
    "ColorIncreasing": (_color, _enhance_increasing_args),
    "ContrastIncreasing": (_contrast, _enhance_increasing_args),
    "BrightnessIncreasing": (_brightness, _enhance_increasing_args),
    "SharpnessIncreasing": (_sharpness, _enhance_increasing_args),
}
# timm's _RAND_TRANSFORMS ("inc0"): the original RandAugment level mapping.
ORIGINAL_OPS = {
    **_COMMON_OPS,
    "Posterize": (_posterize, _posterize_args),
    "Solarize": (_solarize, _solarize_args),
    "Color": (_color, _enhance_args),
    "Contrast": (_contrast, _enhance_args),
    "Brightness": (_brightness, _enhance_args),
    "Sharpness": (_sharpness, _enhance_args),
}
# timm's list order (it decides which op a given random draw picks).
_OP_ORDER = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


class RandAugment:
    """timm's RandAugment (``rand-m{magnitude}-n{num_ops}-mstd{magnitude_std}-inc1``) on PIL images.

    Per image: pick ``num_ops`` ops uniformly with replacement; apply each with probability ``prob``
    (timm uses 0.5) at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10]. Signed
    ops (rotate, shear, translate, increasing enhancements) pick their direction at random.
    ``increasing=True`` is timm's ``inc1`` op set used by CvT. Draws from python ``random`` only.
    """

    def __init__(
        self,
        num_ops: int = 2,
        magnitude: float = 9,
        magnitude_std: float = 0.5,
        *,
        increasing: bool = True,
        prob: float = 0.5,
        translate_pct: float = 0.45,
        fill: Sequence[int] = (128, 128, 128),
        interpolation: str = "bicubic",
    ) -> None:
        if num_ops < 0 or not 0 <= magnitude <= _LEVEL_DENOM or magnitude_std < 0:
            raise ValueError(
                f"RandAugment needs num_ops >= 0, 0 <= magnitude <= 10, magnitude_std >= 0; "
                f"got {num_ops}, {magnitude}, {magnitude_std}"
            )
        table = INCREASING_OPS if increasing else ORIGINAL_OPS
        suffix = "Increasing" if increasing else ""
        names = [n + suffix if n + suffix in table else n for n in _OP_ORDER]
        self.ops = [(name, *table[name]) for name in names]
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.increasing = increasing
        self.prob = prob
        self.translate_pct = translate_pct
        self.fill = tuple(fill)
        self.resample = _pil_interpolation(interpolation)

    @classmethod
    def from_spec(cls, spec: str, **kwargs) -> RandAugment:
        """Parse a timm config string such as ``rand-m9-mstd0.5-inc1`` with timm's meaning.

        Fields: ``m`` magnitude, ``n`` ops per image, ``mstd`` magnitude std, ``inc`` increasing op
        set, ``p`` apply probability. Left out, they take timm's defaults (m10, n2, mstd0, inc0,
        p0.5), not this class's, so a timm config string means the same here as there.
        """
        parts = spec.split("-")
        if parts[0] != "rand":
            raise ValueError(f"RandAugment spec must start with 'rand', got {spec!r}")
        options: dict = {"num_ops": 2, "magnitude": 10.0, "magnitude_std": 0.0, "increasing": False, "prob": 0.5}
        for part in parts[1:]:
            # "mstd" before "m" in the alternation, so that "mstd0.5" is not read as m = "std0.5".
            match = re.fullmatch(r"(mstd|inc|m|n|p)(\d+(?:\.\d*)?)", part)
            if match is None:
                raise ValueError(
                    f"unknown RandAugment option {part!r} in {spec!r} (expected m, n, mstd, inc or p + a number)"
                )
            key, value = match.group(1), float(match.group(2))
            if key == "mstd":
                options["magnitude_std"] = value
            elif key == "inc":
                options["increasing"] = bool(value)
            elif key == "m":
                options["magnitude"] = value
            elif key == "p":
                options["prob"] = value
            else:
                options["num_ops"] = int(value)
        return cls(**options, **kwargs)

    def __call__(self, img: Image.Image) -> Image.Image:
        for name, op, level_args in random.choices(self.ops, k=self.num_ops):
            if self.prob < 1.0 and random.random() > self.prob:
                continue
            magnitude = self.magnitude
            if self.magnitude_std > 0:
                magnitude = random.gauss(magnitude, self.magnitude_std)
            magnitude = min(max(magnitude, 0.0), _LEVEL_DENOM)
            img = op(img, *level_args(magnitude, self.translate_pct), self.fill, self.resample)
        return img

    def __repr__(self) -> str:
        return (
            f"RandAugment(num_ops={self.num_ops}, magnitude={self.magnitude}, "
            f"magnitude_std={self.magnitude_std}, increasing={self.increasing}, prob={self.prob})"
        )


# ------------------------------------------------------------------------- per-image transforms
class Compose:
    """Apply transforms in order. A class, not a closure, so DataLoader workers can pickle it."""

    def __init__(self, transforms: Sequence[Callable]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x):
        for t in self.transforms:
            x = t(x)
        return x

    def __repr__(self) -> str:
        return "Compose(\n" + "".join(f"    {t!r},\n" for t in self.transforms) + ")"


class RandomResizedCrop:
    """torchvision/timm's random-resized crop: a random box of ``scale`` x the image area and aspect
    ratio in ``ratio`` (log-uniform), resized to ``size`` x ``size``; 10 tries, then a centre crop.
    Draws from python ``random``."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: str = "bicubic",
    ) -> None:
        self.size = size
        self.scale = scale
        self.ratio = ratio
        self.resample = _pil_interpolation(interpolation)

    def get_params(self, width: int, height: int) -> tuple[int, int, int, int]:
        """The crop box ``(left, top, w, h)``."""
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target_area = random.uniform(*self.scale) * area
            aspect = math.exp(random.uniform(*log_ratio))
            w = int(round(math.sqrt(target_area * aspect)))
            h = int(round(math.sqrt(target_area / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                return left, top, w, h
        # Fallback: the largest centred box whose aspect ratio is inside `ratio`.
        in_ratio = width / height
        if in_ratio < min(self.ratio):
            w, h = width, int(round(width / min(self.ratio)))
        elif in_ratio > max(self.ratio):
            w, h = int(round(height * max(self.ratio))), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, w, h = self.get_params(*img.size)
        # resize(box=...) crops and resizes in one pass (same result as crop() then resize()).
        return img.resize((self.size, self.size), self.resample, box=(left, top, left + w, top + h))

    def __repr__(self) -> str:
        return f"RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})"


class RandomHorizontalFlip:
    """Mirror with probability ``p``. Draws from python ``random``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random.random() < self.p else img

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class ToNormalizedTensor:
    """PIL RGB image -> float32 ``[3, H, W]``, scaled to 0..1 then ``(x - mean) / std``."""

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # np.array copies, so the tensor owns writable memory (np.asarray of a PIL image is read-only).
        # contiguous() before the float ops: on the channels-last view they are several times slower.
        x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return x.float().div_(255.0).sub_(self.mean).div_(self.std)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()})"


class RandomErasing:
    """timm's random erasing on a normalised ``[C, H, W]`` image or ``[B, C, H, W]`` batch.

    With probability ``probability`` per image, replace a box of 2%..1/3 of the area (aspect ratio
    0.3..3.3, log-uniform) with ``mode="pixel"``: per-pixel N(0, 1) noise (in normalised units, i.e.
    the dataset's own pixel statistics), ``"rand"``: one random colour per box, ``"const"``: zeros.
    Returns a new tensor; the input is left unchanged. Box geometry and the apply decision draw
    from python ``random``, the noise from ``torch``.
    """

    def __init__(
        self,
        probability: float = 0.25,
        mode: str = "pixel",
        *,
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
    ) -> None:
        if mode not in ("pixel", "rand", "const"):
            raise ValueError(f"RandomErasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        self.probability = probability
        self.mode = mode
        self.min_area = min_area
        self.max_area = max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect or 1 / min_aspect))

    def _erase(self, img: torch.Tensor) -> None:
        if random.random() > self.probability:
            return
        channels, height, width = img.shape
        for _ in range(10):
            target_area = random.uniform(self.min_area, self.max_area) * height * width
            aspect = math.exp(random.uniform(*self.log_aspect))
            h = int(round(math.sqrt(target_area * aspect)))
            w = int(round(math.sqrt(target_area / aspect)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                if self.mode == "pixel":
                    patch = torch.empty((channels, h, w), dtype=img.dtype).normal_()
                elif self.mode == "rand":
                    patch = torch.empty((channels, 1, 1), dtype=img.dtype).normal_()
                else:
                    patch = torch.zeros((), dtype=img.dtype)
                img[:, top:top + h, left:left + w] = patch
                return

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"RandomErasing expects [C, H, W] or [B, C, H, W], got shape {tuple(x.shape)}")
        x = x.clone()
        for img in (x.unsqueeze(0) if x.dim() == 3 else x):
            self._erase(img)  # img is a view into x
        return x

    def __repr__(self) -> str:
        return f"RandomErasing(probability={self.probability}, mode={self.mode!r})"


class RandomAffineTensor:
    """Small random rotation, scale and translation of a normalised tensor image or batch.

    Batched (one ``affine_grid`` + ``grid_sample`` call for the whole batch), so it suits tiny
    in-memory datasets such as digits where PIL round trips would cost more than the model.
    Pixels moved in from outside are ``fill`` (per channel, normalised units; e.g. the background).
    No flip: digits and text are not mirror-invariant. Draws from ``torch``.
    """

    def __init__(
        self,
        degrees: float = 10.0,
        translate: float = 0.1,
        scale: tuple[float, float] = (0.9, 1.1),
        fill: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.degrees = degrees
        self.translate = translate
        self.scale = scale
        self.fill = torch.tensor(fill, dtype=torch.float32).view(1, -1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        batch = x if x.dim() == 4 else x.unsqueeze(0)
        b, _, height, width = batch.shape
        angle = (torch.rand(b) * 2 - 1) * math.radians(self.degrees)
        zoom = self.scale[0] + torch.rand(b) * (self.scale[1] - self.scale[0])
        shift = (torch.rand(b, 2) * 2 - 1) * (2 * self.translate)  # grid coordinates span 2 per side
        # theta maps output grid coordinates to input ones; the H/W factors keep the rotation
        # rigid on non-square images (grid x and y are normalised by different lengths).
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos, -sin * height / width, shift[:, 0]], dim=-1),
                torch.stack([sin * width / height, cos, shift[:, 1]], dim=-1),
            ],
            dim=1,
        )
        grid = F.affine_grid(theta, list(batch.shape), align_corners=False)
        fill = self.fill.to(batch.dtype)
        # grid_sample pads with zeros: shift so that "zero" is the fill value.
        out = F.grid_sample(batch - fill, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + fill
        return out if x.dim() == 4 else out.squeeze(0)

    def __repr__(self) -> str:
        return f"RandomAffineTensor(degrees={self.degrees}, translate={self.translate}, scale={self.scale})"


def train_transform(
    image_size: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: str | None = "rand-m9-mstd0.5-inc1",
    random_erasing: float = 0.25,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> Compose:
    """The CvT paper's per-image training pipeline: PIL RGB image -> normalised ``[3, S, S]`` tensor.

    Random-resized crop -> flip -> RandAugment (``randaugment`` spec, None to skip) -> tensor ->
    normalise -> random erasing (per-pixel noise, probability ``random_erasing``; 0 to skip, e.g.
    when the trainer erases on the batch). As timm, RandAugment fills with the mean colour and
    translates by up to 45 % of the image.
    """
    steps: list[Callable] = [RandomResizedCrop(image_size, scale, ratio, interpolation)]
    if hflip > 0:
        steps.append(RandomHorizontalFlip(hflip))
    if randaugment:
        steps.append(RandAugment.from_spec(randaugment, fill=_fill_color(mean), interpolation=interpolation))
    steps.append(ToNormalizedTensor(mean, std))
    if random_erasing > 0:
        steps.append(RandomErasing(random_erasing, mode="pixel"))
    return Compose(steps)


def finetune_transform(
    image_size: int,
    *,
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    hflip: float = 0.5,
    randaugment: str | None = None,
    random_erasing: float = 0.0,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> Compose:
    """A lighter pipeline for fine-tuning a pre-trained model on a small dataset.

    Pre-trained features already carry the invariances heavy augmentation teaches; on a few
    thousand images the paper recipe (8 % crops, RandAugment m9) mostly slows convergence. Crops
    keep >= 35 % of the image; pass e.g. ``randaugment="rand-m5-mstd0.5-inc1"`` for a weak one.
    """
    return train_transform(
        image_size, scale=scale, ratio=ratio, hflip=hflip, randaugment=randaugment,
        random_erasing=random_erasing, mean=mean, std=std, interpolation=interpolation,
    )


# ---------------------------------------------------------------------------- mixup and cutmix
def one_hot(target: torch.Tensor, num_classes: int, on_value: float = 1.0, off_value: float = 0.0) -> torch.Tensor:
    target = target.long().view(-1, 1)
    return torch.full((target.shape[0], num_classes), off_value, device=target.device).scatter_(1, target, on_value)


def mixup_target(target: torch.Tensor, num_classes: int, lam: float = 1.0, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``; every row sums to 1.

    Smoothing puts ``smoothing / num_classes`` on every class and the rest on the true class (timm).
    """
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = one_hot(target, num_classes, on_value, off_value)
    y2 = one_hot(target.flip(0), num_classes, on_value, off_value)
    return y1 * lam + y2 * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float) -> tuple[int, int, int, int]:
    """timm's ``rand_bbox``: a box of ~(1 - lam) of the image, centre uniform, clipped at the
    border. Returns ``(top, bottom, left, right)``. Draws from python ``random``."""
    cut = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = random.randrange(height), random.randrange(width)
    top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return top, bottom, left, right


class Mixup:
    """timm's ``Mixup`` in batch mode: ``(x [B, C, H, W], y [B]) -> (mixed x, soft targets [B, N])``.

    With probability ``prob`` a batch is mixed with its own reverse (``x.flip(0)``) using one lambda
    for the whole batch: cutmix (probability ``switch_prob`` when both are enabled; lambda ~
    Beta(cutmix_alpha, cutmix_alpha), then corrected to the clipped box's actual area) or mixup
    (lambda ~ Beta(mixup_alpha, mixup_alpha), a pixel-wise blend). Targets are smoothed one-hots
    mixed with the same lambda. With both alphas 0 only label smoothing is applied. Odd batches
    work (the middle sample mixes with itself). Draws from python ``random``.
    """

    def __init__(
        self,
        mixup_alpha: float = 0.8,
        cutmix_alpha: float = 1.0,
        prob: float = 1.0,
        switch_prob: float = 0.5,
        label_smoothing: float = 0.1,
        *,
        num_classes: int,
        correct_lam: bool = True,
    ) -> None:
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha and cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        if not (0 <= prob <= 1 and 0 <= switch_prob <= 1 and 0 <= label_smoothing < 1):
            raise ValueError(
                f"need 0 <= prob, switch_prob <= 1 and 0 <= label_smoothing < 1, "
                f"got {prob}, {switch_prob}, {label_smoothing}"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.mixup_alpha = mixup_alpha
        self.cutmix_alpha = cutmix_alpha
        self.prob = prob
        self.switch_prob = switch_prob
        self.label_smoothing = label_smoothing
        self.num_classes = num_classes
        self.correct_lam = correct_lam

    def sample(self) -> tuple[float, bool]:
        """``(lam, use_cutmix)`` for one batch, in timm's order of draws; lam 1 means no mixing."""
        enabled = self.mixup_alpha > 0 or self.cutmix_alpha > 0
        if not enabled or random.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = random.random() < self.switch_prob
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return random.betavariate(alpha, alpha), use_cutmix

    def __call__(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lam, use_cutmix = self.sample()
        if lam < 1.0:
            if use_cutmix:
                top, bottom, left, right = cutmix_box(x.shape[-2], x.shape[-1], lam)
                x = x.clone()
                x[..., top:bottom, left:right] = x.flip(0)[..., top:bottom, left:right]
                if self.correct_lam:
                    # The box was clipped at the border: weigh the targets by the pixels really pasted.
                    lam = 1.0 - (bottom - top) * (right - left) / (x.shape[-2] * x.shape[-1])
            else:
                x = x * lam + x.flip(0) * (1.0 - lam)
        return x, mixup_target(target, self.num_classes, lam, self.label_smoothing)

    def __repr__(self) -> str:
        return (
            f"Mixup(mixup_alpha={self.mixup_alpha}, cutmix_alpha={self.cutmix_alpha}, prob={self.prob}, "
            f"switch_prob={self.switch_prob}, label_smoothing={self.label_smoothing}, num_classes={self.num_classes})"
        )


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against soft targets ``[B, N]`` (mixup/cutmix/smoothing): mean over the batch
    of ``-sum(target * log_softmax(logits))``."""

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
