"""Training and fine-tuning (``cvt train``): the CvT paper's recipe in one loop, from one CPU to many GPUs.

    cvt train                                              # the embedded digits demo, ~25 s on 2 cores
    cvt train --data ./pets --weights microsoft/cvt-13     # fine-tune: new head, the fine-tuning preset
    cvt train --data ./imagenet --model cvt-13 --batch-size 2048 --amp bf16   # the paper's recipe
    torchrun --nproc_per_node 8 -m torchcvt train ...      # the same command on 8 GPUs (DDP)

Recipes (``--recipe``; every value can be overridden by its option):

* ``paper`` (from scratch; microsoft/CvT ``experiments/imagenet/cvt/*.yaml``): AdamW, 2.5e-4 per 256
  images scaled linearly with the global batch, weight decay 0.05 (CvT-13) or 0.1 (CvT-21, W24) and
  none on norms, biases and cls tokens, 300 epochs of cosine decay to 1e-5 after 5 warm-up epochs
  from 1e-6, label smoothing 0.1, mixup 0.8 / cutmix 1.0, RandAugment m9 mstd 0.5, random erasing
  0.25, bicubic random-resized crop and flip, the model's per-stage drop path.
* ``finetune`` (default with ``--weights``): the checkpoint's weights with a new head when the class
  count differs, 2e-4 per 256 images, 10 epochs, 1 warm-up epoch, no mixup, lighter crops, no
  RandAugment or erasing (``augment.finetune_transform``).
* ``digits`` (default for ``--data digits``): ``cvt-tiny`` on the 8x8 scikit-learn digits, small
  rotations/shifts/zooms, no flip (a mirrored 2 is no 2), no mixup.

Reproducibility. Every random draw comes from a stream seeded by what it belongs to, never by how
the work was split: an image's augmentation by ``(seed, epoch, index)`` (the same whatever the
number of DataLoader workers or processes), the data order by ``(seed, epoch)`` and mixup/drop path
by ``(seed, step, rank)``. So a resumed run redraws exactly what the killed run would have drawn, and
with ``--deterministic`` on the CPU ends bit-identical to a run never killed. Checkpoints still store
every RNG state (python, numpy, torch, CUDA) and resume restores them.

Distributed. Under ``torchrun`` (RANK, WORLD_SIZE, LOCAL_RANK in the environment) the model is
wrapped in DDP (NCCL on CUDA, gloo on CPU); each global batch of the 1-process order is cut into
equal shares, one per rank, and the BatchNorms inside attention compute their statistics over the
whole global batch (``nn.SyncBatchNorm`` on GPUs, ``CrossRankBatchNorm2d`` on CPUs, where
SyncBatchNorm refuses to run). With no per-rank randomness (no mixup, drop path or dropout) N
processes and one process therefore compute the same steps, up to float rounding. Rank 0 alone
logs and writes files.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import io
import json
import logging
import math
import os
import random
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from . import augment
from .checkpoint import read_checkpoint, save_pretrained
from .config import preset_config
from .datasets import DataSplits, build_datasets, describe
from .errors import CheckpointError, ConfigError, DataError, TorchCvTError
from .evaluate import evaluate
from .fileio import atomic_save, atomic_write_text
from .model import CvT, create_model
from .plots import plot_learning_curves
from .transforms import PreprocessConfig

logger = logging.getLogger("torchcvt")

# ------------------------------------------------------------------------------------------ config
RECIPES: dict[str, dict[str, Any]] = {
    "paper": dict(
        epochs=300, batch_size=256, base_lr=2.5e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=5.0,
        weight_decay=None, label_smoothing=0.1, mixup=0.8, cutmix=1.0, randaugment="rand-m9-mstd0.5-inc1",
        random_erasing=0.25, hflip=0.5, crop_scale=0.08, threads=None,
    ),
    "finetune": dict(
        epochs=10, batch_size=64, base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-6, warmup_epochs=1.0,
        weight_decay=0.05, label_smoothing=0.1, mixup=0.0, cutmix=0.0, randaugment=None,
        random_erasing=0.0, hflip=0.5, crop_scale=0.35, threads=None,
    ),
    # 15 epochs of 22 steps at lr 3e-3 (batch 64). One thread: cvt-tiny's ops are so small that a
    # second OpenMP thread gains little, and on a shared, busy machine its barriers made steps up
    # to 50x slower in our measurements.
    "digits": dict(
        epochs=15, batch_size=64, base_lr=1.2e-2, warmup_lr=1e-5, min_lr=1e-5, warmup_epochs=1.0,
        weight_decay=0.05, label_smoothing=0.1, mixup=0.0, cutmix=0.0, randaugment=None,
        random_erasing=0.0, hflip=0.0, crop_scale=1.0, threads=1,
    ),
}
# The official configs decay CvT-21 and CvT-W24 twice as hard as CvT-13.
_WEIGHT_DECAY_0_1 = ("cvt-21", "cvt-w24")

# What a run writes in its folder (a new run in the same folder removes them first).
RUN_FILES = ("last.pt", "best.pt", "train_config.json", "metrics.jsonl", "metrics.csv",
                    "learning_curves.png", "config.json", "model.safetensors", "preprocessor_config.json")


@dataclass
class TrainConfig:
    """Every option of a run, resolved. Saved as ``train_config.json`` and in every checkpoint;
    ``--resume`` reads it back from ``last.pt``. The defaults are the digits recipe, what ``cvt train``
    runs without arguments; ``resolve_config`` fills in the other recipes."""

    data: str = "digits"
    model: str | None = "cvt-tiny"  # a preset; None: the architecture of ``weights``
    weights: str | None = None  # start from these weights (new head if the class count differs)
    recipe: str = "digits"
    output: str = "runs/digits"
    image_size: int = 32
    epochs: int = 15
    batch_size: int = 64  # global: over all processes and accumulation steps
    lr: float = 3e-3  # peak learning rate
    warmup_lr: float = 1e-5
    min_lr: float = 1e-5
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    mixup: float = 0.0  # mixup alpha (0: off)
    cutmix: float = 0.0  # cutmix alpha (0: off)
    randaugment: str | None = None  # timm spec such as "rand-m9-mstd0.5-inc1"
    random_erasing: float = 0.0
    hflip: float = 0.0
    crop_scale: float = 1.0  # smallest area fraction of the random-resized crop
    drop_path: tuple[float, ...] | None = None  # per-stage drop-path rates (None: the model's own)
    accum_steps: int = 1
    clip_grad: float = 0.0  # max gradient norm (0: no clipping)
    ema_decay: float = 0.0  # EMA of the weights (0: off); validation and the saved model use it
    amp: str = "none"  # "none", "bf16" or "fp16" (CUDA, with a gradient scaler)
    compile: bool = False
    seed: int = 0
    deterministic: bool = False
    threads: int | None = 1  # torch CPU threads per process (None: torch's default)
    workers: int | None = None  # DataLoader workers per process (None: 0 for digits, else min(8, CPUs/process - 1))
    device: str | None = None  # "cpu", "cuda" (None: CUDA when available)
    checkpoint_every_steps: int = 0  # also write last.pt every N optimizer steps (0: once per epoch)
    max_steps: int | None = None  # stop after this many optimizer steps (the schedule still spans `epochs`)
    val_fraction: float = 0.1  # hold-out of a folder without a val/ split
    split_seed: int = 0  # seed of that hold-out (kept apart from `seed`: runs compare on the same images)
    skip_bad_images: bool = False

    def validate(self) -> None:
        """One-line ConfigErrors naming the option."""
        if self.recipe not in RECIPES:
            raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ConfigError(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        positive = ("epochs", "batch_size", "lr", "accum_steps", "image_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        non_negative = ("warmup_lr", "min_lr", "warmup_epochs", "weight_decay", "mixup", "cutmix", "clip_grad",
                        "checkpoint_every_steps")
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("label_smoothing", "ema_decay"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must lie in [0, 1), got {getattr(self, name)}")
        for name in ("random_erasing", "hflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a probability in [0, 1], got {getattr(self, name)}")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError(f"--crop-scale must lie in (0, 1], got {self.crop_scale}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ConfigError(f"--max-steps must be >= 1, got {self.max_steps}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")
        if self.workers is not None and self.workers < 0:
            raise ConfigError(f"--workers must be >= 0, got {self.workers}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in d.items() if k in known}
        if values.get("drop_path") is not None:
            values["drop_path"] = tuple(values["drop_path"])
        return cls(**values)


def default_weight_decay(model_name: str | None) -> float:
    return 0.1 if model_name and model_name.lower().startswith(_WEIGHT_DECAY_0_1) else 0.05


# ------------------------------------------------------------------------------------ randomness
_MASK64 = (1 << 64) - 1


def stream_seed(*values: int) -> int:
    """A 63-bit seed from integers (splitmix64 finaliser per value): neighbouring inputs such as
    consecutive image indices get unrelated random streams."""
    h = 0
    for v in values:
        h = (h + (v & _MASK64) + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also every CUDA device


# Stream tags, so that sample, order and step streams never share a seed.
_SAMPLE, _ORDER, _STEP = 1, 2, 3


class SeededSamples(Dataset):
    """``dataset[(epoch, index)]``: the item, with python/numpy/torch seeded by ``(seed, epoch, index)``
    first, so its random augmentation does not depend on the worker or the process that loads it."""

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed_everything(stream_seed(_SAMPLE, self.seed, epoch, index))
        return self.dataset[index]


def epoch_batches(
    num_samples: int, batch_size: int, *, seed: int, epoch: int, rank: int = 0, world_size: int = 1,
    accum_steps: int = 1, start_step: int = 0,
) -> list[list[tuple[int, int]]]:
    """This rank's micro-batches of ``(epoch, index)`` for one epoch, from optimizer step ``start_step``.

    A permutation seeded by ``(seed, epoch)`` is cut into global batches of ``batch_size`` (the
    incomplete last one dropped); rank r takes the r-th of ``world_size`` equal shares of each, cut
    into ``accum_steps`` micro-batches. Concatenating all ranks' shares gives back the 1-process
    batch, whatever ``world_size``: resuming on another number of processes keeps the order.
    """
    g = torch.Generator().manual_seed(stream_seed(_ORDER, seed, epoch))
    order = torch.randperm(num_samples, generator=g).tolist()
    share = batch_size // world_size
    micro = share // accum_steps
    batches = []
    for step in range(start_step, num_samples // batch_size):
        mine = order[step * batch_size + rank * share: step * batch_size + (rank + 1) * share]
        batches += [[(epoch, i) for i in mine[m * micro:(m + 1) * micro]] for m in range(accum_steps)]
    return batches


def rng_state() -> dict[str, Any]:
    """Every RNG state as tensors and plain values (``torch.load(weights_only=True)`` reads them)."""
    version, state, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        "python": [version, torch.tensor(state, dtype=torch.int64), gauss],
        "numpy": [np_name, torch.from_numpy(np_keys.astype(np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    version, py_state, gauss = state["python"]
    random.setstate((version, tuple(py_state.tolist()), gauss))
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = state["numpy"]
    np.random.set_state((np_name, np_keys.numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- optimisation parts
def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for tensors with ndim <= 1 (norms, biases) and ``model.no_weight_decay()``
    names (the cls tokens), as the official code; decay for every weight matrix and kernel."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, *, lr: float, warmup_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from ``warmup_lr`` to ``lr`` over ``warmup_steps``, then half a cosine down to
    ``min_lr`` at ``total_steps`` (per optimizer step; timm's per-epoch steps, made smooth)."""
    if step < warmup_steps:
        return warmup_lr + (lr - warmup_lr) * step / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class EMA:
    """Exponential moving average of a model's weights and buffers (timm's ModelEmaV2):
    ``ema = decay * ema + (1 - decay) * model`` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        new = model.state_dict()
        for name, e in self.module.state_dict().items():
            if e.is_floating_point():
                e.lerp_(new[name], 1.0 - self.decay)
            else:  # BatchNorm's num_batches_tracked
                e.copy_(new[name])


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is again the sum over ranks (every rank's loss depends on every
    rank's statistics)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class CrossRankBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the global batch of all ranks, on CPUs (gloo).

    ``nn.SyncBatchNorm`` raises "SyncBatchNorm expected input tensor to be on GPU" for CPU tensors;
    this computes the same thing with one differentiable all-reduce of per-channel sums. Statistics
    are summed in float64, as the CPU BatchNorm kernel accumulates, so one process and N processes
    agree to float rounding. Evaluation mode uses the running statistics, as every BatchNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        c = x.shape[1]
        local = torch.cat([
            x.sum(dim=(0, 2, 3), dtype=torch.float64),
            x.double().square().sum(dim=(0, 2, 3)),
            x.new_full((1,), x.numel() // c, dtype=torch.float64),
        ])  # [2C + 1]: sums, sums of squares, element count per channel
        total = _AllReduceSum.apply(local)
        count = total[-1]
        mean = total[:c] / count
        var = total[c:2 * c] / count - mean.square()  # biased, used to normalise
        with torch.no_grad():
            self.num_batches_tracked += 1
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
            self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
            self.running_var.lerp_((var * count / (count - 1)).to(self.running_var.dtype), momentum)
        scale = self.weight * torch.rsqrt(var.to(x.dtype) + self.eps)  # [C]
        shift = self.bias - mean.to(x.dtype) * scale
        return x * scale.view(1, c, 1, 1) + shift.view(1, c, 1, 1)


def convert_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """BatchNorms whose statistics span all ranks: ``nn.SyncBatchNorm`` on GPUs, ours on CPUs."""
    if device.type != "cpu":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            new = CrossRankBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
            new.load_state_dict(child.state_dict())
            setattr(model, name, new.to(device))
        else:
            convert_batchnorm(child, device)
    return model


# -------------------------------------------------------------------------------------- the setup
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_device(cfg: TrainConfig) -> tuple[Dist, torch.device]:
    """The process group (from torchrun's environment) and this process's device."""
    d = Dist(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
             int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    want_cuda = cfg.device != "cpu" and torch.cuda.is_available()
    if cfg.device not in (None, "cpu") and not torch.cuda.is_available():
        raise ConfigError(f"--device {cfg.device}: CUDA is not available; use --device cpu")
    device = torch.device("cuda", d.local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if cfg.amp == "fp16" and device.type != "cuda":
        raise ConfigError("--amp fp16 needs CUDA (it uses a gradient scaler); use --amp bf16 on the CPU")
    if d.enabled and not dist.is_initialized():
        dist.init_process_group("nccl" if want_cuda else "gloo")
        # DDP compares gradient strides literally, and the depthwise kernels [C, 1, k, k] have a size-1
        # dimension whose stride is arbitrary: their contiguous gradients are reported as mismatched.
        warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    return d, device


def build_data(cfg: TrainConfig) -> DataSplits:
    """Datasets with the recipe's augmentation; the per-image transforms run in DataLoader workers."""
    if cfg.data == "digits":
        # In-memory tensors with datasets' own augmentation (small rotations, shifts and zooms).
        image_options = (("randaugment", None), ("random_erasing", 0.0), ("hflip", 0.0), ("crop_scale", 1.0))
        ignored = ["--" + name.replace("_", "-") for name, off in image_options if getattr(cfg, name) != off]
        if ignored:
            logger.warning("ignored for the digits, which come with their own augmentation: %s", ", ".join(ignored))
        return build_datasets("digits", image_size=cfg.image_size)
    make = augment.finetune_transform if cfg.recipe == "finetune" else augment.train_transform
    train_tf = make(cfg.image_size, scale=(cfg.crop_scale, 1.0), hflip=cfg.hflip, randaugment=cfg.randaugment,
                    random_erasing=cfg.random_erasing)
    return build_datasets(
        cfg.data, image_size=cfg.image_size, train_transform=train_tf,
        eval_transform=PreprocessConfig.for_resolution(cfg.image_size), val_fraction=cfg.val_fraction,
        seed=cfg.split_seed, skip_bad_images=cfg.skip_bad_images,
    )


def build_model(cfg: TrainConfig, num_classes: int, id2label: dict[int, str]) -> CvT:
    overrides: dict[str, Any] = {}
    if cfg.drop_path is not None:
        overrides["drop_path_rate"] = cfg.drop_path
    if cfg.weights is not None:
        # Logs "new N-class head" when the class count differs from the checkpoint's.
        model = create_model(cfg.model, weights=cfg.weights, num_classes=num_classes, **overrides)
    else:
        model = create_model(cfg.model, num_classes=num_classes, **overrides)
    model.config = model.config.replace(id2label=id2label, image_size=cfg.image_size)
    return model


def resolve_config(**options: Any) -> TrainConfig:
    """A TrainConfig with the recipe's value for every option not given (None counts as not given).

    Options are TrainConfig's field names, as on the command line: ``resolve_config(data="./pets",
    weights="./cvt-13")`` is the fine-tuning recipe for that folder, ``resolve_config()`` the digits demo.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    data = given.get("data", "digits")
    weights = given.get("weights")
    recipe = given.get("recipe") or ("digits" if data == "digits" else "finetune" if weights else "paper")
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    r = RECIPES[recipe]
    model = given.get("model") or (None if weights else "cvt-tiny" if data == "digits" else "cvt-13")
    values = {k: v for k, v in r.items() if k in known}
    values.update(data=data, model=model, recipe=recipe, output=default_output(data))
    values.update(given)
    values["model"] = model
    if "image_size" not in given:
        values["image_size"] = _model_image_size(model, weights)
    if "lr" not in given:
        values["lr"] = r["base_lr"] * values["batch_size"] / 256
    if values["weight_decay"] is None:
        values["weight_decay"] = default_weight_decay(model)
    if values["randaugment"] in ("none", ""):
        values["randaugment"] = None
    if isinstance(values.get("drop_path"), str):
        values["drop_path"] = _parse_drop_path(values["drop_path"])
    elif values.get("drop_path") is not None:
        values["drop_path"] = tuple(values["drop_path"])
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _model_image_size(model: str | None, weights: str | None) -> int:
    """The resolution a preset or a checkpoint was made for (transformers' files say none: 224)."""
    if model is not None:
        return preset_config(model).image_size
    config = read_checkpoint(weights).config
    return config.image_size if config is not None else preset_config("cvt-13").image_size


def default_output(data: str) -> str:
    return str(Path("runs") / ("digits" if data == "digits" else Path(data.rstrip("/\\")).stem or "data"))


def _parse_drop_path(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"--drop-path must be comma-separated per-stage rates such as 0,0,0.1, got {text!r}") from None


# ------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_save(lambda tmp: torch.save(state, tmp), path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from (start without --resume, or pass the run's --output)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path}: cannot read the training checkpoint ({reason})") from None


def write_metrics(history: list[dict[str, Any]], out: Path) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` rewritten from the whole history (resume-safe) and the
    learning-curve PNG redrawn."""
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    atomic_write_text(out / "metrics.csv", buffer.getvalue())
    plot_learning_curves(history, out / "learning_curves.png")


class TrainingDiverged(TorchCvTError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) training as ``cfg`` says; returns the last row of the metrics history."""
    d, device = setup_device(cfg)
    log = print if d.main else (lambda *a, **k: None)
    out = Path(cfg.output)
    state = load_checkpoint(out / "last.pt") if resume else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    # The same initial weights (and new head) on every rank, and in a 1-process run.
    seed_everything(stream_seed(_STEP, cfg.seed, -1))

    # ---- data and model
    splits = build_data(cfg)
    n_train = len(splits.train)
    if cfg.batch_size > n_train:
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the training set ({n_train} images in {cfg.data}); lower it")
    if cfg.batch_size % (d.world_size * cfg.accum_steps):
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by processes x --accum-steps "
                          f"({d.world_size} x {cfg.accum_steps})")
    raw = build_model(cfg, splits.num_classes, splits.id2label)
    if state is not None:
        raw.load_state_dict(state["model"])
    raw.to(device)
    ema = EMA(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if ema is not None and state is not None:
        ema.module.load_state_dict(state["ema"])
    if d.enabled:
        raw = convert_batchnorm(raw, device)
    net = torch.compile(raw) if cfg.compile else raw
    model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) if d.enabled else net

    # ---- optimisation
    steps_per_epoch = n_train // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    optimizer = torch.optim.AdamW(param_groups(raw, cfg.weight_decay), lr=cfg.lr, fused=True if device.type == "cuda" else None)
    schedule = dict(lr=cfg.lr, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr, warmup_steps=warmup_steps, total_steps=total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, **schedule) / cfg.lr)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    mixup = None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        mixup = augment.Mixup(cfg.mixup, cfg.cutmix, label_smoothing=cfg.label_smoothing, num_classes=splits.num_classes)
        # Mixup's targets are probabilities (smoothing included), which CrossEntropyLoss accepts as is.
        criterion: nn.Module = nn.CrossEntropyLoss()
    else:
        criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # ---- where we are
    epoch, step, epoch_step, best_top1, history = 0, 0, 0, -1.0, []
    stats = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}  # this epoch so far, all ranks
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        epoch, step, epoch_step = state["epoch"], state["step"], state["epoch_step"]
        best_top1, history, stats = state["best_top1"], state["history"], state["epoch_stats"]
        set_rng_state(state["rng"])
        log(f"resuming {out / 'last.pt'}: epoch {epoch + 1}, step {step}")
    elif d.main:
        _start_run_folder(out, cfg)

    val_set = splits.val if not d.enabled else Subset(splits.val, range(d.rank, len(splits.val), d.world_size))
    workers = cfg.workers if cfg.workers is not None else (
        0 if cfg.data == "digits" else min(8, max(0, (os.cpu_count() or 1) // d.local_world_size - 1)))
    loader_args = dict(num_workers=workers, pin_memory=device.type == "cuda")
    val_loader = DataLoader(val_set, batch_size=max(1, cfg.batch_size // d.world_size), **loader_args)
    train_set = SeededSamples(splits.train, cfg.seed)
    log(_describe_run(cfg, splits, raw, d, steps_per_epoch))

    last_step = min(total_steps, cfg.max_steps or total_steps)
    while epoch < cfg.epochs and step < last_step:
        # ---- one epoch (or what is left of it)
        batches = epoch_batches(n_train, cfg.batch_size, seed=cfg.seed, epoch=epoch, rank=d.rank,
                                world_size=d.world_size, accum_steps=cfg.accum_steps, start_step=epoch_step)
        loader = DataLoader(train_set, batch_sampler=batches, **loader_args)
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.int64, device=device)
        seen = 0
        bar = tqdm(total=steps_per_epoch, initial=epoch_step, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="step",
                   disable=None if d.main else True, leave=False, dynamic_ncols=True)
        t0 = time.perf_counter()
        for micro, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Mixup and drop path draw from streams of (seed, step, rank): resumable, not worker-bound.
            seed_everything(stream_seed(_STEP, cfg.seed, step, d.rank))
            inputs, target = mixup(x, y) if mixup is not None else (x, y)
            sync = (micro + 1) % cfg.accum_steps == 0  # the last micro-batch of an optimizer step
            with model.no_sync() if d.enabled and not sync else nullcontext():
                with autocast:
                    logits = model(inputs)
                    loss = criterion(logits.float(), target)
                scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(dim=-1) == y).sum()
            seen += len(y)
            if not sync:
                continue
            if cfg.clip_grad > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(raw.parameters(), cfg.clip_grad)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if ema is not None:
                ema.update(raw)
            step += 1
            epoch_step += 1
            bar.update()
            checkpoint_now = cfg.checkpoint_every_steps and step % cfg.checkpoint_every_steps == 0
            if step % 10 == 0 or checkpoint_now:
                # Host sync only here: the loss check and the progress bar every 10 steps.
                _check_finite(loss_sum, d, epoch, step, out)
                bar.set_postfix(loss=f"{float(loss_sum) / max(1, seen):.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if checkpoint_now and epoch_step < steps_per_epoch:
                partial = _merge_stats(stats, loss_sum, correct, seen, time.perf_counter() - t0, d)
                if d.main:
                    save_checkpoint(out / "last.pt", _state(raw, ema, optimizer, scheduler, scaler, cfg, epoch, step,
                                                            epoch_step, best_top1, history, partial))
            if step >= last_step:
                break
        bar.close()
        _check_finite(loss_sum, d, epoch, step, out)
        stats = _merge_stats(stats, loss_sum, correct, seen, time.perf_counter() - t0, d)

        # ---- end of the epoch: validate, checkpoint, metrics
        evaluated = ema.module if ema is not None else net
        val = evaluate(evaluated, val_loader, num_classes=splits.num_classes, device=device, amp_dtype=amp_dtype,
                       distributed=d.enabled)
        row = {
            "epoch": epoch + 1, "step": step,
            "train_loss": stats["loss_sum"] / stats["seen"], "train_top1": stats["correct"] / stats["seen"],
            "val_loss": val.loss, "val_top1": val.top1, "val_top5": val.top5,
            "lr": scheduler.get_last_lr()[0], "images_per_sec": stats["seen"] / max(stats["seconds"], 1e-9),
            "epoch_seconds": stats["seconds"],
        }
        history.append(row)
        epoch, epoch_step = epoch + 1, 0
        stats = {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}
        if d.main:
            if val.top1 > best_top1:
                # best.pt before last.pt: a kill in between redoes this epoch and rewrites it the same.
                best_top1 = val.top1
                save_checkpoint(out / "best.pt", {"model": _cpu_state(evaluated), "config": raw.config.to_dict(),
                                                  "train_config": dataclasses.asdict(cfg), "epoch": epoch, "metrics": row})
            save_checkpoint(out / "last.pt", _state(raw, ema, optimizer, scheduler, scaler, cfg, epoch, step, 0,
                                                    best_top1, history, stats))
            write_metrics(history, out)
        log(f"epoch {row['epoch']}/{cfg.epochs}  train loss {row['train_loss']:.4f} top-1 {100 * row['train_top1']:.2f} %  "
            f"val loss {row['val_loss']:.4f} top-1 {100 * row['val_top1']:.2f} % top-{val.k} {100 * row['val_top5']:.2f} %  "
            f"lr {row['lr']:.2e}  {row['images_per_sec']:.0f} img/s  {row['epoch_seconds']:.1f} s")

    # ---- the final model, in transformers' layout, with its evaluation preprocessing
    if d.main:
        final = ema.module if ema is not None else raw
        _save_final(final, out, cfg, splits)
        best = max(history, key=lambda r: r["val_top1"]) if history else None
        if best is not None:
            log(f"done: {out}/model.safetensors (epoch {history[-1]['epoch']}, val top-1 {100 * history[-1]['val_top1']:.2f} %); "
                f"best val top-1 {100 * best['val_top1']:.2f} % at epoch {best['epoch']} in {out}/best.pt; "
                f"learning curves: {out}/learning_curves.png")
    if d.enabled:
        dist.barrier()
        dist.destroy_process_group()
    return history[-1] if history else {}


def _describe_run(cfg: TrainConfig, splits: DataSplits, model: nn.Module, d: Dist, steps_per_epoch: int) -> str:
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = cfg.model or f"the architecture of {cfg.weights}"
    per_process = cfg.batch_size // d.world_size // cfg.accum_steps
    extras = [name for name, on in (("EMA", cfg.ema_decay > 0), ("compile", cfg.compile), ("deterministic", cfg.deterministic),
                                    (f"amp {cfg.amp}", cfg.amp != "none"), (f"clip {cfg.clip_grad}", cfg.clip_grad > 0)) if on]
    return "\n".join([
        f"data: {describe(splits)}",
        f"model: {arch}{' from ' + cfg.weights if cfg.weights and cfg.model else ''}, {params:,} parameters, "
        f"{cfg.image_size}x{cfg.image_size} input, recipe {cfg.recipe}",
        f"optimizer: AdamW lr {cfg.lr:.3g} (global batch {cfg.batch_size} = {d.world_size} process(es) x {per_process} "
        f"x {cfg.accum_steps} accumulation), weight decay {cfg.weight_decay}, cosine to {cfg.min_lr:g} after "
        f"{cfg.warmup_epochs:g} warm-up epoch(s); {cfg.epochs} epoch(s) of {steps_per_epoch} steps"
        + (f"; {', '.join(extras)}" if extras else ""),
        f"output: {cfg.output}",
    ])


def _start_run_folder(out: Path, cfg: TrainConfig) -> None:
    """A fresh run: remove what an earlier run in the same folder wrote, then save the config."""
    old = [name for name in RUN_FILES if (out / name).exists()]
    if old:
        logger.warning("%s holds an earlier run (%s); starting a new one over it (--resume continues the old one)",
                       out, ", ".join(old))
        for name in old:
            (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(cfg), indent=2) + "\n")


def _check_finite(loss_sum: torch.Tensor, d: Dist, epoch: int, step: int, out: Path) -> None:
    finite = torch.isfinite(loss_sum).to(torch.int64)
    if d.enabled:
        # Every rank must stop together, or the others would wait forever in the next all-reduce.
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    if not finite:
        kept = f"the last good checkpoint is {out / 'last.pt'}" if (out / "last.pt").exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"the loss became {float(loss_sum)} in epoch {epoch + 1} by step {step}; stopped ({kept}); "
                               "lower --lr, add --clip-grad 1.0, or use --amp none")


def _merge_stats(stats: dict[str, Any], loss_sum: torch.Tensor, correct: torch.Tensor, seen: int, seconds: float, d: Dist) -> dict[str, Any]:
    """This epoch's totals over all ranks, added to those of the part before a resume."""
    local = torch.stack([loss_sum.double(), correct.double(), torch.tensor(float(seen), dtype=torch.float64, device=loss_sum.device)])
    if d.enabled:
        dist.all_reduce(local)
    loss, right, count = local.tolist()
    return {"loss_sum": stats["loss_sum"] + loss, "correct": stats["correct"] + round(right),
            "seen": stats["seen"] + round(count), "seconds": stats["seconds"] + seconds}


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in getattr(model, "_orig_mod", model).state_dict().items()}


def _state(raw, ema, optimizer, scheduler, scaler, cfg, epoch, step, epoch_step, best_top1, history, stats) -> dict[str, Any]:
    """A full training checkpoint of plain containers and tensors (``weights_only=True`` loads it).

    ``model`` (torchcvt names) and ``config`` (the CvTConfig dict) make it a checkpoint that
    ``load_model``, ``cvt eval`` and ``cvt predict`` read directly."""
    return {
        "model": _cpu_state(raw),
        "config": raw.config.to_dict(),
        "train_config": dataclasses.asdict(cfg),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": _cpu_state(ema.module) if ema is not None else None,
        "epoch": epoch,  # epochs completed
        "step": step,  # optimizer steps completed
        "epoch_step": epoch_step,  # optimizer steps completed in the current epoch
        "best_top1": best_top1,
        "history": history,
        "epoch_stats": stats,
        "rng": rng_state(),  # rank 0's; every stream is re-derived from the seed anyway
    }


def _save_final(model: nn.Module, out: Path, cfg: TrainConfig, splits: DataSplits) -> None:
    if cfg.data == "digits":
        # The digits tensors are the images at the model's size: a plain resize reproduces them.
        pre = PreprocessConfig(image_size=cfg.image_size, crop_pct=None, mean=splits.mean, std=splits.std)
    else:
        pre = dataclasses.replace(PreprocessConfig.for_resolution(cfg.image_size), mean=splits.mean, std=splits.std)
    save_pretrained(model, out, preprocess=pre)


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("what to train")
    g.add_argument("--data", default=None, help="'digits' (default, embedded), an image folder (one sub-folder per class, "
                   "optionally train/ and val/), an Oxford-IIIT Pet folder or a path,label .csv")
    g.add_argument("--model", default=None, help="preset (default: cvt-tiny for digits, cvt-13 otherwise; with --weights: "
                   "the checkpoint's architecture)")
    g.add_argument("--weights", default=None, help="start from these weights (folder, file or hub id); a new head when the "
                   "class count differs; selects --recipe finetune")
    g.add_argument("--recipe", default=None, choices=list(RECIPES), help="defaults for the options below (default: digits for "
                   "--data digits, finetune with --weights, else paper)")
    g.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    g.add_argument("--output", default=None, help="run folder (default: runs/<data name>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt (its saved options apply)")
    g = parser.add_argument_group("schedule and optimizer (default: the recipe's)")
    g.add_argument("--epochs", type=int, default=None)
    g.add_argument("--batch-size", type=int, default=None, help="global batch: over all processes and accumulation steps")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the recipe's rate per 256 images x batch / 256)")
    g.add_argument("--warmup-epochs", type=float, default=None)
    g.add_argument("--warmup-lr", type=float, default=None)
    g.add_argument("--min-lr", type=float, default=None)
    g.add_argument("--weight-decay", type=float, default=None, help="default: 0.05; 0.1 for cvt-21 and cvt-w24 from scratch")
    g.add_argument("--accum-steps", type=int, default=None, help="gradient accumulation steps per optimizer step (default: 1)")
    g.add_argument("--clip-grad", type=float, default=None, help="max gradient norm (default: no clipping)")
    g.add_argument("--ema-decay", type=float, default=None, help="keep an EMA of the weights, e.g. 0.9998 (default: off)")
    g = parser.add_argument_group("regularisation and augmentation (default: the recipe's)")
    g.add_argument("--label-smoothing", type=float, default=None)
    g.add_argument("--mixup", type=float, default=None, help="mixup alpha (0: off)")
    g.add_argument("--cutmix", type=float, default=None, help="cutmix alpha (0: off)")
    g.add_argument("--randaugment", default=None, help="timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1, or none")
    g.add_argument("--random-erasing", type=float, default=None, help="random-erasing probability")
    g.add_argument("--hflip", type=float, default=None, help="horizontal-flip probability")
    g.add_argument("--crop-scale", type=float, default=None, help="smallest area fraction of the random-resized crop")
    g.add_argument("--drop-path", default=None, help="per-stage drop-path rates, e.g. 0,0,0.1 (default: the model's)")
    g = parser.add_argument_group("execution")
    g.add_argument("--amp", default=None, choices=("none", "bf16", "fp16"), help="mixed precision (fp16: CUDA, with a grad scaler)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--seed", type=int, default=None, help="training seed (default: 0)")
    g.add_argument("--deterministic", action="store_true", help="deterministic algorithms (bit-identical resume on the CPU)")
    g.add_argument("--threads", type=int, default=None, help="torch CPU threads per process")
    g.add_argument("--workers", type=int, default=None, help="DataLoader workers per process (default: 0 for digits, else min(8, CPUs - 1))")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available; torchrun: cuda:LOCAL_RANK)")
    g.add_argument("--checkpoint-every-steps", type=int, default=None, help="also write last.pt every N steps (default: once an epoch)")
    g.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (the schedule still spans --epochs)")
    g.add_argument("--val-fraction", type=float, default=None, help="held-out fraction of a folder without val/ (default: 0.1)")
    g.add_argument("--split-seed", type=int, default=None, help="seed of that hold-out (default: 0)")
    g.add_argument("--skip-bad-images", action="store_true", help="skip unreadable images (counted) instead of stopping")


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    if int(os.environ.get("RANK", 0)) != 0:
        logging.getLogger("torchcvt").setLevel(logging.ERROR)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "resume")}
    if args.resume:
        output = args.output or default_output(args.data or "digits")
        # --output (or --data, whose name makes the default folder) only says where the run is.
        ignored = [k for k, v in options.items() if k not in ("output", "data") and v not in (None, False)]
        if ignored:
            logger.warning("--resume continues with the saved options; ignoring %s", ", ".join("--" + k.replace("_", "-") for k in ignored))
        cfg = TrainConfig.from_dict(load_checkpoint(Path(output) / "last.pt")["train_config"])
        cfg.output = output
    else:
        cfg = resolve_config(**options)
    try:
        train(cfg, resume=args.resume)
    except TorchCvTError as exc:
        raise type(exc)(_one_line(exc)) from None
    return 0


def _one_line(exc: TorchCvTError) -> str:
    """The message of ``exc``. A DataLoader worker's error comes back with the worker's traceback in
    its message; its last line, ``torchcvt.errors.ImageError: <message>``, holds the cause."""
    text = str(exc).strip()
    if "Traceback" not in text:
        return text
    return text.splitlines()[-1].split(": ", 1)[-1]
