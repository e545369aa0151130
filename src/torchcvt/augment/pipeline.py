"""The per-image training pipelines: the CvT paper's recipe (``train_transform``) and a lighter
fine-tuning one (``finetune_transform``), each a picklable ``Compose`` of this package's steps."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from ..transforms import IMAGENET_MEAN, IMAGENET_STD
from .crops import RandomHorizontalFlip, RandomResizedCrop, ToNormalizedTensor
from .erasing import RandomErasing
from .randaugment import RandAugment


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


def _fill_color(mean: Sequence[float]) -> tuple[int, int, int]:
    """The 0..255 colour of the dataset mean: what timm fills uncovered pixels with, so that after
    normalisation they are ~0 rather than a strong black edge."""
    return tuple(min(255, round(255 * m)) for m in mean)  # type: ignore[return-value]


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
