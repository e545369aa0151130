"""timm's RandAugment on PIL images: the op set, timm's magnitude-to-argument mapping, and ``RandAugment``.

CvT trains with ``rand-m9-mstd0.5-inc1``: per image, two ops drawn uniformly (with replacement)
from fifteen, each applied with probability 0.5 at a magnitude drawn from N(9, 0.5) on timm's 0..10
scale, using the "increasing" op set (``inc1``) in which every op gets stronger as the magnitude
grows. Ops, argument ranges, op order and the order of random draws follow timm's
``auto_augment.py``, so a seed picks the same ops here as there. Every draw is from python ``random``.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

from PIL import Image, ImageEnhance, ImageOps

from ..transforms import resample_filter

# timm's magnitude scale: a magnitude of 10 is the strongest setting of every op.
_LEVEL_DENOM = 10.0


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
        self.resample = resample_filter(interpolation)

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
