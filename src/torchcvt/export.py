"""``cvt export``: ONNX and torch.export (``.pt2``) files of the network, checked after writing.

The exported graph is the network alone: input ``pixel_values`` ``[B, 3, H, W]`` float32, RGB,
resized, cropped and normalised as described by ``preprocess`` in the JSON file written beside
the model (``model.onnx`` -> ``model.onnx.json``); output ``logits`` ``[B, num_classes]``.
With ``dynamic=True`` the batch, height and width are free (sides from ``min_dynamic_side``).

``cvt export --weights SRC`` exports trained weights (a checkpoint, a hub id, or a registry name
with public weights); ``cvt export --model NAME`` exports the layout of a registry name with random
weights (for deployment tests before training); both together check the checkpoint against the layout.

Nothing is replaced unchecked: the export goes to a temporary file, is run against PyTorch
(onnxruntime, or the reloaded program) and has its opset read back, and only then is renamed over
``--output``; the JSON beside it follows once the model is in place. A failed export or check
leaves an existing ``--output`` as it was.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import warnings
from pathlib import Path

import torch

from .config import CvTConfig
from .errors import ConfigError, ExportError, OutputError, TorchCvTError
from .fileio import atomic_save, check_output, to_json
from .transforms import PreprocessConfig

TOLERANCE = 1e-4
FORMATS = ("onnx", "pt2")
# Opsets measured on CvT with torch 2.13's dynamo exporter and onnxruntime 1.32 (every opset 3-29
# exported, its file's declared opset read, run in onnxruntime): 18-25 are written as asked and give
# PyTorch's logits; below 18 the exporter silently writes 18, from 26 up a model onnxruntime rejects.
# Each export's declared opset is checked anyway, so another torch or onnxruntime cannot slip through.
ONNX_OPSETS = range(18, 26)


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


def _dynamic_shapes(model: torch.nn.Module, *, batch_only: bool = False) -> dict[str, dict[int, torch.export.Dim]]:
    Dim = torch.export.Dim
    batch = Dim("batch", min=1, max=4096)
    if batch_only:
        return {"x": {0: batch}}
    side = min_dynamic_side(model.config)
    return {"x": {0: batch, 2: Dim("height", min=side, max=8192), 3: Dim("width", min=side, max=8192)}}


def check_shapes(dynamic: bool | str, image_size: int | tuple[int, int]) -> list[tuple[int, int, int]]:
    """(batch, height, width) of the inputs an export is checked on: two different ones when dynamic."""
    h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
    if dynamic == "batch":
        return [(1, h, w), (3, h, w)]
    return [(1, h, w), (3, h + 64, w + 32)] if dynamic else [(1, h, w)]


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, *, image_size: int | tuple[int, int] | None = None,
                dynamic: bool | str = True, opset: int | None = None, tolerance: float = TOLERANCE) -> Path:
    """Write ``model`` (eval mode) as one self-contained ONNX file, weights included (dynamo exporter).

    ``dynamic``: True, free batch, height and width; ``"batch"``: free batch at a fixed ``image_size``
    (an int, or ``(height, width)``); False: fixed at ``[1, C, height, width]``.
    The file is written to a temporary name, run in onnxruntime against PyTorch (``check_shapes``)
    and renamed over ``path`` only when it matches within ``tolerance`` and has the ``opset``
    asked for; otherwise an ``ExportError`` says why and an existing ``path`` is left as it was.
    """
    write_checked(model, path, "onnx", image_size=image_size, dynamic=dynamic, opset=opset, tolerance=tolerance)
    return Path(path)


def export_program(model: torch.nn.Module, path: str | os.PathLike, *, image_size: int | None = None,
                   dynamic: bool = True, tolerance: float = TOLERANCE) -> Path:
    """Write ``model`` (eval mode) with ``torch.export`` and ``torch.export.save`` to a ``.pt2`` file,
    checked after reloading it, as ``export_onnx`` checks its file."""
    write_checked(model, path, "pt2", image_size=image_size, dynamic=dynamic, tolerance=tolerance)
    return Path(path)


def write_checked(model: torch.nn.Module, path: str | os.PathLike, fmt: str, *,
                  image_size: int | tuple[int, int] | None = None, dynamic: bool | str = True, opset: int | None = None, tolerance: float = TOLERANCE) -> float:
    """Export to a temporary file, check it, rename it over ``path``; returns ``max_difference``."""
    if opset is not None and opset not in ONNX_OPSETS:
        raise ConfigError(f"opset {opset}: not available here; {_opsets_that_work()}")
    path = Path(path)
    model = model.eval()
    size = image_size or model.config.image_size
    height, width = (size, size) if isinstance(size, int) else size
    x = _example_input(model, 2 if dynamic else 1, height, width)
    shapes = _dynamic_shapes(model, batch_only=dynamic == "batch") if dynamic else None
    diff = math.nan

    def write(tmp: str) -> None:
        nonlocal diff
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            try:
                if fmt == "onnx":
                    program = torch.onnx.export(model, (x,), None, dynamo=True, dynamic_shapes=shapes,
                                                opset_version=opset, verbose=False,
                                                input_names=["pixel_values"], output_names=["logits"])
                    program.save(tmp, external_data=False)  # one file: the weights of every CvT fit in ONNX's 2 GB
                else:
                    buffer = io.BytesIO()  # torch.export.save wants a name ending in .pt2 or a buffer
                    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=shapes), buffer)
                    Path(tmp).write_bytes(buffer.getvalue())
            except (OSError, TorchCvTError):
                raise
            except Exception as exc:
                raise ExportError(f"{fmt} export to {path} failed: {_first_line(exc)}") from None
        if fmt == "onnx" and opset is not None and (written := onnx_opset(tmp)) != opset:
            raise ExportError(f"opset {opset} was asked for but the exporter wrote opset {written}; {_opsets_that_work()}")
        diff = max_difference(model, tmp, fmt, check_shapes(dynamic, size))
        if not diff <= tolerance:
            raise ExportError(f"the exported model differs from PyTorch by {diff:.2e} > tolerance {tolerance:g}; "
                              f"{path} was not written")

    atomic_save(write, path)
    return diff


def onnx_opset(path: str | os.PathLike) -> int | None:
    """The default-domain (ai.onnx) opset an ONNX file declares."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _opsets_that_work() -> str:
    return (f"opsets that export CvT exactly and run in onnxruntime here: {ONNX_OPSETS.start} to {ONNX_OPSETS.stop - 1} "
            "(default: the exporter's own)")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__


