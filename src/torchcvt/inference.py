"""Classify images with pretrained CvT weights: ``Classifier`` in Python, ``cvt predict`` and ``cvt models``.

    from torchcvt import Classifier
    Classifier("microsoft/cvt-13")("cat.jpg")  # -> [(label, probability), ...] best first, 5 of them

Preprocessing is the evaluation transform that belongs to the weights, chosen in this order: an
explicit ``preprocess=``; the ``WEIGHTS`` registry entry for a public hub id; the checkpoint
folder's ``preprocessor_config.json``; else the official recipe for the model's resolution
(shorter side to 256 and a 224 centre crop below 384 pixels, a plain 384x384 resize from 384 up).
The registry comes before the folder's file because transformers' ``config.json`` has no image
size: without the registry a 384 checkpoint would look like a 224 one.

Labels: the checkpoint's ``id2label``; else the ImageNet-1k names for a 1000-class head (official
``.pth`` files carry no names); else ``class_0``, ``class_1``, ...
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from .checkpoint import WEIGHT_FILES, load_model, resolve_source
from .config import PRESETS, preset_config
from .errors import CheckpointError, ConfigError, DataError, ImageError, TorchCvTError
from .model import CvT
from .transforms import ImageSource, PreprocessConfig, is_image_file, preprocess, read_preprocessor_config

# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class WeightInfo:
    """One public checkpoint: its layout, the evaluation transform it was measured with, its accuracy.

    ``params``: trainable parameters of the layout (the model zoos round them to 20M, 32M, 277M).
    ``top1``: ImageNet-1k val top-1 reported by the authors (microsoft/CvT README, Tables 2/3 of the
    paper). ``top1_ported``: top-1 of the same released weights re-evaluated by PaddlePaddle's PASSL
    model zoo with the crop of this entry (None where PASSL has no number).
    """

    hub_id: str
    preset: str
    image_size: int
    crop_pct: float | None  # None: resize to image_size x image_size, no crop
    pretrained_on: str
    params: int
    top1: float
    top1_ported: float | None

    @property
    def name(self) -> str:
        return self.hub_id.split("/", 1)[1]

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(image_size=self.image_size, crop_pct=self.crop_pct)


_CVT13_PARAMS, _CVT21_PARAMS, _CVTW24_PARAMS = 19_997_480, 31_622_696, 277_196_392

WEIGHTS: dict[str, WeightInfo] = {
    w.hub_id: w
    for w in (
        WeightInfo("microsoft/cvt-13", "cvt-13", 224, 0.875, "ImageNet-1k", _CVT13_PARAMS, 81.6, 81.59),
        WeightInfo("microsoft/cvt-13-384", "cvt-13-384", 384, None, "ImageNet-1k", _CVT13_PARAMS, 83.0, None),
        WeightInfo("microsoft/cvt-13-384-22k", "cvt-13-384", 384, None, "ImageNet-22k", _CVT13_PARAMS, 83.3, 82.90),
        WeightInfo("microsoft/cvt-21", "cvt-21", 224, 0.875, "ImageNet-1k", _CVT21_PARAMS, 82.5, 82.46),
        WeightInfo("microsoft/cvt-21-384", "cvt-21-384", 384, None, "ImageNet-1k", _CVT21_PARAMS, 83.3, None),
        WeightInfo("microsoft/cvt-21-384-22k", "cvt-21-384", 384, None, "ImageNet-22k", _CVT21_PARAMS, 84.9, 84.63),
        WeightInfo("microsoft/cvt-w24-384-22k", "cvt-w24-384", 384, None, "ImageNet-22k", _CVTW24_PARAMS, 87.6, 87.39),
    )
}


def weight_info(name: str) -> WeightInfo | None:
    """The registry entry for a hub id (``microsoft/cvt-13``) or its short name (``cvt-13-384-22k``).

    Short names that are also presets (``cvt-13``) resolve to the public weights here: inference
    with random weights is never what is meant.
    """
    key = name if "/" in name else f"microsoft/{name}"
    return WEIGHTS.get(key) or WEIGHTS.get(key.lower())


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


def _parse_device(device: str | torch.device | None, default: torch.device) -> torch.device:
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


def _load(weights: str | os.PathLike) -> tuple[CvT, PreprocessConfig, str]:
    """Model, preprocessing and a display name for a hub id, short name, folder or file."""
    source = os.fspath(weights)
    info = None if Path(source).expanduser().exists() else weight_info(source)
    if info is not None:
        path = resolve_source(info.hub_id)  # downloads (or reads the cache)
        # transformers' config.json has no image_size; the registry knows the resolution.
        return load_model(path, image_size=info.image_size), info.preprocess_config(), info.hub_id
    if not Path(source).expanduser().exists() and "/" not in source:
        known = ", ".join(w.name for w in WEIGHTS.values())
        raise CheckpointError(f"unknown weights {source!r}: not a file or folder, nor one of {known} (or a hub id owner/name)")
    path = resolve_source(source)
    model = load_model(path)
    # A preprocessor_config.json belongs to a checkpoint folder, also when its weights file is named
    # directly; beside a lone .pth it could describe anything.
    folder = path if path.is_dir() else path.parent if path.name in WEIGHT_FILES else None
    pre = (read_preprocessor_config(folder) if folder else None) or PreprocessConfig.for_resolution(model.config.image_size)
    return model, pre, source


class Classifier:
    """Pretrained CvT + its evaluation transform + class names; load once, call many times.

    ``weights``: a ``microsoft/cvt-*`` hub id or short name (``"cvt-21-384-22k"``), a checkpoint
    folder or file (any format ``load_model`` reads), or a ``CvT`` (put in eval mode and used as is).
    ``device``: default CUDA when available (a given model: where it is). ``dtype``: float32
    (default), bfloat16 or float16 (CUDA only). ``preprocess``: overrides the transform of the weights.
    ``batch_size``: images per forward pass in ``__call__``.
    """

    def __init__(
        self,
        weights: str | os.PathLike | CvT,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        preprocess: PreprocessConfig | None = None,
        batch_size: int = 32,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
        if isinstance(weights, CvT):
            model, pre, self.source = weights, PreprocessConfig.for_resolution(weights.config.image_size), "<model>"
            first = next(model.parameters())
            default_device, default_dtype = first.device, first.dtype
        else:
            default_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            default_dtype = torch.float32
            # Check the arguments before the (slow) load.
            _parse_device(device, default_device)
            _parse_dtype(dtype, default_dtype)
            model, pre, self.source = _load(weights)
        self.device = _parse_device(device, default_device)
        self.dtype = _parse_dtype(dtype, default_dtype)
        if self.dtype == torch.float16 and self.device.type != "cuda":
            raise ConfigError(f"dtype float16 needs a CUDA device, got {self.device}; use bfloat16 or float32")
        if model.config.num_classes == 0:
            raise ConfigError(f"{self.source} has no classification head (num_classes=0): nothing to classify")
        self.model = model.to(device=self.device, dtype=self.dtype).eval()
        self.preprocess_config = preprocess or pre
        self.labels = class_labels(model)
        self.batch_size = batch_size

    def __repr__(self) -> str:
        p = self.preprocess_config
        crop = f"crop_pct={p.crop_pct}" if p.crop_pct is not None else "no crop"
        return (f"Classifier({self.source!r}, {self.model.config.num_classes} classes, {p.image_size}px {p.resample} "
                f"{crop}, device={self.device}, dtype={str(self.dtype).removeprefix('torch.')})")

    def preprocess(self, image: ImageSource) -> torch.Tensor:
        """The normalised float32 ``[3, H, W]`` tensor the model sees for ``image`` (path, PIL, array, tensor)."""
        return preprocess(image, self.preprocess_config)

    @torch.inference_mode()
    def predict_batch(self, pixels: torch.Tensor, top_k: int = 5) -> TopK:
        """Top-k softmax probabilities of a preprocessed ``[B, 3, H, W]`` batch (float32, on the CPU)."""
        x = pixels.to(self.device, self.dtype, non_blocking=True)
        probs = self.model(x).float().softmax(dim=-1)  # [B, num_classes]
        scores, indices = probs.topk(min(top_k, probs.shape[-1]), dim=-1)  # [B, k] each
        return TopK(scores.cpu(), indices.cpu())

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
            top = self.predict_batch(pixels, top_k)
            results += [
                [(self.labels[i], s) for i, s in zip(idx, sc)]
                for idx, sc in zip(top.indices.tolist(), top.scores.tolist())
            ]
        return results[0] if single else results


# ------------------------------------------------------------------------------- finding images
def collect_images(inputs: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Expand INPUT arguments into image files, and say what could not be read.

    A file named explicitly is always taken (if it is no image, reading it fails and says so).
    Folders are walked recursively in sorted order, and glob patterns (``**`` allowed) expanded;
    from those, only ``transforms.is_image_file`` names are taken (a suffix Pillow reads, not hidden:
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
                entries = [{"label": label, "index": index, "score": round(score, 6)} for index, label, score in top]
                self.stream.write(json.dumps({"path": path, "top_k": entries}, ensure_ascii=False) + "\n")
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
    parser.add_argument("--weights", required=True, help="hub id or short name (see `cvt models`), checkpoint folder or file")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image (default: 5)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=list(_DTYPES), help="compute dtype (float16: CUDA only)")
    parser.add_argument("--format", default="table", choices=("table", "json", "csv"),
                        help="table (default), json (JSON Lines: one object per image) or csv (path,rank,index,label,score)")
    parser.add_argument("--output", default=None, help="write results to this file instead of stdout (streamed, not atomic)")
    parser.add_argument("--on-error", default="stop", choices=("stop", "skip"),
                        help="unreadable image or path: stop with an error (default) or skip it, name it and count it")
    parser.add_argument("--workers", type=int, default=None,
                        help="DataLoader worker processes decoding images (default: min(4, CPUs - 1))")


def format_models() -> str:
    """The ``cvt models`` text: public weights, then the presets."""
    out = io.StringIO()
    out.write("Pretrained weights (ImageNet-1k heads; use the name or the hub id with --weights):\n")
    header = f"  {'name':<20}{'preset':<13}{'input':>7}{'crop':>7}{'params':>9}  {'pretrained on':<14}{'top-1':>6}{'ported':>8}\n"
    out.write(header)
    for w in WEIGHTS.values():
        crop = f"{w.crop_pct:.3f}" if w.crop_pct is not None else "none"
        ported = f"{w.top1_ported:.2f}" if w.top1_ported is not None else "-"
        out.write(f"  {w.name:<20}{w.preset:<13}{w.image_size:>7}{crop:>7}{w.params / 1e6:>8.1f}M  "
                  f"{w.pretrained_on:<14}{w.top1:>6.1f}{ported:>8}\n")
    out.write("  top-1: ImageNet-1k val, as reported by the authors (microsoft/CvT README); ported: the same\n"
              "  weights re-evaluated by PaddlePaddle PASSL's model zoo. crop none: resized to input x input.\n\n")
    out.write("Presets (architectures; create_model(name) gives random weights):\n")
    out.write(f"  {'name':<14}{'input':>6}  {'embed_dim':<17}{'depth':<12}{'heads':<12}weights\n")
    for name in PRESETS:
        c = preset_config(name)
        weights = ", ".join(w.name for w in WEIGHTS.values() if w.preset == name) or "-"
        out.write(f"  {name:<14}{c.image_size:>6}  {_csv(c.embed_dim):<17}{_csv(c.depth):<12}{_csv(c.num_heads):<12}{weights}\n")
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

    files, problems = collect_images(args.inputs)
    if problems and not skip:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise DataError(f"{problems[0]}{more}; pass --on-error skip to go on without it")
    for message in problems:
        print(f"skipped {message}", file=sys.stderr)
    if not files:
        raise DataError(f"no image files found in {' '.join(args.inputs)}")

    classifier = Classifier(args.weights, device=args.device, dtype=args.dtype)
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    if len(files) <= args.batch_size:
        workers = 0  # one batch: worker start-up would cost more than it saves
    loader = DataLoader(
        ImageFiles(files, classifier.preprocess_config), batch_size=args.batch_size, num_workers=workers,
        collate_fn=collate, pin_memory=classifier.device.type == "cuda",
    )
    skipped = len(problems)
    done = 0
    stream = open(args.output, "w", encoding="utf-8", newline="") if args.output else sys.stdout
    try:
        writer = ResultWriter(stream, args.format)
        # tqdm hides itself when stderr is not a terminal (disable=None).
        with tqdm(total=len(files), unit="img", file=sys.stderr, disable=None, dynamic_ncols=True) as bar:
            for batch in loader:
                rows: list[Row] = []
                if batch.pixels is not None:
                    top = classifier.predict_batch(batch.pixels, args.top_k)
                    for i, idx, sc in zip(batch.indices, top.indices.tolist(), top.scores.tolist()):
                        rows.append((str(files[i]), [(k, classifier.labels[k], s) for k, s in zip(idx, sc)]))
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
    finally:
        if stream is not sys.stdout:
            stream.close()
    if skipped:
        print(f"classified {done} image(s); skipped {skipped} unreadable file(s) or path(s)", file=sys.stderr)
    if done == 0:
        raise DataError(f"none of the {len(files)} file(s) could be read as an image")
    return 0
