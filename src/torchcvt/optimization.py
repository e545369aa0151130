"""The optimizer and learning-rate schedule of the CvT recipes: AdamW without decay on norms, biases
and cls tokens, and a linear warm-up followed by half a cosine, per optimizer step."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for tensors with ndim <= 1 (norms, biases) and ``model.no_weight_decay()``
    names (the cls tokens), as the official code; decay for every weight matrix and kernel."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, *, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then half a cosine down to
    ``min_lr`` at ``total_steps`` (per optimizer step; timm's per-epoch steps, made smooth)."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, warmup_lr: float, min_lr: float, warmup_steps: int,
    total_steps: int, device: torch.device,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups`` (fused on CUDA) and a scheduler that sets ``lr_at(step)`` after
    every ``scheduler.step()``; both have a ``state_dict`` for checkpoints."""
    optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, fused=True if device.type == "cuda" else None)
    schedule = dict(lr=lr, warmup_lr=warmup_lr, min_lr=min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **schedule) / lr)
    return optimizer, scheduler


def follow_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Set the optimizer's learning rate to the schedule's value at the step the scheduler is at.

    After a checkpoint is restored the optimizer holds the rate the *saved* schedule gave; when the
    run resumes with another ``--epochs`` (extended), this re-reads it from the new schedule, so every
    later step gets the rate a run started with the new ``--epochs`` has at that step. (With the same
    schedule it sets the very value that was saved.)"""
    scheduler.last_epoch -= 1
    scheduler.step()  # recomputes lr_at(last_epoch) for every group