def max_difference(model: torch.nn.Module, path: str | os.PathLike, fmt: str, shapes: list[tuple[int, int, int]]) -> float:
    """Largest ``|exported(x) - model(x)|`` over random inputs of the given (batch, height, width)."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError:
            raise TorchCvTError("checking an ONNX file needs onnxruntime: pip install 'torchcvt[export]'") from None
        try:
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ExportError(f"onnxruntime cannot load the exported model: {_first_line(exc)}") from None
        run = lambda x: torch.from_numpy(session.run(None, {"pixel_values": x.numpy()})[0])  # noqa: E731
    else:
        run = torch.export.load(io.BytesIO(Path(path).read_bytes())).module()
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
    sidecar = sidecar_path(path)
    atomic_save(lambda tmp: Path(tmp).write_text(to_json(info, indent=2) + "\n"), sidecar)
    return sidecar


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON file written beside an export: ``model.onnx`` -> ``model.onnx.json``."""
    return Path(path).with_name(Path(path).name + ".json")


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
    parser.add_argument("--opset", type=int, default=None,
                        help=f"ONNX opset, {ONNX_OPSETS.start}-{ONNX_OPSETS.stop - 1} (default: the exporter's); written exactly or refused")
    parser.add_argument("--dynamic", action="store_true", help="free batch size, height and width (default: fixed 1 x image size)")
    parser.add_argument("--image-size", type=int, default=None, help="example / fixed input side (default: the model's)")
    parser.add_argument("--optimized", action="store_true", help="export fuse_for_inference(model) (BatchNorm and scale folded, fused epilogues)")
    parser.add_argument("--tolerance", type=float, default=TOLERANCE,
                        help=f"largest accepted difference from PyTorch; a larger one writes nothing (default {TOLERANCE})")
    parser.add_argument("--allow-nonfinite-weights", action="store_true",
                        help="load weights holding NaN or inf (refused by default), for debugging")


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
    if args.opset is not None and args.opset not in ONNX_OPSETS:
        raise ConfigError(f"--opset {args.opset}: not available here; {_opsets_that_work()}")
    if args.weights is None and args.model is None:
        raise ConfigError("pass --weights (trained weights) or --model NAME (a registry layout with random weights)")
    # Where the files go, and a layout known by name, are checked before any (slow) load or download.
    output = check_output(args.output, "--output")
    if sidecar_path(output).is_dir():
        raise OutputError(f"--output {output}: its description {sidecar_path(output)} is a directory")
    name = args.model or (args.weights if resolve(args.weights) is not None else None)
    if name is not None:
        _export_size(args, preset_config(name))
    model = create_model(args.model, weights=args.weights, allow_nonfinite=args.allow_nonfinite_weights).eval()
    size = _export_size(args, model.config)
    preprocess = preprocess_config_of(model)
    if args.optimized:
        from .fused import fuse_for_inference

        model = fuse_for_inference(model)
    # The model file first, checked before it replaces anything; its description only once it has.
    diff = write_checked(model, output, args.format, image_size=size, dynamic=args.dynamic, opset=args.opset,
                         tolerance=args.tolerance)
    sidecar = write_preprocessing(model, output, preprocess)
    checked = ", ".join(f"{b}x{model.config.num_channels}x{h}x{w}" for b, h, w in check_shapes(args.dynamic, size))
    print(f"wrote {output} ({output.stat().st_size / 2**20:.1f} MiB) and {sidecar.name}")
    print(f"max |{args.format} - pytorch| = {diff:.2e} on inputs {checked} (tolerance {args.tolerance:g})")
    return 0
