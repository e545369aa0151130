"""``cvt export``: ONNX and torch.export (``.pt2``) files of the network, checked after writing.

The exported graph is the network alone: input ``pixel_values`` ``[B, 3, H, W]`` float32, RGB,
resized, cropped and normalised as described by ``preprocess`` in the JSON file written beside
the model (``model.onnx`` -> ``model.onnx.json``); output ``logits`` ``[B, num_classes]``.
With ``dynamic=True`` the batch, height and width are free (sides from ``min_dynamic_side``).

``cvt export --weights SRC`` exports trained weights (a checkpoint, a hub id, or a registry name
with public weights); ``cvt export --model NAME`` exports the layout of a registry name with random
weights (for deployment tests before training); both together check the checkpoint against the layout.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch

from .config import CvTConfig
from .errors import ConfigError, TorchCvTError
from .fileio import atomic_save
from .transforms import PreprocessConfig

TOLERANCE = 1e-4
FORMATS = ("onnx", "pt2")


def _example_input(model: torch.nn.Module, batch: int, height: int, width: int) -> torch.Tensor:
    param = next(model.parameters(), None)
    buffer = next(model.buffers(), None)
    dtype = (param if param is not None else buffer).dtype
    g = torch.Generator().manual_seed(0)
    return torch.randn(batch, model.config.num_channels, height, width, generator=g).to(dtype)


def min_dynamic_side(config: CvTConfig) -> int:
    """Smallest height/width a dynamic export accepts.

    torch.export assumes a symbolic size that was not 1 when traced is never 1 (a 1 would
    broadcast), so every token grid and every strided q/k/v grid must have at least 2 rows and columns.
    """
    side = config.min_input_size()
    while True:
        grids = config.feature_sizes(side, side)
        kv = [((g + 2 * p - k) // s + 1) for (g, _), k, s, p in zip(grids, config.kernel_qkv, config.stride_kv, config.padding_kv)]
        if min(g for g, _ in grids) >= 2 and min(kv) >= 2:
            return side
        side += 1


def _dynamic_shapes(model: torch.nn.Module) -> dict[str, dict[int, torch.export.Dim]]:
    Dim = torch.export.Dim
    side = min_dynamic_side(model.config)
    return {"x": {0: Dim("batch", min=1, max=4096), 2: Dim("height", min=side, max=8192), 3: Dim("width", min=side, max=8192)}}


def check_shapes(dynamic: bool, image_size: int) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the inputs an export is checked on: two different ones when dynamic."""
    s = image_size
    return [(1, s, s), (3, s + 64, s + 32)] if dynamic else [(1, s, s)]


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, image_size: int | None = None,
                dynamic: bool = True, opset: int | None = None) -> Path:
    """Write ``model`` (eval mode) as one self-contained ONNX file, weights included (dynamo exporter).

    ``dynamic``: free batch, height and width; otherwise fixed at ``[1, C, image_size, image_size]``.
    """
    path = Path(path)
    model = model.eval()
    size = image_size or model.config.image_size
    x = _example_input(model, 2 if dynamic else 1, size, size)
    names = dict(input_names=["pixel_values"], output_names=["logits"])

    def write(tmp: str) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                program = torch.onnx.export(
                    model, (x,), None, dynamo=True, dynamic_shapes=_dynamic_shapes(model) if dynamic else None,
                    opset_version=opset, verbose=False, **names,
                )
            except Exception as exc:
                reason = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
                raise TorchCvTError(f"ONNX export to {path} failed: {reason}") from None
        program.save(tmp, external_data=False)  # one file: the weights of every CvT fit in ONNX's 2 GB

    atomic_save(write, path)
    return path


def export_program(model: torch.nn.Module, path: str | os.PathLike, *, image_size: int | None = None,
                   dynamic: bool = True) -> Path:
    """Write ``model`` (eval mode) with ``torch.export`` and ``torch.export.save`` to a ``.pt2`` file."""
    path = Path(path)
    model = model.eval()
    size = image_size or model.config.image_size
    x = _example_input(model, 2 if dynamic else 1, size, size)
    with torch.no_grad():
        program = torch.export.export(model, (x,), dynamic_shapes=_dynamic_shapes(model) if dynamic else None)
    buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer, not our temporary file
    torch.export.save(program, buffer)
    atomic_save(lambda tmp: Path(tmp).write_bytes(buffer.getvalue()), path)
    return path


