"""timm's random erasing (Zhong et al. 2017) on normalised tensors: one image or a whole batch.

The CvT recipe erases with probability 0.25 per image and fills the box with per-pixel N(0, 1)
noise, which in normalised units has the dataset's own pixel statistics. The apply decision and
the box come from python ``random``, the noise from ``torch``.
"""

from __future__ import annotations

import math
import random

import torch


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
