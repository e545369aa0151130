"""Training augmentation: the CvT paper's recipe, after timm, without torchvision or timm.

The official CvT training (microsoft/CvT ``lib/dataset/build.py``) calls timm's ``create_transform``
and ``Mixup`` with: random-resized crop (bicubic) -> horizontal flip -> RandAugment
``rand-m9-mstd0.5-inc1`` -> to tensor -> normalise -> random erasing (p 0.25, per-pixel noise), then
per batch mixup 0.8 / cutmix 1.0 (switch 0.5) with label smoothing 0.1. This package re-implements
those pieces with Pillow and torch, following timm's semantics and order of random draws, one
topic a module:

* ``pipeline``: ``train_transform`` (the per-image pipeline above: PIL image -> normalised
  ``[3, H, W]`` tensor) and ``finetune_transform`` (crop scale 0.35..1, flip, no RandAugment).
* ``randaugment``: timm's ``RandAugment``, the increasing-magnitude op set by default.
* ``crops``: ``RandomResizedCrop``, ``RandomHorizontalFlip``, ``ToNormalizedTensor``, and
  ``RandomAffineTensor``, a small batched rotate/scale/translate on tensors (the digits recipe).
* ``erasing``: timm's ``RandomErasing``, on one normalised image or a batch.
* ``mixup``: batch ``Mixup``/cutmix with smoothed soft targets, for ``nn.CrossEntropyLoss()``.

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

from .crops import RandomAffineTensor, RandomHorizontalFlip, RandomResizedCrop, ToNormalizedTensor
from .erasing import RandomErasing
from .mixup import Mixup, cutmix_box, mixup_target
from .pipeline import Compose, finetune_transform, train_transform
from .randaugment import INCREASING_OPS, ORIGINAL_OPS, RandAugment

__all__ = [
    "Compose", "INCREASING_OPS", "Mixup", "ORIGINAL_OPS", "RandAugment", "RandomAffineTensor", "RandomErasing",
    "RandomHorizontalFlip", "RandomResizedCrop", "ToNormalizedTensor", "cutmix_box", "finetune_transform",
    "mixup_target", "train_transform",
]
