"""Model summary: per-stage token grid, channels, parameters and MACs (``cvt summary NAME``).

MACs are counted by ``torch.utils.flop_counter`` on a forward pass (FLOPs / 2, matrix products,
convolutions and attention; elementwise work is not counted, as in the paper). ``cvt summary NAME``
runs it on the meta device: the counts need only shapes, so even CvT-W24 costs no memory and
nothing is downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# PyTorch's counter knows the CUDA attention kernels but not the CPU one that runs here.
_EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


@dataclass
class StageSummary:
    name: str
    grid: tuple[int, int] | None  # token grid H x W (None for the head row)
    channels: int
    tokens: int
    params: int
    macs: int


@dataclass
class ModelSummary:
    image_size: tuple[int, int]
    stages: list[StageSummary]
    params: int
    trainable_params: int
    macs: int

    def __str__(self) -> str:
        h, w = self.image_size
        rows = [f"input {h}x{w}", f"{'stage':<8}{'grid':>10}{'tokens':>8}{'channels':>10}{'params':>14}{'GMACs':>9}"]
        for s in self.stages:
            grid = f"{s.grid[0]}x{s.grid[1]}" if s.grid else "-"
            tokens = str(s.tokens) if s.tokens else "-"
            rows.append(f"{s.name:<8}{grid:>10}{tokens:>8}{s.channels:>10}{s.params:>14,}{s.macs / 1e9:>9.3f}")
        rows.append(f"{'total':<8}{'':>10}{'':>8}{'':>10}{self.params:>14,}{self.macs / 1e9:>9.3f}")
        rows.append(f"trainable parameters: {self.trainable_params:,}   MACs: {self.macs / 1e9:.2f} G   FLOPs: {2 * self.macs / 1e9:.2f} G")
        return "\n".join(rows)


def summary(model: torch.nn.Module, image_size: int | tuple[int, int] | None = None) -> ModelSummary:
    """Count parameters and MACs of a CvT per stage for one image of ``image_size`` (default: the config's)."""
    config = model.config
    size = image_size or config.image_size
    h, w = (size, size) if isinstance(size, int) else size
    grids = config.feature_sizes(h, w)  # a one-line ConfigError for an input too small for the layout
    param = next(model.parameters())
    x = torch.zeros(1, config.num_channels, h, w, device=param.device, dtype=param.dtype)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FORMULAS)
    try:
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__

    def macs_of(path: str) -> int:
        return int(sum(counts.get(path, {}).values())) // 2

    rows = []
    for i, grid in enumerate(grids):
        params = sum(p.numel() for p in model.stages[i].parameters())
        tokens = grid[0] * grid[1] + int(config.cls_token[i])
        rows.append(StageSummary(f"stage{i}", grid, config.embed_dim[i], tokens, params, macs_of(f"{root}.stages.{i}")))
    head_params = sum(p.numel() for p in model.norm.parameters()) + sum(p.numel() for p in model.head.parameters())
    total_macs = macs_of("Global")
    rows.append(StageSummary("head", None, config.num_classes, 0, head_params, total_macs - sum(r.macs for r in rows)))
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelSummary((h, w), rows, total, trainable, total_macs)


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="registry name (see `cvt models`: its layout at its input size) or a checkpoint path / hub id")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the model's own)")
    parser.add_argument("--num-classes", type=int, default=None, help="head size (default: the model's own; 0: no head)")


def run(args: argparse.Namespace) -> int:
    from .pretrained import create_model, resolve

    # A registry name is its layout alone (meta device: no weights, no memory, no download); other
    # names are checkpoint paths or hub ids, read with their weights.
    layout_only = resolve(args.name) is not None
    with torch.device("meta") if layout_only else contextlib.nullcontext():
        # Only shapes matter here: weights holding NaN or inf are summarised, not refused.
        model = create_model(args.name, num_classes=args.num_classes, allow_nonfinite=True)
    print(f"{args.name}: {model.config.num_stages} stages, depth {list(model.config.depth)}, widths {list(model.config.embed_dim)}, {model.config.hidden_act}")
    print(summary(model, args.image_size))
    return 0
