"""Per-image geometry and the step to a tensor: random-resized crop, flip, to normalised tensor.

``RandomResizedCrop`` and ``RandomHorizontalFlip`` work on PIL images and draw from python
``random``, as timm's versions do; ``ToNormalizedTensor`` ends the PIL part of a pipeline.
``RandomAffineTensor`` is the batched tensor counterpart used for the in-memory digits: small
rotations, zooms and shifts, drawn from ``torch``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..transforms import IMAGENET_MEAN, IMAGENET_STD, normalize, resample_filter


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
        self.resample = resample_filter(interpolation)

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
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        # np.array copies, so the tensor owns writable memory (np.asarray of a PIL image is read-only).
        # contiguous() before the float ops: on the channels-last view they are several times slower.
        x = torch.from_numpy(np.array(img.convert("RGB"), dtype=np.uint8)).permute(2, 0, 1).contiguous()
        return normalize(x.float().div_(255.0), self.mean, self.std)

    def __repr__(self) -> str:
        return f"ToNormalizedTensor(mean={self.mean.tolist()}, std={self.std.tolist()})"



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
