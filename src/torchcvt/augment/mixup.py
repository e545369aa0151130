"""Batch mixup and cutmix with label smoothing (timm's ``Mixup`` in batch mode).

A batch is mixed with its own reverse: mixup blends whole images, cutmix pastes a box, and the
targets become the same mix of label-smoothed one-hots, so every target row is a probability
distribution. Train on them with ``nn.CrossEntropyLoss()``, which takes probability targets.
Every decision (apply, mode, lambda, box) is drawn from python ``random``.
"""

from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F


def mixup_target(target: torch.Tensor, num_classes: int, lam: float = 1.0, smoothing: float = 0.0) -> torch.Tensor:
    """Soft targets ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))``; every row sums to 1.

    Smoothing puts ``smoothing / num_classes`` on every class and the rest on the true class (timm).
    """
    off_value = smoothing / num_classes
    on_value = 1.0 - smoothing + off_value
    y1 = _smooth_one_hot(target, num_classes, on_value, off_value)
    y2 = _smooth_one_hot(target.flip(0), num_classes, on_value, off_value)
    return y1 * lam + y2 * (1.0 - lam)


def _smooth_one_hot(target: torch.Tensor, num_classes: int, on_value: float, off_value: float) -> torch.Tensor:
    """``on_value`` at each target's class, ``off_value`` elsewhere: float32 ``[B, num_classes]``."""
    hot = F.one_hot(target.long().view(-1), num_classes).bool()
    return torch.where(hot, on_value, off_value)


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
