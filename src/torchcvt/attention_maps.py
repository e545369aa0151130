"""Where the classifier looks: the last stage's cls-token attention, as maps and as ``cvt attention``.

The model computes attention with ``F.scaled_dot_product_attention``, which never materialises the
probabilities. So we capture the input of the last block of the last stage with a forward
pre-hook and recompute, with that block's own modules, the row of the attention matrix that
belongs to the cls token: ``softmax(q_cls k^T * scale)`` per head, exactly what the block used.
The cls token's query bypasses the convolutional projection; the keys are the convolutionally
projected tokens (stride ``stride_kv``), so each map lives on the key grid, e.g. 7x7 for 224 input.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError
from .fileio import atomic_save, check_output
from .inference import add_image_safety_arguments
from .model import CvT
from .transforms import denormalize

FIGURE_SIZE = (10.0, 5.0)  # inches: the overlay on the left, the heads' grid on the right
DEFAULT_DPI = 100


def _check_cls_token(model: CvT) -> None:
    if not model.config.cls_token[-1]:
        raise ConfigError(
            "attention maps need a cls token in the last stage (config.cls_token[-1]); this model has none, "
            "so no single token's attention summarises the image"
        )


@torch.inference_mode()
def cls_attention(model: CvT, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(maps, logits)`` for one preprocessed image ``[3, H, W]`` (or ``[1, 3, H, W]``).

    ``maps``: float32 ``[heads, h, w]``, the cls token's attention probabilities over the key grid
    of the last block (the cls token's attention to itself, the remaining mass, is left out).
    ``logits``: the model's output for the same forward pass, ``[num_classes]``.
    """
    _check_cls_token(model)
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[0] != 1:
        raise ValueError(f"expected one image [3, H, W] or [1, 3, H, W], got shape {list(image.shape)}")
    first = next(model.parameters())
    x = x.to(first.device, first.dtype)
    block = model.stages[-1].blocks[-1]
    captured: dict[str, object] = {}

    def grab(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        # Block.forward(x, H, W): the tokens entering the block and the token grid.
        values = list(args) + [kwargs[k] for k in ("x", "H", "W") if k in kwargs]
        captured["x"], captured["H"], captured["W"] = values[:3]

    was_training = model.training
    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        # Eval mode for the forward pass and for the recomputation (BatchNorm running statistics).
        model.eval()
        logits = model(x)[0]
        maps = _recompute(block, captured["x"], int(captured["H"]), int(captured["W"]))
    finally:
        handle.remove()
        model.train(was_training)
    return maps, logits.float()


def _recompute(block: torch.nn.Module, tokens: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The cls token's attention probabilities ``[heads, h, w]`` of ``block`` for its input ``tokens``."""
    attn = block.attn
    B, _, C = tokens.shape
    heads, head_dim = attn.num_heads, C // attn.num_heads
    x = block.norm1(tokens)  # what the attention sees, [1, 1 + H*W, C]
    cls_token, spatial = torch.split(x, [1, H * W], dim=1)  # [1, 1, C], [1, H*W, C]
    fmap = spatial.transpose(1, 2).reshape(B, C, H, W)  # [1, C, H, W]
    key_map = attn.conv_proj_k(fmap)  # [1, C, h, w], strided by stride_kv
    kh, kw = key_map.shape[-2:]
    keys = torch.cat((cls_token, key_map.flatten(2).transpose(1, 2)), dim=1)  # [1, 1 + h*w, C]
    q = attn.proj_q(cls_token).view(B, 1, heads, head_dim).transpose(1, 2)  # [1, heads, 1, d]
    k = attn.proj_k(keys).view(B, -1, heads, head_dim).transpose(1, 2)  # [1, heads, 1 + h*w, d]
    scores = (q.float() @ k.float().transpose(-2, -1)) * attn.scale  # [1, heads, 1, 1 + h*w]
    probs = scores.softmax(dim=-1)
    return probs[0, :, 0, 1:].reshape(heads, kh, kw)  # drop the cls->cls entry


def attention_maps(model: CvT, image: torch.Tensor) -> torch.Tensor:
    """The last stage's cls-token attention of one preprocessed image: float32 ``[heads, h, w]``."""
    return cls_attention(model, image)[0]


# ------------------------------------------------------------------------------------ rendering
def constant_maps(maps: torch.Tensor, rtol: float = 1e-5) -> torch.Tensor:
    """``[n]`` bool: which of the ``[n, h, w]`` maps are constant (all values within ``rtol`` of the
    largest), as every map on a 1x1 key grid is. Scaled to 0..1, their float rounding would show as speckle."""
    flat = maps.float().flatten(1)
    return (flat.amax(1) - flat.amin(1)) <= rtol * flat.abs().amax(1)


def upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``[n, h, w]`` maps bilinearly resized to ``size`` and scaled to 0..1 each (for display); a
    constant map (``constant_maps``) becomes all zeros rather than its rounding noise stretched to 0..1."""
    up = F.interpolate(maps[:, None].float(), size=size, mode="bilinear", align_corners=False)[:, 0]  # [n, H, W]
    low = up.amin(dim=(1, 2), keepdim=True)
    high = up.amax(dim=(1, 2), keepdim=True)
    scaled = (up - low) / (high - low).clamp_min(1e-12)
    return torch.where(constant_maps(maps)[:, None, None], torch.zeros_like(scaled), scaled)


def overlay(rgb: np.ndarray, heat: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a 0..1 heatmap ``[H, W]`` over a 0..1 RGB image ``[H, W, 3]``: ``(1 - a) rgb + a cmap(heat)``."""
    import matplotlib

    colours = matplotlib.colormaps[cmap](heat)[..., :3]  # [H, W, 3]
    return (1.0 - alpha) * rgb + alpha * colours


def render(
    rgb: np.ndarray,
    maps: torch.Tensor,
    path: str | Path,
    *,
    title: str = "",
    alpha: float = 0.5,
    dpi: int = DEFAULT_DPI,
) -> Path:
    """Write a PNG of ``FIGURE_SIZE`` inches at ``dpi``: the mean-over-heads map over the image on the
    left, one small panel per head on the right (each scaled to its own 0..1 range). A constant map
    has no heatmap: its panel shows the image alone, titled "constant"."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    size = rgb.shape[:2]
    heads = maps.shape[0]
    mean_map = maps.mean(dim=0, keepdim=True)
    mean_heat = upsample(mean_map, size)[0].numpy()
    head_heat = upsample(maps, size).numpy()
    flat, mean_flat = constant_maps(maps).tolist(), bool(constant_maps(mean_map)[0])

    fig = Figure(figsize=FIGURE_SIZE, dpi=dpi)
    FigureCanvasAgg(fig)
    left, right = fig.subfigures(1, 2, wspace=0.02)
    ax = left.add_subplot()
    ax.imshow(rgb if mean_flat else overlay(rgb, mean_heat, alpha))
    ax.set_title((title or "cls-token attention, mean over heads") + (" (constant map)" if mean_flat else ""), fontsize=10)
    ax.axis("off")
    cols = math.ceil(math.sqrt(heads))
    grid = right.subplots(math.ceil(heads / cols), cols, squeeze=False)
    for i, cell in enumerate(grid.flat):
        cell.axis("off")
        if i < heads:
            cell.imshow(rgb if flat[i] else overlay(rgb, head_heat[i], alpha))
            cell.set_title(f"head {i}" + (": constant" if flat[i] else ""), fontsize=8)
    right.suptitle(f"last block, {heads} heads, {maps.shape[1]}x{maps.shape[2]} key grid"
                   + (": every map constant, nothing to show" if all(flat) else ""), fontsize=9)
    path = Path(path)
    atomic_save(lambda tmp: fig.savefig(tmp, format="png", dpi=dpi), path)
    return path


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", metavar="IMAGE", help="the image file")
    parser.add_argument("--weights", required=True, help="registry name (see `cvt models`) or hub id, checkpoint folder or file")
    parser.add_argument("--output", default=None,
                        help="the PNG to write (default: the image's name + _attention.png, in the current folder)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--alpha", type=float, default=0.5, help="heatmap opacity, 0..1 (default: 0.5)")
    parser.add_argument("--dpi", type=int, default=DEFAULT_DPI,
                        help=f"resolution; the PNG is {FIGURE_SIZE[0]:g}x{FIGURE_SIZE[1]:g} inches (default: {DEFAULT_DPI})")
    add_image_safety_arguments(parser)


def run(args: argparse.Namespace) -> int:
    from .inference import class_labels, parse_device
    from .pretrained import load_pretrained
    from .transforms import preprocess

    if not 0.0 <= args.alpha <= 1.0:
        raise ConfigError(f"--alpha must lie in 0..1, got {args.alpha}")
    if args.dpi < 10:
        raise ConfigError(f"--dpi must be >= 10, got {args.dpi}")
    device = parse_device(args.device, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    output = check_output(args.output or f"{Path(args.image).stem}_attention.png", "--output")
    model, pre, _ = load_pretrained(args.weights, allow_nonfinite=args.allow_nonfinite_weights)
    _check_cls_token(model)
    if model.config.num_classes == 0:
        raise ConfigError(f"{args.weights} has no classification head (num_classes=0): no class to title the map with")
    model = model.to(device).eval()
    pre = dataclasses.replace(pre, max_pixels=args.max_pixels)
    pixels = preprocess(args.image, pre)  # [3, H, W]
    maps, logits = cls_attention(model, pixels)
    if bool(constant_maps(maps).all()):
        h, w = maps.shape[1:]
        print(f"note: every head's map is constant ({h}x{w} key grid at {pre.image_size}x{pre.image_size} input"
              f"{': one key, so all attention lands on it' if h * w == 1 else ''}); the picture shows no heatmap",
              file=sys.stderr)
    probs = logits.softmax(dim=-1)
    best = int(probs.argmax())
    title = f"{Path(args.image).name}: {class_labels(model)[best]} ({probs[best]:.1%})"
    rgb = denormalize(pixels.float().cpu(), pre.mean, pre.std).permute(1, 2, 0).numpy()  # the crop the model saw
    path = render(rgb, maps.cpu(), output, title=title, alpha=args.alpha, dpi=args.dpi)
    print(f"wrote {path}: {title}")
    return 0
