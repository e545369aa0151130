"""Training and fine-tuning (``cvt train``): the CvT paper's recipe in one loop, from one CPU to many GPUs.

    cvt train                                              # the embedded digits demo, ~25 s on 2 cores
    cvt train --data ./pets --weights cvt-13               # fine-tune: new head, the fine-tuning preset
    cvt train --data ./imagenet --model cvt-13 --batch-size 2048 --amp bf16   # the paper's recipe
    torchrun --nproc_per_node 8 -m torchcvt train ...      # the same command on 8 GPUs (DDP)

Recipes (``--recipe``; every value can be overridden by its option): ``paper`` from scratch, after
microsoft/CvT ``experiments/imagenet/cvt/*.yaml``; ``finetune`` (default with ``--weights``): the
checkpoint's weights with a new head when the class count differs, a short schedule and light
augmentation; ``digits`` (default for ``--data digits``, ``TrainConfig``'s defaults): ``cvt-tiny``
on the 8x8 scikit-learn digits. ``docs/training.md`` tabulates them.

This module holds the options (``TrainConfig``, whose fields also make the command line), the
recipes and the loop. Around it: ``reproducibility`` (where every random draw comes from, so that a
resumed run ends bit-identical), ``distributed`` (torchrun's process group, BatchNorm over the
global batch), ``optimization`` (AdamW groups, the schedule) and ``train_state`` (checkpoints, EMA,
metrics).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import augment
from .checkpoint import save_pretrained
from .datasets import DataSplits, build_datasets
from .distributed import Dist, convert_batchnorm, setup_device
from .errors import ConfigError, DataError, TorchCvTError
from .evaluate import evaluate
from .model import CvT
from .optimization import build_optimizer
from .options import add_options, check_options, default_help, flag, option, show
from .pretrained import create_model, preset_config, stated_image_size
from .reproducibility import STEP, SeededSamples, epoch_batches, seed_everything, stream_seed, use_deterministic_algorithms
from .train_state import (
    EMA, EpochMeter, Progress, best_checkpoint, describe_run, epoch_line, load_checkpoint, restore, run_summary, save_checkpoint,
    start_run_folder, training_checkpoint, write_metrics,
)
from .transforms import PreprocessConfig

logger = logging.getLogger("torchcvt")

# ------------------------------------------------------------------------------------------ config
# What a recipe changes; the rest comes from TrainConfig's defaults, which are the digits recipe.
# ``base_lr`` is the peak learning rate per 256 images: lr = base_lr x batch_size / 256 unless --lr.
RECIPES: dict[str, dict[str, Any]] = {
    "digits": dict(base_lr=1.2e-2),  # 3e-3 at the default batch of 64
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
}
# The official configs decay CvT-21 and CvT-W24 twice as hard as CvT-13.
_WEIGHT_DECAY_0_1 = ("cvt-21", "cvt-w24")

DATA, SCHEDULE, AUGMENT, EXECUTION = "what to train", "schedule and optimizer", "regularisation and augmentation", "execution"


@dataclass
class TrainConfig:
    """Every option of a run, resolved. Saved as ``train_config.json`` and in every checkpoint;
    ``--resume`` reads it back from ``last.pt``. The defaults are the digits recipe, what ``cvt train``
    runs without arguments; ``resolve_config`` fills in the other recipes. Each field is also the
    command-line option of the same name (``options.add_options``)."""

    data: str = option("digits", "'digits' (embedded), an image folder (one sub-folder per class, optionally "
                       "train/ and val/), an Oxford-IIIT Pet folder or a path,label .csv", group=DATA)
    model: str | None = option("cvt-tiny", "a preset (`cvt models`)", group=DATA,
                               default_help="cvt-tiny for digits, cvt-13 otherwise; with --weights the checkpoint's layout")
    weights: str | None = option(None, "start from these weights (folder, file or hub id); a new head when the class count "
                                 "differs; selects --recipe finetune", group=DATA, none="random weights")
    recipe: str = option("digits", "the defaults of the options marked \"the recipe's\"", group=DATA, choices=tuple(RECIPES),
                         default_help="digits for --data digits, finetune with --weights, else paper")
    output: str = option("runs/digits", "run folder", group=DATA, default_help="runs/<data name>")
    image_size: int = option(32, "input side", group=DATA, check="> 0", default_help="the model's")
    epochs: int = option(15, "epochs; the cosine schedule spans them", group=SCHEDULE, check="> 0")
    batch_size: int = option(64, "global batch: over all processes and accumulation steps", group=SCHEDULE, check="> 0")
    lr: float | None = option(None, "peak learning rate", group=SCHEDULE, check="> 0")  # None: the recipe's base_lr, scaled
    warmup_lr: float = option(1e-5, "learning rate at the start of the linear warm-up", group=SCHEDULE, check=">= 0")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine", group=SCHEDULE, check=">= 0")
    warmup_epochs: float = option(1.0, "epochs of linear warm-up", group=SCHEDULE, check=">= 0")
    weight_decay: float | None = option(0.05, "AdamW weight decay (none on norms, biases and cls tokens)",
                                        group=SCHEDULE, check=">= 0", none="0.05 (0.1 for cvt-21 and cvt-w24)")
    label_smoothing: float = option(0.1, "label smoothing", group=AUGMENT, check="[0, 1)")
    mixup: float = option(0.0, "mixup alpha (0: off)", group=AUGMENT, check=">= 0")
    cutmix: float = option(0.0, "cutmix alpha (0: off)", group=AUGMENT, check=">= 0")
    randaugment: str | None = option(None, "timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1, or none", group=AUGMENT, none="off")
    random_erasing: float = option(0.0, "random-erasing probability", group=AUGMENT, check="probability")
    hflip: float = option(0.0, "horizontal-flip probability", group=AUGMENT, check="probability")
    crop_scale: float = option(1.0, "smallest area fraction of the random-resized crop", group=AUGMENT, check="(0, 1]")
    drop_path: tuple[float, ...] | None = option(None, "per-stage drop-path rates, e.g. 0,0,0.1", group=AUGMENT, none="the model's")
    accum_steps: int = option(1, "gradient accumulation: micro-batches per optimizer step", group=SCHEDULE, check="> 0")
    clip_grad: float = option(0.0, "max global gradient norm (0: no clipping)", group=SCHEDULE, check=">= 0")
    ema_decay: float = option(0.0, "keep an EMA of the weights, e.g. 0.9998; validation, best.pt and the final model "
                              "use it (0: off)", group=SCHEDULE, check="[0, 1)")
    amp: str = option("none", "mixed precision (fp16: CUDA, with a gradient scaler)", group=EXECUTION, choices=("none", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model", group=EXECUTION)
    seed: int = option(0, "training seed", group=EXECUTION)
    deterministic: bool = option(False, "deterministic algorithms (bit-identical resume on the CPU)", group=EXECUTION)
    # One thread for the digits: cvt-tiny's ops are so small that a second OpenMP thread gains little,
    # and on a shared, busy machine its barriers made steps up to 50x slower in our measurements.
    threads: int | None = option(1, "torch CPU threads per process", group=EXECUTION, check=">= 1", none="torch's")
    workers: int | None = option(None, "DataLoader workers per process", group=EXECUTION, check=">= 0",
                                 default_help="0 for digits, else min(8, CPUs per process - 1)")
    device: str | None = option(None, "cpu or cuda", group=EXECUTION, default_help="cuda when available; torchrun: cuda:LOCAL_RANK")
    checkpoint_every_steps: int = option(0, "also write last.pt every N steps (0: once an epoch)", group=EXECUTION, check=">= 0")
    max_steps: int | None = option(None, "stop after N optimizer steps (the schedule still spans --epochs)",
                                   group=EXECUTION, check=">= 1", none="no limit")
    val_fraction: float = option(0.1, "held-out fraction of a folder without val/", group=EXECUTION)
    split_seed: int = option(0, "seed of that hold-out (apart from --seed: runs compare on the same images)", group=EXECUTION)
    skip_bad_images: bool = option(False, "skip unreadable images (counted) instead of stopping", group=EXECUTION)

    def __post_init__(self) -> None:
        """The defaults that follow from other fields, and the command line's spellings."""
        if self.lr is None and self.recipe in RECIPES:  # linear scaling with the global batch
            self.lr = RECIPES[self.recipe]["base_lr"] * self.batch_size / 256
        if self.weight_decay is None:
            self.weight_decay = 0.1 if self.model and self.model.lower().startswith(_WEIGHT_DECAY_0_1) else 0.05
        if self.randaugment in ("none", ""):
            self.randaugment = None
        if isinstance(self.drop_path, str):
            try:
                self.drop_path = tuple(float(v) for v in self.drop_path.split(","))
            except ValueError:
                raise ConfigError(f"--drop-path must be comma-separated per-stage rates such as 0,0,0.1, "
                                  f"got {self.drop_path!r}") from None
        elif self.drop_path is not None:
            self.drop_path = tuple(self.drop_path)  # a list, from JSON

    def validate(self) -> None:
        """One-line ConfigErrors naming the option: the declared ranges and choices, and CUDA when needed."""
        check_options(self)
        if self.device not in (None, "cpu") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available; use --device cpu")
        if self.amp == "fp16" and (self.device == "cpu" or not torch.cuda.is_available()):
            raise ConfigError("--amp fp16 needs CUDA (it uses a gradient scaler); use --amp bf16 on the CPU")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


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
    data, weights = given.get("data", "digits"), given.get("weights")
    recipe = given.get("recipe") or ("digits" if data == "digits" else "finetune" if weights else "paper")
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    # No --model: the checkpoint's architecture with --weights, else the default (cvt-tiny) for the digits, else cvt-13.
    model = given.get("model") or (None if weights else TrainConfig.model if data == "digits" else "cvt-13")
    values = {k: v for k, v in RECIPES[recipe].items() if k in known}
    values.update(data=data, recipe=recipe, output=default_output(data))
    values.update(given)
    values["model"] = model
    if "image_size" not in given:
        values["image_size"] = _model_image_size(model, weights)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def _model_image_size(model: str | None, weights: str | None) -> int:
    """The resolution a registry name or a checkpoint was made for (none stated: 224, CvT-13's)."""
    if model is not None:
        return preset_config(model).image_size
    return stated_image_size(weights) or preset_config("cvt-13").image_size


