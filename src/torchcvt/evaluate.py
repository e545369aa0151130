"""Evaluation: top-1, top-5, loss, per-class precision, recall and F1, and a confusion matrix (``cvt eval``).

``evaluate(model, loader)`` is what training calls after every epoch and what ``cvt eval`` prints.
It only accumulates integer counts and a loss sum, so that under ``torch.distributed`` (each rank
evaluating its own shard) one all-reduce gives every rank the metrics of the whole set, exactly;
precision, recall and F1 follow from the confusion matrix. ``keep_topk=k`` also keeps each image's
k best classes (this process's images, in loader order), for ``cvt eval --errors``.

    cvt eval --weights runs/digits --data digits            # the held-out digits
    cvt eval --weights ./my-run --data ./photos --format json --errors wrong.csv
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .backends import add_backend_arguments, inference_runner, log_backend_choice
from .errors import ConfigError, DataError
from .fileio import atomic_save, check_output, to_json
from .inference import add_image_safety_arguments
from .images import load_image
from .transforms import denormalize

TOP_K = 5


class Predictions(NamedTuple):
    """Each image's best classes, in loader order: ``indices``/``scores`` ``[N, k]`` (softmax, best
    first), ``targets`` ``[N]`` and ``target_scores`` ``[N]`` (the probability of the true class)."""

    indices: torch.Tensor
    scores: torch.Tensor
    targets: torch.Tensor
    target_scores: torch.Tensor


@dataclass
class EvalResult:
    """Metrics over ``count`` images. ``confusion[i, j]``: images of class i predicted as class j."""

    count: int
    loss: float  # mean cross-entropy (no label smoothing)
    top1: float  # fraction of images whose highest logit is the true class
    top5: float  # fraction whose true class is among the ``k`` highest logits
    k: int  # 5, or the number of classes when there are fewer
    confusion: torch.Tensor  # [num_classes, num_classes] int64, rows true, columns predicted
    predictions: Predictions | None = None  # with evaluate(keep_topk=k)

    @property
    def num_classes(self) -> int:
        return self.confusion.shape[0]

    @property
    def reports_top5(self) -> bool:
        """Top-5 means something only with more than 5 classes (otherwise it is always 100 %)."""
        return self.num_classes > TOP_K

    @property
    def per_class_accuracy(self) -> list[float | None]:
        """Recall of each class (None for a class without images)."""
        return self.per_class_recall

    @property
    def per_class_recall(self) -> list[float | None]:
        """Of the images of each class, the fraction predicted as it (None: a class without images)."""
        return _ratios(self.confusion.diag(), self.confusion.sum(dim=1))

    @property
    def per_class_precision(self) -> list[float | None]:
        """Of the images predicted as each class, the fraction that are (None: never predicted)."""
        return _ratios(self.confusion.diag(), self.confusion.sum(dim=0))

    @property
    def per_class_f1(self) -> list[float | None]:
        """2 TP / (2 TP + FP + FN) per class: the harmonic mean of precision and recall, 0 when either
        is 0 (None: a class neither present nor predicted)."""
        tp = self.confusion.diag()
        return _ratios(2 * tp, self.confusion.sum(dim=0) + self.confusion.sum(dim=1))

    def to_dict(self, labels: list[str] | None = None) -> dict[str, Any]:
        """The JSON of ``cvt eval``: fractions; top5 only with more than 5 classes."""
        names = labels or [str(i) for i in range(self.num_classes)]
        out: dict[str, Any] = {"images": self.count, "top1": self.top1}
        if self.reports_top5:
            out.update(top5=self.top5, top5_k=self.k)
        out["loss"] = self.loss
        for key in ("per_class_accuracy", "per_class_precision", "per_class_recall", "per_class_f1"):
            out[key] = dict(zip(names, getattr(self, key)))
        return out


def _images_in(loader: DataLoader) -> int | None:
    """How many images this process evaluates (its shard under a DistributedSampler), when known."""
    try:
        return len(loader.sampler)
    except TypeError:
        return None


def _ratios(numerators: torch.Tensor, denominators: torch.Tensor) -> list[float | None]:
    return [n / d if d else None for n, d in zip(numerators.tolist(), denominators.tolist())]


@torch.no_grad()
def evaluate(
    model: nn.Module | Callable[[torch.Tensor], torch.Tensor],
    loader: DataLoader,
    *,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    amp_dtype: torch.dtype | None = None,
    distributed: bool = False,
    keep_topk: int = 0,
    progress: bool = False,
) -> EvalResult:
    """Metrics of ``model`` (logits ``[B, N]``) over ``loader`` (batches of images and int labels).

    ``num_classes``: N (default: ``model.num_classes``). ``device``: where to run (default: the
    model's). ``amp_dtype``: autocast dtype (bfloat16/float16) or None for full precision.
    ``distributed``: every rank evaluated a disjoint shard; sum the counts over all ranks.
    ``keep_topk``: also return each image's ``keep_topk`` best classes (``EvalResult.predictions``;
    this process's images only, never gathered). ``progress``: a tqdm bar on stderr (hidden when
    stderr is not a terminal). The model is put in eval mode and its training flag restored afterwards.
    ``model`` may also be any callable from pixels to logits (``backends.optimize_for_inference``);
    then ``num_classes`` is needed and ``device`` defaults to the CPU.
    """
    module = model if isinstance(model, nn.Module) else None
    if module is None and num_classes is None:
        raise ConfigError("evaluate: give num_classes for a callable that is not a model")
    num_classes = num_classes or model.num_classes
    default = next(module.parameters()).device if module is not None else torch.device("cpu")
    device = torch.device(device) if device is not None else default
    k = min(TOP_K, num_classes)
    # Sums on the device, read once at the end: no host sync per batch.
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    topk_hits = torch.zeros((), dtype=torch.int64, device=device)
    kept: list[tuple[torch.Tensor, ...]] = []
    was_training = module is not None and module.training
    if module is not None:
        module.eval()
    bar = tqdm(total=_images_in(loader), unit="img", desc="eval", file=sys.stderr, disable=None if progress else True, leave=False)
    try:
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                logits = model(x)
            logits = logits.float()  # [B, N]
            if logits.shape[-1] != num_classes:
                raise DataError(f"the model gives {logits.shape[-1]} logits, expected {num_classes} classes")
            if y.min() < 0 or y.max() >= num_classes:
                raise DataError(f"labels must lie in 0..{num_classes - 1}, got {int(y.min())}..{int(y.max())}")
            loss_sum += F.cross_entropy(logits, y, reduction="sum").double()
            topk_hits += (logits.topk(k, dim=-1).indices == y[:, None]).any(dim=-1).sum()
            # index_put_ with accumulate: deterministic on CUDA too, where bincount is not.
            cells = y * num_classes + logits.argmax(dim=-1)
            confusion.index_put_((cells,), torch.ones_like(cells), accumulate=True)
            if keep_topk:
                probs = logits.softmax(dim=-1)
                top = probs.topk(min(keep_topk, num_classes), dim=-1)
                kept.append((top.indices.cpu(), top.values.cpu(), y.cpu(), probs.gather(1, y[:, None])[:, 0].cpu()))
            bar.update(len(y))
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
    if distributed:
        import torch.distributed as dist

        # One float64 vector keeps the counts exact (far below 2**53) and costs one collective.
        stats = torch.cat([confusion.double(), loss_sum.view(1), topk_hits.double().view(1)])
        dist.all_reduce(stats)
        confusion, loss_sum, topk_hits = stats[:-2].round().long(), stats[-2], stats[-1].round().long()
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = int(confusion.sum())
    if count == 0:
        raise DataError("nothing to evaluate: the dataset is empty")
    return EvalResult(
        count=count,
        loss=float(loss_sum) / count,
        top1=int(confusion.diag().sum()) / count,
        top5=int(topk_hits) / count,
        k=k,
        confusion=confusion,
        predictions=Predictions(*(torch.cat(parts) for parts in zip(*kept))) if kept else None,
    )


# ------------------------------------------------------------------------------------------ CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--weights", required=True,
                        help="checkpoint folder or file (a run folder, its last.pt or best.pt), a hub id or a registry name (`cvt models`)")
    parser.add_argument("--data", required=True, help="'digits' (its held-out split), an image folder, an Oxford-IIIT Pet folder or a .csv")
    parser.add_argument("--split", default="val", choices=("val", "train"),
                        help="which split to evaluate (default: val; folders without train/ and val/ hold out --val-fraction)")
    parser.add_argument("--val-fraction", type=float, default=0.1, help="held-out fraction of a folder without a val/ split (default: 0.1)")
    parser.add_argument("--split-seed", type=int, default=0, help="seed of that hold-out (default: 0, as `cvt train`)")
    parser.add_argument("--image-size", type=int, default=None, help="input side (default: the checkpoint's preprocessing)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default: 64)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default: 0 for digits, else min(4, CPUs - 1))")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda when available)")
    add_backend_arguments(parser)
    parser.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"), help="autocast dtype (fp16: CUDA only)")
    parser.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted) instead of stopping")
    parser.add_argument("--output", default=None,
                        help="confusion-matrix PNG path (default: confusion_matrix.png in the checkpoint's folder, else here)")
    parser.add_argument("--save-images", type=int, default=0, metavar="N",
                        help="also write the first N evaluated images, as the model sees them, to images/ beside the "
                             "confusion matrix (PNG named INDEX_LABEL.png), e.g. to try `cvt predict` on them")
    parser.add_argument("--format", default="text", choices=("text", "json"),
                        help="text (default) or json: one object with top1, top5 (with more than 5 classes), loss "
                             "(fractions) and per-class accuracy, precision, recall and F1")
    parser.add_argument("--errors", default=None, metavar="FILE.csv",
                        help="also list the misclassified images in this CSV: path, true class and its score, then "
                             "the top-5 (or all classes, when fewer) with scores (default: not written)")
    add_image_safety_arguments(parser)


def _checkpoint_folder(weights: str) -> Path | None:
    """The local folder a checkpoint lives in (the run folder for last.pt/best.pt), or None for a
    registry name or a hub id."""
    from .pretrained import resolve

    if resolve(weights) is not None:
        return None
    path = Path(weights).expanduser()
    if path.is_dir():
        return path
    if path.is_file():
        return path.parent
    return None


def _check_labels(model_labels: dict[int, str] | None, data_labels: dict[int, str], num_classes: int, data: str) -> str | None:
    """Raise when the class counts differ; a note when both name their classes differently."""
    if len(data_labels) != num_classes:
        raise DataError(f"{data} has {len(data_labels)} classes but the model has {num_classes}; evaluate on data with the model's classes")
    if model_labels is None or all(model_labels[i] == data_labels[i] for i in range(num_classes)):
        return None
    first = next(i for i in range(num_classes) if model_labels[i] != data_labels[i])
    return (f"note: class names differ from the model's (class {first}: {data_labels[first]!r} in the data, "
            f"{model_labels[first]!r} in the model); classes are matched by index")


def run(args: argparse.Namespace) -> int:
    from .datasets import build_datasets
    from .plots import plot_confusion_matrix
    from .pretrained import load_pretrained

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.save_images < 0:
        raise ConfigError(f"--save-images must be >= 0, got {args.save_images}")
    if args.workers is not None and args.workers < 0:
        raise ConfigError(f"--workers must be >= 0, got {args.workers}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {args.device}: CUDA is not available; use --device cpu")
    if args.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs a CUDA device; use --amp bf16 on the CPU")
    if args.output:
        check_output(args.output, "--output")
    if args.errors:
        check_output(args.errors, "--errors")
    if not Path(args.data).expanduser().exists() and args.data != "digits":
        # Before the (slow) model load: the most common mistake gets the quickest answer.
        raise DataError(f"data not found: {args.data} (expected 'digits', an image folder or a .csv file)")

    # The weights with the evaluation preprocessing that belongs to them (registry names and hub ids too).
    model, pre, _ = load_pretrained(args.weights, allow_nonfinite=args.allow_nonfinite_weights)
    model = model.to(device).eval()
    pre = dataclasses.replace(pre, max_pixels=args.max_pixels)
    if args.image_size is not None:
        pre = dataclasses.replace(pre, image_size=args.image_size)
    digits = args.data == "digits"
    # No augmentation on either split. Digits are in-memory tensors: their transforms map tensors.
    splits = build_datasets(
        args.data, image_size=pre.image_size, train_transform=_identity if digits else pre,
        eval_transform=None if digits else pre, val_fraction=args.val_fraction, seed=args.split_seed,
        skip_bad_images=args.skip_bad_images,
    )
    note = _check_labels(model.config.id2label, splits.id2label, model.num_classes, args.data)
    if note:
        print(note, file=sys.stderr)
    dataset = splits.val if args.split == "val" else splits.train
    workers = args.workers if args.workers is not None else (0 if digits else min(4, max(0, (os.cpu_count() or 1) - 1)))
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=workers, pin_memory=device.type == "cuda")
    amp = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    if amp is not None and (args.backend not in (None, "eager") or args.precision != "float32"):
        raise ConfigError("--amp runs the eager float32 backend; for bfloat16 on the CPU use --precision bfloat16")
    log_backend_choice(args)
    runner = inference_runner(model, args.backend, args.precision)
    result = evaluate(runner, loader, num_classes=model.num_classes, device=device, amp_dtype=amp,
                      keep_topk=TOP_K if args.errors else 0, progress=True)

    labels = [splits.id2label[i] for i in range(model.num_classes)]
    folder = _checkpoint_folder(args.weights)
    png = Path(args.output) if args.output else (folder or Path(".")) / "confusion_matrix.png"
    plot_confusion_matrix(result.confusion, labels, png,
                          title=f"{args.data} ({args.split}): top-1 {100 * result.top1:.2f} %, {result.count} images")
    images = save_images(dataset, labels, splits.mean, splits.std, png.parent / "images", args.save_images) if args.save_images else None
    wrong = None
    if args.errors:
        paths = [path for path, _ in dataset.samples] if hasattr(dataset, "samples") else \
            [f"{args.data}:{args.split}:{i}" for i in range(len(dataset))]  # in-memory digits: their index
        wrong = write_errors(result.predictions, paths, labels, Path(args.errors))
    if args.format == "json":
        out = {"weights": args.weights, "data": args.data, "split": args.split, **result.to_dict(labels),
               "skipped_images": len(splits.skipped), "confusion_matrix_png": str(png)}
        if images is not None:
            out["images_dir"] = str(images)
        if wrong is not None:
            out.update(misclassified=wrong, errors_csv=args.errors)
        print(to_json(out))
        return 0
    print(f"{args.weights} on {args.data} ({args.split}): {result.count} images, {model.num_classes} classes"
          + (f", {len(splits.skipped)} unreadable image(s) skipped" if splits.skipped else ""))
    top5 = f"   top-{result.k} {100 * result.top5:.2f} %" if result.reports_top5 else ""
    print(f"top-1 {100 * result.top1:.2f} %{top5}   loss {result.loss:.4f}")
    print(_per_class_table(result, labels))
    print(f"confusion matrix: {png}")
    if images is not None:
        print(f"{min(args.save_images, len(dataset))} images: {images}")
    if wrong is not None:
        print(f"{wrong} misclassified image(s): {args.errors}")
    return 0


def write_errors(predictions: Predictions, paths: Sequence[str], labels: Sequence[str], path: Path) -> int:
    """Write the misclassified images of ``predictions`` (``paths[i]`` is image i) as a CSV; returns how many.

    Columns: ``path, true_index, true_label, true_score``, then ``pred_1_index, pred_1_label,
    pred_1_score``, ... for the k kept classes, best first; scores are softmax probabilities."""
    k = predictions.indices.shape[1]
    header = ["path", "true_index", "true_label", "true_score"]
    header += [f"pred_{r}_{field}" for r in range(1, k + 1) for field in ("index", "label", "score")]
    rows = []
    for i, (top, scores, target, target_score) in enumerate(zip(predictions.indices.tolist(), predictions.scores.tolist(),
                                                                 predictions.targets.tolist(), predictions.target_scores.tolist())):
        if top[0] != target:
            rows.append([paths[i], target, labels[target], f"{target_score:.6f}"]
                        + [v for j, s in zip(top, scores) for v in (j, labels[j], f"{s:.6f}")])

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            writer.writerows(rows)

    atomic_save(write, path)
    return len(rows)


def save_images(
    dataset: Dataset, labels: list[str], mean: Sequence[float], std: Sequence[float], folder: Path, limit: int
) -> Path:
    """The first ``limit`` items of ``dataset`` as 8-bit PNGs, un-normalised: for an input that the
    preprocessing only resizes (digits) ``cvt predict`` sees them as evaluation did, to 8-bit rounding."""
    for i in range(min(limit, len(dataset))):
        x, y = dataset[i]
        name = "".join(c if c.isalnum() or c in "-." else "_" for c in labels[y])
        image = load_image(denormalize(x, mean, std))  # 0..1 pixels -> 8-bit RGB, round(v * 255)
        atomic_save(lambda tmp: image.save(tmp, format="PNG"), folder / f"{i:04d}_{name}.png")
    return folder


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def _per_class_table(result: EvalResult, labels: list[str], limit: int = 30) -> str:
    """Accuracy (recall), precision and F1 of every class, or of the ``limit`` least accurate when there are more."""
    totals = result.confusion.sum(dim=1).tolist()
    correct = result.confusion.diag().tolist()
    recall, precision, f1 = result.per_class_recall, result.per_class_precision, result.per_class_f1
    order = list(range(len(labels)))
    title = "per-class accuracy (recall), precision and F1:"
    if len(labels) > limit:
        order = sorted(order, key=lambda i: recall[i] if recall[i] is not None else np.inf)[:limit]
        title = f"per-class accuracy (recall), precision and F1, the {limit} least accurate of {len(labels)} classes:"
    width = max(min(max(len(labels[i]) for i in order), 40), len("class"))

    def pct(v: float | None) -> str:
        return f"{100 * v:6.2f} %" if v is not None else "      - "

    rows = [title, f"  {'class':<{width}}  {'accuracy':>8}  {'precision':>9}  {'F1':>8}  correct/images"]
    for i in order:
        rows.append(f"  {labels[i][:40]:<{width}}  {pct(recall[i])}  {pct(precision[i]):>9}  {pct(f1[i])}  {correct[i]}/{totals[i]}")
    return "\n".join(rows)
