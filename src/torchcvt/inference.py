"""Classify images with pretrained CvT weights: ``Classifier`` in Python, ``cvt predict`` and ``cvt models``.

    from torchcvt import Classifier
    Classifier("cvt-13")("cat.jpg")  # -> [(label, probability), ...] best first, 5 of them

Preprocessing is the evaluation transform that belongs to the weights, chosen in this order: an
explicit ``preprocess=``; the registry entry of a registry name or public hub id (pretrained.py);
the checkpoint folder's ``preprocessor_config.json``; else the official recipe for the model's
resolution (shorter side to 256 and a 224 centre crop below 384 pixels, a plain 384x384 resize
from 384 up). ``pretrained.load_pretrained`` makes that choice; a ``CvT`` given as is brings its
own (``model.pretrained_cfg``, set by ``create_model``).

Labels: the checkpoint's ``id2label``; else the ImageNet-1k names for a 1000-class head (official
``.pth`` files carry no names); else ``class_0``, ``class_1``, ...
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import glob
import io
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from .backends import add_backend_arguments, backend_of, inference_runner, log_backend_choice
from .errors import ConfigError, DataError, DiskFullError, ImageError, OutputError, TorchCvTError
from .model import CvT
from .pretrained import LAYOUTS, REGISTRY, load_pretrained, preprocess_config_of
from .fileio import check_output, is_disk_full, to_json
from .images import ImageSource, is_image_file
from .transforms import PreprocessConfig, preprocess

# ----------------------------------------------------------------------------------- classifier
Prediction = tuple[str, float]  # (label, softmax probability)


class TopK(NamedTuple):
    scores: torch.Tensor  # [B, k] float32 probabilities, best first
    indices: torch.Tensor  # [B, k] int64 class indices


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_dtype(dtype: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    if dtype is None:
        return default
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ConfigError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")


def parse_device(device: str | torch.device | None, default: torch.device) -> torch.device:
    """``device`` as a torch device (``default`` when None); a one-line ConfigError when unusable."""
    if device is None:
        return default
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {device!r} is not a torch device (expected e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
    return device


def class_labels(model: CvT) -> list[str]:
    """Class names of the model's head, index by index (see the module docstring for the fallbacks)."""
    config = model.config
    if config.id2label is not None:
        return [config.id2label[i] for i in range(config.num_classes)]
    if config.num_classes == 1000:
        from .labels import imagenet_labels

        return imagenet_labels()
    return [f"class_{i}" for i in range(config.num_classes)]


