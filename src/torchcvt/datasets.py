"""Training data: the built-in digits set, image folders, the Oxford-IIIT Pet layout and CSV lists.

``build_datasets(data, image_size=...)`` turns a ``data`` string into train and validation datasets
whose items are ``(normalised float32 [3, S, S] tensor, int label)``:

* ``"digits"``: scikit-learn's 1,797 real 8x8 handwritten digits (shipped inside scikit-learn, no
  download), upsampled to ``image_size`` (default 32) and kept in memory as one tensor. A fixed
  stratified 20 % validation split (seed 0) that ignores ``seed`` and ``val_fraction``, so digit
  accuracies are comparable across runs and training seeds. Stored grey, 4 * S * S bytes an image
  (7 MB for the set at 32, 360 MB at 224).
* a folder with one sub-folder of images per class (torchvision's ImageFolder layout). With
  ``train/`` and ``val/`` (or ``validation/``) sub-folders those are the splits; otherwise a
  stratified ``val_fraction`` is held out with ``seed``. Sub-folders of a class folder are searched
  too; a file is taken when ``images.is_image_file`` says so (a visible name with a suffix
  Pillow reads), the same rule as ``cvt predict``.
* an Oxford-IIIT Pet folder (``images/`` + ``annotations/trainval.txt`` and ``test.txt``):
  trainval trains, test validates; labels are the official class ids minus 1.
* a ``.csv`` file with a ``path,label`` header (paths relative to the CSV's folder or absolute),
  split like a single image folder.

Class indices follow sorted class names (Pet: the official ids), so the mapping is the same on
every machine. Image files are checked up front with a cheap header check (``verify_images``);
by default an unreadable file stops ``build_datasets`` with an ``ImageError`` naming it, and with
``skip_bad_images=True`` it is dropped and listed in ``DataSplits.skipped``. A file that passes
the header check but fails to decode later raises ``ImageError`` naming it from ``__getitem__``.

Normalisation is ImageNet's mean/std for every source, digits included: one convention for the
whole library, the one the pre-trained CvT weights and ``PreprocessConfig`` use, so a digits model
saved with its mean/std is evaluated exactly like any other model.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import random
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

from . import augment
from .errors import DataError, ImageError
from .images import is_image_file, load_image
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig, normalize

VAL_DIR_NAMES = ("val", "validation")

DIGITS_IMAGE_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DEFAULT_IMAGE_SIZE = 224

Sample = tuple[str, int]  # (image path, class index)


@dataclass
class DataSplits:
    """Train and validation datasets plus what a trained model must remember about them."""

    train: Dataset  # items: (float32 [3, H, W] normalised, int label)
    val: Dataset
    id2label: dict[int, str]
    mean: tuple[float, float, float]  # the normalisation the items carry, saved with the model
    std: tuple[float, float, float]
    name: str = ""  # the source, for messages: "digits" or the path
    skipped: list[str] = field(default_factory=list)  # unreadable files dropped (skip_bad_images=True)

    @property
    def num_classes(self) -> int:
        return len(self.id2label)


# -------------------------------------------------------------------------------------- datasets
class TensorImageDataset(Dataset):
    """Images held in memory as one 0..1 tensor ``[N, C, H, W]`` (C = 1 or 3).

    Items are normalised to 3 channels on access, so a grey dataset costs a third of the memory.
    ``transform`` then gets and returns a normalised ``[3, H, W]`` tensor (e.g.
    ``augment.RandomAffineTensor``), never a PIL image: no decode, no round trip through uint8.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        if images.dim() != 4 or images.shape[1] not in (1, 3) or len(images) != len(labels):
            raise DataError(
                f"expected images [N, 1 or 3, H, W] and N labels, got {tuple(images.shape)} and {len(labels)} labels"
            )
        self.images = images
        self.labels = labels.long()
        self.mean = torch.tensor(mean, dtype=torch.float32)
        self.std = torch.tensor(std, dtype=torch.float32)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = normalize(self.images[index].expand(3, -1, -1), self.mean, self.std)
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[index])

    @property
    def targets(self) -> list[int]:
        return self.labels.tolist()