def default_output(data: str) -> str:
    return str(Path("runs") / ("digits" if data == "digits" else Path(data.rstrip("/\\")).stem or "data"))


# ------------------------------------------------------------------------------------ data, model
def build_data(cfg: TrainConfig) -> DataSplits:
    """Datasets with the recipe's augmentation; the per-image transforms run in DataLoader workers."""
    if cfg.data == "digits":
        # In-memory tensors with datasets' own augmentation (small rotations, shifts and zooms).
        image_options = ("randaugment", "random_erasing", "hflip", "crop_scale")
        ignored = [flag(name) for name in image_options if getattr(cfg, name) != getattr(TrainConfig, name)]
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


class TrainingDiverged(TorchCvTError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, *, resume: bool = False) -> dict[str, Any]:
    """Run (or continue) training as ``cfg`` says; returns the last row of the metrics history."""
    cfg.validate()
    d, device = setup_device(cfg.device)
    log = print if d.main else (lambda *a, **k: None)
    out = Path(cfg.output)
    state = load_checkpoint(out / "last.pt") if resume else None
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        use_deterministic_algorithms()
    seed_everything(stream_seed(STEP, cfg.seed, -1))  # the same initial weights (and new head) on every rank

    # ---- data and model
    splits = build_data(cfg)
    n_train = _check_batch_size(cfg, len(splits.train), d)
    raw = build_model(cfg, splits.num_classes, splits.id2label).to(device)
    ema = EMA(raw, cfg.ema_decay) if cfg.ema_decay > 0 else None
    if d.enabled:
        raw = convert_batchnorm(raw, device)
    net = torch.compile(raw) if cfg.compile else raw
    model = nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.type == "cuda" else None) if d.enabled else net

    # ---- optimisation
    steps_per_epoch = n_train // cfg.batch_size
    total_steps = cfg.epochs * steps_per_epoch
    optimizer, scheduler = build_optimizer(raw, lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_lr=cfg.warmup_lr,
                                           min_lr=cfg.min_lr, warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
                                           total_steps=total_steps, device=device)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    autocast = torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)
    mixup = augment.Mixup(cfg.mixup, cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=splits.num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None
    # Mixup's soft targets carry the label smoothing already: cross-entropy against them, unsmoothed.
    criterion = nn.CrossEntropyLoss(label_smoothing=0.0 if mixup is not None else cfg.label_smoothing)

    # ---- where we are
    p = restore(state, raw, ema, optimizer, scheduler, scaler) if state is not None else Progress()
    if state is not None:
        log(f"resuming {out / 'last.pt'}: epoch {p.epoch + 1}, step {p.step}")
    elif d.main:
        start_run_folder(out, cfg)
    val_set = splits.val if not d.enabled else Subset(splits.val, range(d.rank, len(splits.val), d.world_size))
    loader_args = dict(num_workers=_workers(cfg, d), pin_memory=device.type == "cuda")
    val_loader = DataLoader(val_set, batch_size=max(1, cfg.batch_size // d.world_size), **loader_args)
    train_set = SeededSamples(splits.train, cfg.seed)
    log(describe_run(cfg, splits, raw, d.world_size, steps_per_epoch))

    last_step = min(total_steps, cfg.max_steps or total_steps)
    while p.epoch < cfg.epochs and p.step < last_step:
        # ---- one epoch (or what is left of it)
        batches = epoch_batches(n_train, cfg.batch_size, seed=cfg.seed, epoch=p.epoch, rank=d.rank,
                                world_size=d.world_size, accum_steps=cfg.accum_steps, start_step=p.epoch_step)
        loader = DataLoader(train_set, batch_sampler=batches, **loader_args)
        model.train()
        bar = tqdm(total=steps_per_epoch, initial=p.epoch_step, desc=f"epoch {p.epoch + 1}/{cfg.epochs}", unit="step",
                   disable=None if d.main else True, leave=False, dynamic_ncols=True)
        meter = EpochMeter(device)
        for micro, (x, y) in enumerate(loader):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            # Mixup and drop path draw from streams of (seed, step, rank): resumable, not worker-bound.
            seed_everything(stream_seed(STEP, cfg.seed, p.step, d.rank))
            inputs, target = mixup(x, y) if mixup is not None else (x, y)
            sync = (micro + 1) % cfg.accum_steps == 0  # the last micro-batch of an optimizer step
            with model.no_sync() if d.enabled and not sync else nullcontext():
                with autocast:
                    logits = model(inputs)
                    loss = criterion(logits.float(), target)
                scaler.scale(loss / cfg.accum_steps).backward()
            meter.add(loss, logits, y)
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
            p.step, p.epoch_step = p.step + 1, p.epoch_step + 1
            bar.update()
            checkpoint_now = cfg.checkpoint_every_steps and p.step % cfg.checkpoint_every_steps == 0
            if p.step % 10 == 0 or checkpoint_now:
                # Host sync only here: the loss check and the progress bar every 10 steps.
                _check_finite(meter.loss_sum, d, p, out)
                bar.set_postfix(loss=f"{meter.mean_loss():.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
            if checkpoint_now and p.epoch_step < steps_per_epoch:
                so_far = meter.totals(p.epoch_stats, d)
                if d.main:
                    save_checkpoint(out / "last.pt", training_checkpoint(raw, ema, optimizer, scheduler, scaler, cfg, p, so_far))
            if p.step >= last_step:
                break
        bar.close()
        _check_finite(meter.loss_sum, d, p, out)
        stats = meter.totals(p.epoch_stats, d)

        # ---- end of the epoch: validate, checkpoint, metrics
        evaluated = ema.module if ema is not None else net
        val = evaluate(evaluated, val_loader, num_classes=splits.num_classes, device=device, amp_dtype=amp_dtype,
                       distributed=d.enabled)
        row = p.end_epoch(stats, val, lr=scheduler.get_last_lr()[0])
        if d.main:
            if val.top1 > p.best_top1:
                # best.pt before last.pt: a kill in between redoes this epoch and rewrites it the same.
                p.best_top1 = val.top1
                save_checkpoint(out / "best.pt", best_checkpoint(evaluated, cfg, p.epoch, row))
            save_checkpoint(out / "last.pt", training_checkpoint(raw, ema, optimizer, scheduler, scaler, cfg, p))
            write_metrics(p.history, out)
        log(epoch_line(row, cfg.epochs, val.k))

    # ---- the final model, in transformers' layout, with its evaluation preprocessing
    if d.main and p.history:
        _save_final(ema.module if ema is not None else raw, out, cfg, splits)
        log(run_summary(p.history, out))
    d.close()
    return p.history[-1] if p.history else {}


def _check_batch_size(cfg: TrainConfig, n_train: int, d: Dist) -> int:
    """``n_train``, when it holds a global batch that splits evenly over processes and accumulation steps."""
    if cfg.batch_size > n_train:
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the training set ({n_train} images in {cfg.data}); lower it")
    if cfg.batch_size % (d.world_size * cfg.accum_steps):
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by processes x --accum-steps "
                          f"({d.world_size} x {cfg.accum_steps})")
    return n_train


def _workers(cfg: TrainConfig, d: Dist) -> int:
    """DataLoader workers per process: none for the in-memory digits, else up to 8 of this process's CPUs."""
    if cfg.workers is not None:
        return cfg.workers
    return 0 if cfg.data == "digits" else min(8, max(0, (os.cpu_count() or 1) // d.local_world_size - 1))


def _check_finite(loss_sum: torch.Tensor, d: Dist, p: Progress, out: Path) -> None:
    # Every rank must stop together, or the others would wait forever in the next all-reduce.
    if not d.all_reduce(torch.isfinite(loss_sum).to(torch.int64), op=torch.distributed.ReduceOp.MIN):
        kept = f"the last good checkpoint is {out / 'last.pt'}" if (out / "last.pt").exists() else "no checkpoint was written yet"
        raise TrainingDiverged(f"the loss became {float(loss_sum)} in epoch {p.epoch + 1} by step {p.step}; stopped ({kept}); "
                               "lower --lr, add --clip-grad 1.0, or use --amp none")


def _save_final(model: nn.Module, out: Path, cfg: TrainConfig, splits: DataSplits) -> None:
    if cfg.data == "digits":
        # The digits tensors are the images at the model's size: a plain resize reproduces them.
        pre = PreprocessConfig(image_size=cfg.image_size, crop_pct=None, mean=splits.mean, std=splits.std)
    else:
        pre = dataclasses.replace(PreprocessConfig.for_resolution(cfg.image_size), mean=splits.mean, std=splits.std)
    save_pretrained(model, out, preprocess=pre)


# ------------------------------------------------------------------------------------------- CLI
def _help_default(f: dataclasses.Field) -> str | None:
    """An option's default for ``--help``: each recipe's value where the recipes set it."""
    key = "base_lr" if f.name == "lr" else f.name
    if not any(key in values for values in RECIPES.values()):
        return default_help(f)
    per_recipe = ", ".join(f"{name}: {show(values.get(key, f.default), f)}" for name, values in RECIPES.items())
    return f"the recipe's rate per 256 images ({per_recipe}) x batch / 256" if f.name == "lr" else f"the recipe's ({per_recipe})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = add_options(parser, TrainConfig, _help_default)
    groups[DATA].add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt "
                              "(its saved options apply)")


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
            logger.warning("--resume continues with the saved options; ignoring %s", ", ".join(flag(k) for k in ignored))
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
