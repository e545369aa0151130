"""Embeddings: the pre-logit features of images, in Python (``embed_images``) and as ``cvt embed``.

A feature vector is what the head reads, ``model.forward_head(model.forward_features(x),
pre_logits=True)``: ``[C]`` per image (384 for CvT-13), the final-norm cls token (or the mean of the
last stage's tokens, per ``global_pool``) of the image preprocessed as its weights' evaluation
transform says. Images are decoded in DataLoader workers batch by batch and only the features are
kept, so a folder of any size needs memory for ``N x C`` floats, not for its images.

Files: ``.npz`` (NumPy: ``features`` float32 ``[N, C]``, ``paths`` ``[N]`` strings; ``np.load``
reads it without pickles) or ``.safetensors`` (tensor ``features``; the paths as a JSON list in the
header's ``paths`` metadata). Row i is ``paths[i]``, in the order ``cvt predict`` lists the files.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from .errors import ConfigError, DataError, ImageError
from .fileio import atomic_save
from .inference import ImageFiles, collate, collect_images, parse_device
from .model import CvT
from .pretrained import load_pretrained, preprocess_config_of
from .transforms import PreprocessConfig

SUFFIXES = (".npz", ".safetensors")


@dataclass
class Embeddings:
    features: np.ndarray  # float32 [N, C], row i for paths[i]
    paths: list[str]
    skipped: list[str] = field(default_factory=list)  # one message per unreadable file or missing path


@torch.inference_mode()
def embed_images(
    model: CvT,
    inputs: Sequence[str | os.PathLike],
    *,
    preprocess: PreprocessConfig | None = None,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    workers: int = 0,
    on_error: str = "stop",
    progress: bool = False,
) -> Embeddings:
    """Pre-logit features of the images in ``inputs`` (files, folders searched recursively, globs).

    ``preprocess``: default the model's own (its ``pretrained_cfg``). ``device``: default where the
    model is. ``on_error``: "stop" raises at the first unreadable file or missing path, "skip" skips
    and lists them in ``skipped``. ``progress``: a tqdm bar on stderr (hidden when it is no terminal).
    """
    if on_error not in ("stop", "skip"):
        raise ConfigError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    if model.config.pool == "":
        raise ConfigError("embeddings need pooled features; this model has global_pool='' (per-token features)")
    files, skipped = collect_images([os.fspath(p) for p in inputs])
    if skipped and on_error == "stop":
        raise DataError(f"{skipped[0]}; pass --on-error skip to go on without it")
    if not files:
        raise DataError(f"no image files found in {' '.join(map(os.fspath, inputs))}")
    device = parse_device(device, next(model.parameters()).device)
    model = model.to(device).eval()
    loader = DataLoader(ImageFiles(files, preprocess or preprocess_config_of(model)), batch_size=batch_size,
                        num_workers=workers if len(files) > batch_size else 0, collate_fn=collate)
    chunks: list[np.ndarray] = []
    paths: list[str] = []
    with tqdm(total=len(files), unit="img", file=sys.stderr, disable=None if progress else True) as bar:
        for batch in loader:
            if batch.failures and on_error == "stop":
                raise ImageError(f"{batch.failures[0][1]}; pass --on-error skip to skip unreadable files")
            skipped += [message for _, message in batch.failures]
            if batch.pixels is not None:
                x = batch.pixels.to(device, next(model.parameters()).dtype)
                chunks.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu().numpy())
                paths += [str(files[i]) for i in batch.indices]
            bar.update(len(batch.indices) + len(batch.failures))
    if not chunks:
        raise DataError(f"none of the {len(files)} file(s) could be read as an image")
    return Embeddings(np.concatenate(chunks), paths, skipped)


def save_embeddings(embeddings: Embeddings, path: str | os.PathLike) -> Path:
    """Write ``.npz`` or ``.safetensors`` (see the module docstring), atomically."""
    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise ConfigError(f"{path}: the output must end in .npz or .safetensors")
    features = np.ascontiguousarray(embeddings.features, dtype=np.float32)
    if path.suffix == ".npz":
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:  # a file object: np.savez would append .npz to a name
                np.savez(f, features=features, paths=np.array(embeddings.paths, dtype=str))
    else:
        from safetensors.numpy import save_file

        def write(tmp: str) -> None:
            save_file({"features": features}, tmp, metadata={"paths": json.dumps(embeddings.paths, ensure_ascii=False)})
    atomic_save(write, path)
    return path


def load_embeddings(path: str | os.PathLike) -> Embeddings:
    """Read a file ``save_embeddings`` wrote."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path) as f:
            return Embeddings(f["features"], f["paths"].tolist())
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        return Embeddings(f.get_tensor("features"), json.loads(f.metadata()["paths"]))


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--weights", required=True, help="registry name (see `cvt models`) or hub id, checkpoint folder or file")
    parser.add_argument("--output", default="embeddings.npz", metavar="FILE",
                        help="where to write the features: FILE.npz or FILE.safetensors (default: embeddings.npz)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default: 32)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes decoding images (default: min(4, CPUs - 1))")
    parser.add_argument("--on-error", default="stop", choices=("stop", "skip"),
                        help="unreadable image or missing path: stop with an error (default) or skip it and count it")


def run(args: argparse.Namespace) -> int:
    if Path(args.output).suffix not in SUFFIXES:  # before the (slow) model load
        raise ConfigError(f"--output {args.output}: must end in .npz or .safetensors")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    device = parse_device(args.device, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    model, pre, _ = load_pretrained(args.weights)
    workers = args.workers if args.workers is not None else min(4, max(0, (os.cpu_count() or 1) - 1))
    result = embed_images(model, args.inputs, preprocess=pre, batch_size=args.batch_size, device=device,
                          workers=workers, on_error=args.on_error, progress=True)
    for message in result.skipped:
        print(f"skipped {message}", file=sys.stderr)
    path = save_embeddings(result, args.output)
    n, c = result.features.shape
    print(f"wrote {path}: {n} x {c} float32 features of {n} image(s)"
          + (f"; skipped {len(result.skipped)} unreadable file(s) or path(s)" if result.skipped else ""))
    return 0