class ImageFileDataset(Dataset):
    """Image files decoded on access with ``images.load_image`` (RGB, EXIF-upright).

    ``transform`` maps the PIL image to the model input (e.g. ``augment.train_transform(224)`` or
    ``PreprocessConfig.for_resolution(224)``); None returns the PIL image. A file that cannot be
    decoded raises ``ImageError`` naming it, so a DataLoader worker's failure says which file; so does
    one over the image-size limit (a PreprocessConfig transform's ``max_pixels``, else the default).
    """

    def __init__(
        self, samples: Sequence[Sample], transform: Callable[[Image.Image], torch.Tensor] | None = None
    ) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        image = load_image(path, max_pixels=getattr(self.transform, "max_pixels", None))
        return (self.transform(image) if self.transform is not None else image), label

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]


# ---------------------------------------------------------------------------------------- checks
def _image_problem(path: str | os.PathLike) -> str | None:
    """Why Pillow cannot read ``path``'s header, or None. ``verify()`` parses the header and chunk
    structure without decoding pixels: milliseconds per file, so every file can be checked."""
    try:
        with Image.open(path) as img:
            img.verify()
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, ... for bad files
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def verify_images(paths: Iterable[str | os.PathLike]) -> list[str]:
    """The paths among ``paths`` that Pillow cannot open (cheap header check, not a full decode).

    Threads overlap the file reads, which dominate on network disks.
    """
    paths = [str(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        problems = list(pool.map(_image_problem, paths))
    return [p for p, problem in zip(paths, problems) if problem is not None]


def stratified_split(labels: Sequence[int], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices ``(train, val)``: ``ceil(val_fraction * N)`` held out, spread over classes in
    proportion to their size (largest remainder), chosen by a private ``random.Random(seed)``.

    Every class keeps at least one training image, and a class with two or more images gives at
    least one to validation, so small classes are still measured. The global RNGs are not touched.
    """
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    # round(..., 6): 0.1 * 30 is 3.0000000000000004 in floating point and must not become 4.
    n_val = math.ceil(round(val_fraction * len(labels), 6))
    shares = {c: round(len(idx) * val_fraction, 6) for c, idx in by_class.items()}
    quota = {c: int(share) for c, share in shares.items()}
    by_remainder = sorted(by_class, key=lambda c: (quota[c] - shares[c], c))
    for c in by_remainder[: max(0, n_val - sum(quota.values()))]:
        quota[c] += 1

    rng = random.Random(seed)
    train, val = [], []
    for c in sorted(by_class):
        indices = by_class[c][:]
        rng.shuffle(indices)
        k = min(max(quota[c], 1 if len(indices) > 1 else 0), len(indices) - 1)
        val += indices[:k]
        train += indices[k:]
    return sorted(train), sorted(val)


# --------------------------------------------------------------------------------------- sources
@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    # Imported here: scikit-learn takes about a second to import and only digits needs it.
    from sklearn.datasets import load_digits

    digits = load_digits()
    return digits.images.astype(np.float32), digits.target.astype(np.int64)


def _digits_splits(image_size: int, train_transform, eval_transform) -> DataSplits:
    images, targets = _digits_arrays()
    # 0..16 ink levels -> 0..1, upsampled once for the whole set; bicubic overshoots, hence clamp.
    x = torch.from_numpy(images / 16.0).float().unsqueeze(1)
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False).clamp_(0, 1)
    y = torch.from_numpy(targets)
    train_idx, val_idx = stratified_split(targets.tolist(), DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED)
    if train_transform is None:
        # Light and batched: small shifts, turns and zooms; the background (ink 0) fills the border.
        background = normalize(torch.zeros(3, 1, 1, dtype=torch.float64), IMAGENET_MEAN, IMAGENET_STD).flatten().tolist()
        train_transform = augment.RandomAffineTensor(degrees=10, translate=0.1, scale=(0.9, 1.1), fill=background)
    train_idx_t, val_idx_t = torch.tensor(train_idx), torch.tensor(val_idx)
    return DataSplits(
        train=TensorImageDataset(x[train_idx_t], y[train_idx_t], transform=train_transform),
        val=TensorImageDataset(x[val_idx_t], y[val_idx_t], transform=eval_transform),
        id2label={i: str(i) for i in range(10)},
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        name="digits",
    )


def _list_class_folders(root: Path) -> dict[str, list[str]]:
    """``{class name: sorted image paths}`` of an ImageFolder root, searching sub-folders too."""
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_dirs:
        raise DataError(f"{root}: no class sub-folders; expected one sub-folder of images per class")
    classes = {}
    for class_dir in class_dirs:
        files = sorted(str(p) for p in class_dir.rglob("*") if is_image_file(p) and p.is_file())
        if not files:
            raise DataError(f"{class_dir}: class folder has no images (files with a suffix Pillow reads: .jpg, .png, .webp, ...)")
        classes[class_dir.name] = files
    return classes


def _scan_image_folder(root: Path) -> tuple[list[str], list[Sample], list[Sample] | None]:
    """``(class names, train samples, val samples or None to hold out)``."""
    train_dir = root / "train"
    val_dir = next((root / n for n in VAL_DIR_NAMES if (root / n).is_dir()), None)
    train_classes = _list_class_folders(train_dir if train_dir.is_dir() else root)
    names = list(train_classes)
    index = {name: i for i, name in enumerate(names)}
    train = [(path, index[name]) for name, paths in train_classes.items() for path in paths]
    if not train_dir.is_dir() or val_dir is None:
        return names, train, None
    val = []
    for name, paths in _list_class_folders(val_dir).items():
        if name not in index:
            raise DataError(f"{val_dir / name}: validation class {name!r} has no folder in {train_dir}")
        val += [(path, index[name]) for path in paths]
    return names, train, val


def _read_pet_list(path: Path, images: Path, names: dict[int, str]) -> list[Sample]:
    """One Oxford-IIIT Pet list (``Abyssinian_100 1 1 1``: image, class id, species, breed id)."""
    if not path.is_file():
        raise DataError(f"{path}: not found; the Oxford-IIIT Pet layout needs annotations/trainval.txt and test.txt")
    samples = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fields = line.split()
        if not fields or fields[0].startswith("#"):
            continue
        if len(fields) < 2 or not fields[1].isdigit() or int(fields[1]) < 1:
            raise DataError(f"{path} line {lineno}: expected 'IMAGE CLASS_ID SPECIES BREED_ID', got {line.strip()!r}")
        image, class_id = fields[0], int(fields[1])
        breed = image.rsplit("_", 1)[0]  # "american_bulldog_12" -> "american_bulldog"
        if names.setdefault(class_id, breed) != breed:
            raise DataError(
                f"{path} line {lineno}: class id {class_id} is {names[class_id]!r} elsewhere, {breed!r} here"
            )
        file = images / f"{image}.jpg"
        if not file.is_file():
            raise DataError(f"{path} line {lineno}: image not found: {file}")
        samples.append((str(file), class_id - 1))
    return samples


def _scan_pets(root: Path) -> tuple[list[str], list[Sample], list[Sample]]:
    names: dict[int, str] = {}
    annotations = root / "annotations"
    train = _read_pet_list(annotations / "trainval.txt", root / "images", names)
    val = _read_pet_list(annotations / "test.txt", root / "images", names)
    missing = sorted(set(range(1, max(names, default=0) + 1)) - set(names))
    if missing:
        raise DataError(f"{annotations}: class ids must run 1..{max(names)}, ids {missing} never appear")
    return [names[i] for i in sorted(names)], train, val


def _scan_csv(path: Path) -> tuple[list[str], list[Sample], None]:
    """A ``path,label`` CSV; class index = position of the label in sorted label order."""
    rows: list[tuple[str, str]] = []
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a byte-order mark
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        if "path" not in header or "label" not in header:
            raise DataError(f"{path} line 1: header must have columns 'path' and 'label', got {header}")
        for row in reader:
            image, label = (row.get("path") or "").strip(), (row.get("label") or "").strip()
            if not image or not label:
                raise DataError(f"{path} line {reader.line_num}: empty path or label")
            file = Path(image) if Path(image).is_absolute() else path.parent / image
            if not file.is_file():
                raise DataError(f"{path} line {reader.line_num}: image not found: {file}")
            rows.append((str(file), label))
    names = sorted({label for _, label in rows})
    index = {name: i for i, name in enumerate(names)}
    return names, [(file, index[label]) for file, label in rows], None


def _scan(source: Path) -> tuple[list[str], list[Sample], list[Sample] | None]:
    if not source.exists():
        raise DataError(f"data not found: {source} (expected 'digits', an image folder or a .csv file)")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: expected 'digits', an image folder or a .csv file")
        return _scan_csv(source)
    if (source / "images").is_dir() and (source / "annotations").is_dir():
        return _scan_pets(source)
    return _scan_image_folder(source)


def _drop_bad_images(samples: list[Sample], skip: bool) -> tuple[list[Sample], list[str]]:
    bad = verify_images(path for path, _ in samples)
    if bad and not skip:
        raise ImageError(
            f"{bad[0]}: unreadable image ({_image_problem(bad[0])}); {len(bad)} unreadable file(s) in "
            "total: fix or remove them, or skip them (`cvt train --skip-bad-images`, or skip_bad_images=True)"
        )
    bad_set = set(bad)
    return [s for s in samples if s[0] not in bad_set], bad


def build_datasets(
    data: str,
    *,
    image_size: int | None = None,
    train_transform: Callable | None = None,
    eval_transform: Callable | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    skip_bad_images: bool = False,
) -> DataSplits:
    """Train and validation datasets for ``data`` (``"digits"``, a folder or a ``.csv`` file).

    ``image_size``: side of the model input (None: 32 for digits, 224 otherwise).
    ``train_transform`` / ``eval_transform``: PIL image -> normalised tensor for file sources
    (defaults: ``augment.train_transform(image_size)``, the paper recipe, and
    ``PreprocessConfig.for_resolution(image_size)``, the evaluation recipe); for digits they map a
    normalised tensor to a tensor (defaults: ``augment.RandomAffineTensor``, and nothing).
    ``val_fraction`` / ``seed``: the stratified hold-out of sources without a validation split.
    ``seed`` is a *split* seed: keep it fixed (do not pass the training seed) so runs with
    different training seeds are measured on the same images. Digits ignores both.
    ``skip_bad_images``: drop files that fail the header check instead of raising ``ImageError``.

    Raises ``DataError`` for a missing, empty or malformed source, before any image is decoded.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must lie strictly between 0 and 1, got {val_fraction}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1):
        raise DataError(f"image_size must be a positive integer, got {image_size!r}")
    if data == "digits":
        return _digits_splits(image_size or DIGITS_IMAGE_SIZE, train_transform, eval_transform)

    image_size = image_size or DEFAULT_IMAGE_SIZE
    source = Path(data).expanduser()
    names, train, val = _scan(source)
    if not train:
        raise DataError(f"{source}: no images")
    if len(names) < 2:
        raise DataError(f"{source}: found 1 class ({names[0]}); classification needs at least 2 classes")

    train, skipped = _drop_bad_images(train, skip_bad_images)
    if val is None:
        train_idx, val_idx = stratified_split([label for _, label in train], val_fraction, seed)
        train, val = [train[i] for i in train_idx], [train[i] for i in val_idx]
    else:
        val, skipped_val = _drop_bad_images(val, skip_bad_images)
        skipped += skipped_val
    empty = sorted(set(range(len(names))) - {label for _, label in train})
    if empty:
        raise DataError(f"{source}: no readable training images for class(es) {[names[i] for i in empty]}")
    if not val:
        raise DataError(f"{source}: the validation split is empty; add images or raise val_fraction ({val_fraction})")

    if train_transform is None:
        train_transform = augment.train_transform(image_size)
    if eval_transform is None:
        eval_transform = PreprocessConfig.for_resolution(image_size)
    # Record the normalisation the evaluation pipeline really applies; custom callables are
    # expected to use ImageNet's, like every default here.
    mean, std = (
        (eval_transform.mean, eval_transform.std) if isinstance(eval_transform, PreprocessConfig)
        else (IMAGENET_MEAN, IMAGENET_STD)
    )
    return DataSplits(
        train=ImageFileDataset(train, train_transform),
        val=ImageFileDataset(val, eval_transform),
        id2label=dict(enumerate(names)),
        mean=mean,
        std=std,
        name=str(source),
        skipped=skipped,
    )


def describe(splits: DataSplits) -> str:
    """One line for logs: ``digits: 1437 train / 360 val images, 10 classes``."""
    line = f"{splits.name}: {len(splits.train)} train / {len(splits.val)} val images, {splits.num_classes} classes"
    if splits.skipped:
        line += f", {len(splits.skipped)} unreadable image(s) skipped"
    return line
