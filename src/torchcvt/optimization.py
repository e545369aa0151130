"""The optimizer and learning-rate schedule of the CvT recipes: AdamW without decay on norms, biases
and cls tokens, and a linear warm-up followed by half a cosine, per optimizer step. For fine-tuning:
layer-wise learning-rate decay (``layer_ids``, timm's ``param_groups_layer_decay``) and a frozen
backbone (``freeze_backbone``, ``set_train_mode``: a linear probe)."""

from __future__ import annotations

import math
import re
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups: no decay for tensors with ndim <= 1 (norms, biases) and ``model.no_weight_decay()``
    names (the cls tokens), as the official code; decay for every weight matrix and kernel. Frozen
    parameters (``requires_grad`` False) are left out.

    ``layer_decay``: also one group per layer (``layer_ids``) with ``lr_scale`` =
    ``layer_decay ** (head's id - layer's id)``: the head learns at the full rate, each layer before it
    ``layer_decay`` times slower than the next (``build_optimizer`` applies the scale)."""
    skip = model.no_weight_decay()
    ids = layer_ids(model) if layer_decay is not None else {}
    top = max(ids.values(), default=0)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decays = not (p.ndim <= 1 or name in skip)
        layer = ids.get(name, top)
        group = groups.setdefault((layer, decays), {"params": [], "weight_decay": weight_decay if decays else 0.0})
        if layer_decay is not None:
            group["lr_scale"] = layer_decay ** (top - layer)
        group["params"].append(p)
    if layer_decay is None:  # the two groups in their usual order, even when one is empty
        return [groups.get((0, True), {"params": [], "weight_decay": weight_decay}),
                groups.get((0, False), {"params": [], "weight_decay": 0.0})]
    return [groups[key] for key in sorted(groups)]


_BLOCK = re.compile(r"stages\.(\d+)\.blocks\.(\d+)\.")
_STAGE = re.compile(r"stages\.(\d+)\.")


def layer_ids(model: nn.Module) -> dict[str, int]:
    """Each parameter's layer, counted from the input as timm's ``group_with_matcher`` counts a
    hierarchical model's: every stage's convolutional embedding (with its cls token) is a layer, then
    each of its blocks; the final norm and the head are the last layer (the highest id)."""
    def key(name: str) -> tuple[int, int] | None:
        if m := _BLOCK.match(name):
            return int(m[1]), 1 + int(m[2])
        if m := _STAGE.match(name):
            return int(m[1]), 0  # the stage's embedding and cls token
        return None  # final norm, head

    keys = {name: key(name) for name, _ in model.named_parameters()}
    order = {k: i for i, k in enumerate(sorted({k for k in keys.values() if k is not None}))}
    return {name: order.get(k, len(order)) for name, k in keys.items()}


def freeze_backbone(model: nn.Module) -> None:
    """A linear probe: every parameter but the classifier's (``model.get_classifier()``) stops learning."""
    head = {id(p) for p in model.get_classifier().parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in head)


def set_train_mode(model: nn.Module, *, frozen_backbone: bool = False) -> None:
    """``model.train()``; with a frozen backbone, everything but the classifier stays in eval mode: its
    BatchNorm statistics stay those of the checkpoint and dropout and drop path stay off, so the
    head learns on the features it will see at evaluation."""
    model.train()
    if frozen_backbone:
        inner = getattr(model, "module", model)  # inside DistributedDataParallel
        inner = getattr(inner, "_orig_mod", inner)  # inside torch.compile's wrapper
        head = inner.get_classifier()
        for module in inner.children():
            if module is not head:
                module.eval()


def lr_at(step: int, *, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then half a cosine down to
    ``min_lr`` at ``total_steps`` (per optimizer step; timm's per-epoch steps, made smooth)."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module, *, lr: float, weight_decay: float, warmup_lr: float, min_lr: float, warmup_steps: int,
    total_steps: int, device: torch.device, layer_decay: float | None = None,
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``param_groups`` (fused on CUDA) and a scheduler that sets ``lr_at(step)`` after
    every ``scheduler.step()`` (times the group's ``lr_scale`` with ``layer_decay``: the whole schedule
    scaled, as timm's); both have a ``state_dict`` for checkpoints."""
    groups = param_groups(model, weight_decay, layer_decay)
    for group in groups:
        if "lr_scale" in group:
            group["lr"] = lr * group["lr_scale"]  # LambdaLR multiplies each group's initial rate
    optimizer = torch.optim.AdamW(groups, lr=lr, fused=True if device.type == "cuda" else None)
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