class Classifier:
    """Pretrained CvT + its evaluation transform + class names; load once, call many times.

    ``weights``: a registry name with public weights (``"cvt-21-384-22k"``, see ``cvt models``) or
    its hub id, a checkpoint folder or file (any format ``load_model`` reads), another hub id, or a
    ``CvT`` (put in eval mode and used as is, with the preprocessing of its ``pretrained_cfg``).
    ``device``: default CUDA when available (a given model: where it is). ``dtype``: float32
    (default), bfloat16 or float16 (CUDA only). ``preprocess``: overrides the transform of the weights.
    ``batch_size``: images per forward pass in ``__call__``. ``backend``: ``"eager"`` (the default,
    except for int8: nothing to export; on the CPU in float32 a fused copy, ``fuse_for_inference``, unless
    ``weights`` is a ``CvT``, which runs as is), ``"onnxruntime"`` or ``"auto"`` (the faster here, measured once;
    ``backends.optimize_for_inference``). ``precision``: ``"float32"``, or ``"int8"``/``"bfloat16"``
    where this CPU runs them faster (elsewhere a one-line ConfigError says so). ``max_pixels``: images
    with more pixels are refused before they are decoded (0: no limit; default: ``preprocess.max_pixels``,
    whose default is Pillow's decompression-bomb threshold, ~89 Mpx). ``allow_nonfinite``: load weights
    holding NaN or inf (refused by default), for debugging.
    """

    def __init__(
        self,
        weights: str | os.PathLike | CvT,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        preprocess: PreprocessConfig | None = None,
        batch_size: int = 32,
        backend: str | None = None,
        precision: str = "float32",
        max_pixels: int | None = None,
        allow_nonfinite: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(weights, CvT):
            model, pre, self.source = weights, preprocess_config_of(weights), "<model>"
            first = next(model.parameters())
            default_device, default_dtype = first.device, first.dtype
        else:
            default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            default_dtype = torch.float32
            # Check the arguments before the (slow) load.
            parse_device(device, default_device)
            _parse_dtype(dtype, default_dtype)
            model, pre, self.source = load_pretrained(weights, allow_nonfinite=allow_nonfinite)
        self.device = parse_device(device, default_device)
        self.dtype = _parse_dtype(dtype, default_dtype)
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise ConfigError(f"dtype float16 needs a CUDA device, got {self.device}; use bfloat16 or float32")
        if model.config.num_classes == 0:
            raise ConfigError(f"{self.source} has no classification head (num_classes=0): nothing to classify")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.precision = precision
        # A model given to us is used as is (its owner may still train it); weights we loaded run as a fused copy.
        self.runner = inference_runner(self.model, backend, precision, copy=not isinstance(weights, CvT))
        self.backend = backend_of(self.runner)
        self.preprocess_config = preprocess or pre
        if max_pixels is not None:
            self.preprocess_config = dataclasses.replace(self.preprocess_config, max_pixels=max_pixels)
        self.labels = class_labels(model)
        self.batch_size = batch_size

    def __repr__(self) -> str:
        p = self.preprocess_config
        crop = f"crop_pct={p.crop_pct}" if p.crop_pct is not None else "no crop"
        return (f"Classifier({self.source!r}, {self.model.config.num_classes} classes, {p.image_size}px {p.resample} "
                f"{crop}, device={self.device}, dtype={str(self.dtype).removeprefix('torch.')}, backend={self.backend}"
                + (f", precision={self.precision})" if self.precision != "float32" else ")"))

    def preprocess(self, image: ImageSource, name: str | None = None) -> torch.Tensor:
        """The normalised float32 ``[3, H, W]`` tensor the model sees for ``image`` (path, PIL, array, tensor,
        encoded bytes; ``name``: what error messages call bytes)."""
        return preprocess(image, self.preprocess_config, name)

    @torch.inference_mode()
    def probabilities(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``[B, num_classes]`` (float32, on ``self.device``) of a preprocessed
        ``[B, 3, H, W]`` batch."""
        x = pixels.to(self.device, self.dtype, non_blocking=True)
        return self.runner(x).float().softmax(dim=-1)

    def predict_batch(self, pixels: torch.Tensor, top_k: int = 5) -> TopK:
        """Top-k softmax probabilities of a preprocessed ``[B, 3, H, W]`` batch (float32, on the CPU)."""
        return best_k(self.probabilities(pixels), top_k)

    def ranked(self, top: TopK) -> list[list[tuple[int, str, float]]]:
        """Per image of ``top``, its classes as ``(index, label, score)``, best first."""
        return [[(i, self.labels[i], s) for i, s in zip(idx, sc)]
                for idx, sc in zip(top.indices.tolist(), top.scores.tolist())]

    def __call__(
        self, images: ImageSource | Sequence[ImageSource], top_k: int = 5
    ) -> list[Prediction] | list[list[Prediction]]:
        """Classify one image (-> a list of ``(label, score)``, best first) or a list/tuple of images
        (-> one such list per image). Scores are softmax probabilities; ``top_k`` is capped at the
        number of classes."""
        if top_k < 1:
            raise ConfigError(f"top_k must be >= 1, got {top_k}")
        single = not isinstance(images, (list, tuple))
        batch = [images] if single else list(images)
        results: list[list[Prediction]] = []
        for start in range(0, len(batch), self.batch_size):
            pixels = torch.stack([self.preprocess(im) for im in batch[start:start + self.batch_size]])
            results += [[(label, s) for _, label, s in row] for row in self.ranked(self.predict_batch(pixels, top_k))]
        return results[0] if single else results


def best_k(probabilities: torch.Tensor, k: int) -> TopK:
    """The ``k`` most probable classes of each row of ``[B, num_classes]`` probabilities (``k`` capped
    at the number of classes), on the CPU."""
    scores, indices = probabilities.topk(min(k, probabilities.shape[-1]), dim=-1)  # [B, k] each
    return TopK(scores.cpu(), indices.cpu())


def json_top_k(ranked: Sequence[tuple[int, str, float]]) -> list[dict]:
    """One image's ``(index, label, score)`` rows as ``cvt predict --format json`` writes them; a
    non-finite score (weights loaded with ``--allow-nonfinite-weights``) is ``None``, JSON's null."""
    return [{"label": label, "index": index, "score": round(score, 6) if math.isfinite(score) else None}
            for index, label, score in ranked]


# ------------------------------------------------------------------------------- finding images
def collect_images(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Expand INPUT arguments into image files, and say what could not be read.

    A file named explicitly is always taken (if it is no image, reading it fails and says so).
    Folders are walked recursively in sorted order, and glob patterns (``**`` allowed) expanded;
    from those, only ``images.is_image_file`` names are taken (a suffix Pillow reads, not hidden:
    the rule training data follows too).
    Returns the files (duplicates removed, first occurrence kept) and one message per missing
    path, unmatched pattern or unreadable folder.
    """
    files: list[Path] = []
    problems: list[str] = []

    def walk(top: Path) -> None:
        def failed(exc: OSError) -> None:
            problems.append(f"{exc.filename}: cannot read folder: {exc.strerror or exc}")

        for folder, dirnames, filenames in os.walk(top, onerror=failed):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            files.extend(Path(folder, f) for f in sorted(filenames) if is_image_file(f))

    for item in inputs:
        path = Path(item)
        if path.is_dir():
            walk(path)
        elif path.exists():
            files.append(path)
        elif glob.has_magic(item):
            matches = sorted(glob.glob(item, recursive=True))
            if not matches:
                problems.append(f"{item}: no file matches this pattern")
            for match in map(Path, matches):
                if match.is_dir():
                    walk(match)
                elif is_image_file(match):
                    files.append(match)
        else:
            problems.append(f"{item}: no such file or directory")
    return list(dict.fromkeys(files)), problems


class ImageFiles(Dataset):
    """Preprocessed images by index; an unreadable file gives its error message instead of a tensor,
    so one bad file neither kills a DataLoader worker nor the run."""

    def __init__(self, paths: Sequence[Path], config: PreprocessConfig) -> None:
        self.paths = list(paths)
        self.config = config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return index, preprocess(self.paths[index], self.config), None
        except TorchCvTError as exc:
            return index, None, str(exc)


class Batch(NamedTuple):
    indices: list[int]  # dataset indices of the images in pixels
    pixels: torch.Tensor | None  # [len(indices), 3, H, W], None when every file in the batch failed
    failures: list[tuple[int, str]]  # (dataset index, one-line reason)


def collate(items: list[tuple[int, torch.Tensor | None, str | None]]) -> Batch:
    good = [(i, x) for i, x, _ in items if x is not None]
    pixels = torch.stack([x for _, x in good]) if good else None
    return Batch([i for i, _ in good], pixels, [(i, err) for i, _, err in items if err is not None])


# --------------------------------------------------------------------------------------- output
Row = tuple[str, list[tuple[int, str, float]]]  # path, [(index, label, score)] best first


class ResultWriter:
    """Writes results as they come and flushes after each batch, so a killed run keeps what it wrote.

    ``json``: JSON Lines, one object per image and line (``{"path", "top_k": [{"label", "index",
    "score"}]}``); unlike a JSON array it stays readable line by line when the run is cut short.
    ``csv``: a header, then ``path,rank,index,label,score`` rows. ``table``: a block per image.
    """

    def __init__(self, stream: IO[str], fmt: str) -> None:
        self.stream, self.fmt = stream, fmt
        if fmt == "csv":
            self.csv = csv.writer(stream, lineterminator="\n")
            self.csv.writerow(["path", "rank", "index", "label", "score"])

    def write(self, rows: list[Row]) -> None:
        for path, top in rows:
            if self.fmt == "json":
                self.stream.write(to_json({"path": path, "top_k": json_top_k(top)}, ensure_ascii=False) + "\n")
            elif self.fmt == "csv":
                self.csv.writerows([path, rank, index, label, f"{score:.6f}"] for rank, (index, label, score) in enumerate(top, 1))
            else:
                lines = [path] + [f"  {rank:>2}  {score:6.2%}  {label} ({index})" for rank, (index, label, score) in enumerate(top, 1)]
                self.stream.write("\n".join(lines) + "\n")
        self.stream.flush()


# ------------------------------------------------------------------------------------------ CLI
def add_models_arguments(parser: argparse.ArgumentParser) -> None:
    """``cvt models`` takes no options."""


def run_models(args: argparse.Namespace) -> int:
    sys.stdout.write(format_models())
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``cvt predict``."""
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--weights", required=True, help="registry name (see `cvt models`) or hub id, checkpoint folder or file")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=list(_DTYPES), help="compute dtype (float16: CUDA only)")
    add_backend_arguments(parser)
    parser.add_argument("--format", default="table", choices=("table", "json", "csv"),
                        help="table (default), json (JSON Lines: one object per image) or csv (path,rank,index,label,score)")
    parser.add_argument("--output", default=None,
                        help="write results to this file (default: stdout; streamed as they come: a failure "
                             "or a kill leaves the results so far)")
    parser.add_argument("--on-error", default="stop", choices=("stop", "skip"),
                        help="unreadable image or path: stop with an error (default) or skip it, name it and count it")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader worker processes decoding images (default: min(4, CPUs - 1))")
    add_image_safety_arguments(parser)


def add_image_safety_arguments(parser: argparse.ArgumentParser, default_max_pixels: int | None = None) -> None:
    """``--max-pixels`` and ``--allow-nonfinite-weights``, for every command that reads images with weights.

    ``--max-pixels N``: refuse larger images before decoding them, 0 for no limit; its default is
    ``default_max_pixels`` (None: Pillow's decompression-bomb threshold, as ``PreprocessConfig`` has it).
    """
    default = (f"Pillow's decompression-bomb threshold, {Image.MAX_IMAGE_PIXELS}" if default_max_pixels is None
               else str(default_max_pixels))
    parser.add_argument("--max-pixels", type=_max_pixels, default=default_max_pixels, metavar="N",
                        help=f"refuse images of more than N pixels before decoding them (default: {default}; 0: no limit)")
    parser.add_argument("--allow-nonfinite-weights", action="store_true",
                        help="load weights holding NaN or inf (refused by default), for debugging")


def _max_pixels(text: str) -> int | None:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of pixels, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: no limit), got {value}")
    return value


def format_models() -> str:
    """The ``cvt models`` text: the registry (pretrained.py), then its layouts."""
    out = io.StringIO()
    out.write("Models (torchcvt.list_models()): create_model(name) builds the layout with random weights; names with\n"
              "public weights load them in create_model(name, pretrained=True), Classifier(name) and --weights NAME:\n")
    out.write(f"  {'name':<18}{'layout':<10}{'input':>6}{'crop':>7}{'params':>9}  {'pretrained on':<14}{'top-1':>6}{'ported':>8}  hub id\n")
    for e in REGISTRY.values():
        crop = f"{e.crop_pct:.3f}" if e.crop_pct is not None else "none"
        top1 = f"{e.top1:.1f}" if e.top1 is not None else "-"
        ported = f"{e.top1_ported:.2f}" if e.top1_ported is not None else "-"
        out.write(f"  {e.name:<18}{e.layout:<10}{e.image_size:>6}{crop:>7}{e.params / 1e6:>8.1f}M  "
                  f"{e.pretrained_on or '-':<14}{top1:>6}{ported:>8}  {e.hub_id or '-'}\n")
    out.write("  top-1: ImageNet-1k val, as reported by the authors (microsoft/CvT README); ported: the same\n"
              "  weights re-evaluated by PaddlePaddle PASSL's model zoo. crop none: resized to input x input.\n\n")
    out.write("Layouts:\n")
    out.write(f"  {'name':<10}{'embed_dim':<17}{'depth':<12}heads\n")
    for name, layout in LAYOUTS.items():
        out.write(f"  {name:<10}{_csv(layout['embed_dim']):<17}{_csv(layout['depth']):<12}{_csv(layout['num_heads'])}\n")
    return out.getvalue()


def _csv(values: Sequence[int]) -> str:
    return ",".join(map(str, values))


def run(args: argparse.Namespace) -> int:
    """``cvt predict``."""
    from tqdm import tqdm

    for name in ("top_k", "batch_size"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    skip = args.on_error == "skip"
    output = check_output(args.output, "--output", streamed=True) if args.output else None

    files, problems = collect_images(args.inputs)
    if problems and not skip:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; pass --on-error skip to go on without it")
    for message in problems:
        print(f"skipped {message}", file=sys.stderr)
    if not files:
        raise DataError(f"no image files found in {' '.join(args.inputs)}")

    log_backend_choice(args)
    classifier = Classifier(args.weights, device=args.device, dtype=args.dtype, backend=args.backend, precision=args.precision,
                            max_pixels=args.max_pixels, allow_nonfinite=args.allow_nonfinite_weights)
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    if len(files) <= args.batch_size:
        workers = 0  # one batch: worker start-up would cost more than it saves
    loader = DataLoader(
        ImageFiles(files, classifier.preprocess_config), batch_size=args.batch_size, num_workers=workers,
        collate_fn=collate, pin_memory=classifier.device.type == "cuda",
    )
    skipped = len(problems)
    done = 0
    try:
        stream = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout
    except OSError as exc:
        raise OutputError(f"--output {output}: cannot write it ({exc.strerror or exc})") from None
    try:
        writer = ResultWriter(stream, args.format)
        # tqdm hides itself when stderr is not a terminal (disable=None).
        with tqdm(total=len(files), unit="img", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            for batch in loader:
                rows: list[Row] = []
                if batch.pixels is not None:
                    ranked = classifier.ranked(classifier.predict_batch(batch.pixels, args.top_k))
                    rows += [(str(files[i]), row) for i, row in zip(batch.indices, ranked)]
                if batch.failures and not skip:
                    # Keep the output a prefix of the file list: write what precedes the bad file, then stop.
                    first, message = batch.failures[0]
                    rows = [r for r, i in zip(rows, batch.indices) if i < first]
                    with tqdm.external_write_mode(file=stream):
                        writer.write(rows)
                    raise ImageError(f"{message} (stopped after {done + len(rows)} classified image(s); "
                                     "pass --on-error skip to skip unreadable files)")
                with tqdm.external_write_mode(file=stream):
                    writer.write(rows)
                for _, message in batch.failures:
                    tqdm.write(f"skipped {message}", file=sys.stderr)
                done += len(rows)
                skipped += len(batch.failures)
                bar.update(len(batch.indices) + len(batch.failures))
    except OSError as exc:
        if isinstance(exc, TorchCvTError) or not is_disk_full(exc):
            raise
        raise DiskFullError(f"no space left on device writing {output or 'the output'}; it holds the results of "
                            f"the first {done} image(s)") from None
    finally:
        if stream is not sys.stdout:
            try:
                stream.close()
            except OSError:  # each batch was flushed: only a write that already failed can fail again here
                pass
    if skipped:
        print(f"classified {done} image(s); skipped {skipped} unreadable file(s) or path(s)", file=sys.stderr)
    if done == 0:
        raise DataError(f"none of the {len(files)} file(s) could be read as an image")
    return 0