def max_difference(model: torch.nn.Module, path: str | os.PathLike, fmt: str, shapes: list[tuple[int, int, int]]) -> float:
    """Largest ``|exported(x) - model(x)|`` over random inputs of the given (batch, height, width)."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise TorchCvTError("checking an ONNX file needs onnxruntime: pip install 'torchcvt[export]'") from None
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])  # noqa: E731
    else:
        run = torch.export.load(str(path)).module()
    worst = 0.0
    for b, h, w in shapes:
        x = _example_input(model, b, h, w)
        with torch.no_grad():
            expected = model(x)
            got = run(x)
        worst = max(worst, (got.to(expected.dtype) - expected).abs().max().item())
    return worst


def _steps(cfg: PreprocessConfig) -> str:
    n = cfg.image_size
    if cfg.crop_pct is None:
        resize = f"resize to {n}x{n} ({cfg.resample})"
    else:
        resize = f"resize the shorter side to {int(n / cfg.crop_pct)} ({cfg.resample}), crop the centred {n}x{n}"
    return f"RGB uint8 image: {resize}, multiply by 1/255, subtract mean, divide by std (per channel), layout [3, H, W]"


def write_preprocessing(model: torch.nn.Module, path: Path, preprocess: PreprocessConfig) -> Path:
    """``<file>.json`` beside the export: input layout, preprocessing, output and class names."""
    config = model.config
    info = {
        "input": {"name": "pixel_values", "shape": ["batch", config.num_channels, "height", "width"], "dtype": "float32",
                  "color": "RGB", "min_size": config.min_input_size()},
        "preprocess": {
            "steps": _steps(preprocess),
            "image_size": preprocess.image_size, "crop_pct": preprocess.crop_pct, "resample": preprocess.resample,
            "rescale": 1 / 255, "mean": list(preprocess.mean), "std": list(preprocess.std),
        },
        "output": {"name": "logits", "shape": ["batch", config.num_classes]},
        "id2label": {str(k): v for k, v in (config.id2label or {}).items()} or None,
    }
    sidecar = path.with_name(path.name + ".json")
    atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(info, indent=2) + "\n"), sidecar)
    return sidecar


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", default=None,
                        help="checkpoint (folder, file or hub id) or a registry name with public weights (`cvt models`) "
                             "(default: none; give --weights, --model or both)")
    parser.add_argument("--model", default=None,
                        help="registry name: without --weights, its layout with random weights; with --weights, the layout they must fit "
                             "(default: none)")
    parser.add_argument("--format", choices=FORMATS, required=True, help="onnx (onnxruntime) or pt2 (torch.export)")
    parser.add_argument("--output", required=True, help="file to write")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--dynamic", action="store_true", help="free batch size, height and width (default: fixed 1 x image size)")
    parser.add_argument("--image-size", type=int, default=None, help="example / fixed input side (default: the model's)")
    parser.add_argument("--optimized", action="store_true", help="export optimize_for_inference(model) (folded BatchNorm, fused k/v)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE, help=f"largest accepted difference from PyTorch (default {TOLERANCE})")


def _export_size(args: argparse.Namespace, config: CvTConfig) -> int:
    """The example / fixed input side, checked against the layout (one-line errors)."""
    size = args.image_size or config.image_size
    try:
        config.feature_sizes(size, size)
    except ConfigError as exc:
        raise ConfigError(f"--image-size {size}: {exc}") from None
    if args.dynamic and size < min_dynamic_side(config):
        raise ConfigError(f"--image-size {size}: a dynamic export needs a side of at least {min_dynamic_side(config)}")
    return size


def run(args: argparse.Namespace) -> int:
    from .pretrained import create_model, preprocess_config_of, preset_config, resolve

    if args.opset is not None and args.format != "onnx":
        raise ConfigError("--opset applies to --format onnx only")
    if args.weights is None and args.model is None:
        raise ConfigError("pass --weights (trained weights) or --model NAME (a registry layout with random weights)")
    # A layout known by name is checked before any download.
    name = args.model or (args.weights if resolve(args.weights) is not None else None)
    if name is not None:
        _export_size(args, preset_config(name))
    model = create_model(args.model, weights=args.weights).eval()
    size = _export_size(args, model.config)
    preprocess = preprocess_config_of(model)
    if args.optimized:
        from .fastpath import optimize_for_inference

        model = optimize_for_inference(model)
    output = Path(args.output)
    if args.format == "onnx":
        export_onnx(model, output, image_size=size, dynamic=args.dynamic, opset=args.opset)
    else:
        export_program(model, output, image_size=size, dynamic=args.dynamic)
    sidecar = write_preprocessing(model, output, preprocess)
    shapes = check_shapes(args.dynamic, size)
    diff = max_difference(model, output, args.format, shapes)
    checked = ", ".join(f"{b}x{model.config.num_channels}x{h}x{w}" for b, h, w in shapes)
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) and {sidecar.name}")
    print(f"max |{args.format} - pytorch| = {diff:.2e} on inputs {checked} (tolerance {args.tolerance:g})")
    if not diff <= args.tolerance:
        print(f"error: the exported model differs from PyTorch by {diff:.2e} > {args.tolerance:g}", file=sys.stderr)
        return 1
    return 0
