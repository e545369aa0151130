"""Training and fine-tuning (``cvt train``): the CvT paper's recipe in one loop, from one CPU to many GPUs.

    cvt train                                              # the embedded digits demo, ~25 s on 2 cores
    cvt train --data ./pets --weights cvt-13               # fine-tune: new head, the fine-tuning preset
    cvt train --data ./imagenet --model cvt-13 --batch-size 2048 --amp bf16   # the paper's recipe
    torchrun --nproc_per_node 8 -m torchcvt train ...      # the same command on 8 GPUs (DDP)

The options and recipes are ``train_config`` (``TrainConfig``, ``RECIPES``, ``resolve_config``, re-exported
here); this module builds the data and the model and holds the loop. Around it: ``reproducibility``
(where every random draw comes from, so that a resumed run ends bit-identical), ``distributed``
(torchrun's process group, BatchNorm over the global batch), ``optimization`` (AdamW groups, the
schedule), ``train_state`` (checkpoints, EMA, metrics), ``runs`` (the run folder: its lock, what a
new run may replace, a full disk) and ``run_control`` (when to checkpoint and stop: steps, minutes,
SIGINT/SIGTERM).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from . import augment
from .allocator import retain_freed_memory
from .checkpoint import save_pretrained
from .datasets import DataSplits, build_datasets
from .distributed import Dist, convert_batchnorm, setup_device
from .errors import ConfigError, DataError, TorchCvTError
from .evaluate import evaluate
from .model import CvT
from .modelcard import write_model_card
from .optimization import build_optimizer, follow_schedule, freeze_backbone, set_train_mode
from .options import add_options, flag
from .pretrained import create_model
from .reproducibility import (
    STEP, SeededSamples, class_balanced_weights, epoch_batches, seed_everything, stream_seed, use_deterministic_algorithms,
)
from .run_control import RunControl, TrainingStopped, early_stop, ignore_stop_signals
from .runs import RunFolder, disk_full_is_one_line
from .tensorboard_log import TensorBoardLog
from .train_config import DATA, RECIPES, TrainConfig, default_output, help_default, recipe_line, resolve_config
from .train_state import (
    EMA, EpochMeter, Progress, best_checkpoint, card_facts, check_resumable, describe_run, epoch_line, kernels_note, load_checkpoint,
    restore, run_summary, save_checkpoint, training_checkpoint, write_metrics, write_train_config,
)
from .transforms import PreprocessConfig

logger = logging.getLogger("torchcvt")

__all__ = ["RECIPES", "TrainConfig", "resolve_config", "build_data", "build_model", "train", "TrainingDiverged",
           "TrainingStopped", "add_arguments", "run"]

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
    if cfg.freeze_backbone:
        freeze_backbone(model)
    return model


class TrainingDiverged(TorchCvTError):
    """The loss became NaN or infinite."""


# ------------------------------------------------------------------------------------------ train
def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Run (``overwrite``: over the run in ``cfg.output``, deleting it) or continue (``resume``) training;
    returns the last metrics row. SIGINT/SIGTERM: a resumable last.pt after this step, then ``TrainingStopped``."""
    cfg.validate()
    d, device = setup_device(cfg.device)
    log = print if d.main else (lambda *a, **k: None)
    out = Path(cfg.output)
    folder = RunFolder(out, resume=resume, overwrite=overwrite, make_parents=cfg.output == default_output(cfg.data))
    d.on_main(folder.check)  # refuse a bad --output at once, before reading the data
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        use_deterministic_algorithms()
    seed_everything(stream_seed(STEP, cfg.seed, -1))  # the same initial weights (and new head) on every rank

    # ---- data and model
    splits = build_data(cfg)
    n_train = _check_batch_size(cfg, len(splits.train), d)
    with d.on_main(folder.claim) or nullcontext():  # rank 0 holds the folder's lock until the run ends; only rank 0 writes
        state = load_checkpoint(out / "last.pt") if resume else None
        if state is not None:
            check_resumable(state, cfg, splits, out / "last.pt")
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
                                               total_steps=total_steps, device=device, layer_decay=cfg.layer_decay)
        scaler, amp_dtype, autocast = _precision(cfg, device)
        mixup, criterion = _mixup_and_loss(cfg, splits.num_classes)

        # ---- where we are
        p = restore(state, raw, ema, optimizer, scheduler, scaler) if state is not None else Progress()
        if state is not None:
            follow_schedule(scheduler)  # an extended run (more --epochs) follows the schedule of the new length
            log(f"resuming {out / 'last.pt'}: epoch {p.epoch + 1}, step {p.step}" + _extension(state, cfg) + kernels_note(state, device))
        if d.main:
            write_train_config(out, cfg)
        train_set, draw_weights, val_loader, loader_args = _data_loading(cfg, splits, d, device)
        log(describe_run(cfg, splits, raw, d.world_size, steps_per_epoch) + "\n" + recipe_line(cfg, n_train))

        last_step = min(total_steps, cfg.max_steps or total_steps)
        with RunControl(d, every_steps=cfg.checkpoint_every_steps, every_minutes=cfg.checkpoint_every_minutes) as control, \
                TensorBoardLog(out, enabled=cfg.tensorboard and d.main, resume_step=p.step if state else None) as board:
            # An epoch stopped after its last step (epoch_step > 0) still has its validation to do.
            while p.epoch < cfg.epochs and (p.step < last_step or p.epoch_step > 0) and not early_stop(p.history, cfg.early_stop):
                # ---- one epoch (or what is left of it, up to --max-steps)
                batches = epoch_batches(n_train, cfg.batch_size, seed=cfg.seed, epoch=p.epoch, rank=d.rank,
                                        world_size=d.world_size, accum_steps=cfg.accum_steps, start_step=p.epoch_step,
                                        sample_weights=draw_weights)
                loader = DataLoader(train_set, batch_sampler=batches[:(last_step - p.step) * cfg.accum_steps], **loader_args)
                set_train_mode(model, frozen_backbone=cfg.freeze_backbone)
                bar = tqdm(total=steps_per_epoch, initial=p.epoch_step, desc=f"epoch {p.epoch + 1}/{cfg.epochs}", unit="step",
                           disable=None if d.main else True, leave=False, dynamic_ncols=True)
                meter = EpochMeter(device)
                for micro, (x, y) in enumerate(loader):
                    x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                    # Mixup and drop path draw from streams of (seed, step, rank): resumable, not worker-bound.
                    seed_everything(stream_seed(STEP, cfg.seed, p.step, d.rank), cuda=device.type == "cuda")
                    inputs, target = mixup(x, y) if mixup is not None else (x, y)
                    board.images(inputs, splits.mean, splits.std, p.step)  # once
                    sync = (micro + 1) % cfg.accum_steps == 0  # the last micro-batch of an optimizer step
                    with model.no_sync() if d.enabled and not sync else nullcontext():
                        with autocast:
                            logits = model(inputs)
                            loss = criterion(logits.float(), target)
                        scaler.scale(loss / cfg.accum_steps).backward()
                    meter.add(loss, logits, y)
                    if not sync:
                        continue
                    _optimizer_step(cfg, raw, optimizer, scheduler, scaler, ema)
                    p.step, p.epoch_step = p.step + 1, p.epoch_step + 1
                    bar.update()
                    now = control.after_step(p.step)  # every rank: checkpoint now? stop (a signal) after this step?
                    if p.step % 10 == 0 or now.checkpoint:
                        # Host sync only here: the loss check and the progress bar every 10 steps.
                        _check_finite(meter.loss_sum, d, p, out)
                        bar.set_postfix(loss=f"{meter.mean_loss():.4f}", lr=f"{max(scheduler.get_last_lr()):.2e}")
                    if now.stop or (now.checkpoint and p.epoch_step < steps_per_epoch):
                        so_far = meter.totals(p.epoch_stats, d)
                        if d.main:
                            save_checkpoint(out / "last.pt", training_checkpoint(raw, ema, optimizer, scheduler, scaler, cfg, p, so_far))
                        control.saved()
                    if now.stop:
                        break
                bar.close()
                if control.stopped:
                    break
                _check_finite(meter.loss_sum, d, p, out)
                stats = meter.totals(p.epoch_stats, d)

                # ---- end of the epoch: validate, checkpoint, metrics
                evaluated = ema.module if ema is not None else net
                val = evaluate(evaluated, val_loader, num_classes=splits.num_classes, device=device, amp_dtype=amp_dtype,
                               distributed=d.enabled, progress=d.main)
                row = p.end_epoch(stats, val, lr=max(scheduler.get_last_lr()))  # the head's: --lr (layer decay scales the rest down)
                board.epoch(row)
                if d.main:
                    _save_epoch(out, p, row, evaluated, cfg, lambda: training_checkpoint(raw, ema, optimizer, scheduler, scaler, cfg, p))
                control.saved()
                log(epoch_line(row, cfg.epochs, val.k))
                if control.poll_stop():  # a signal during validation: stop at the epoch's checkpoint
                    break
            board.hparams(cfg, p.history, finished=not control.stopped)

        if control.stopped:
            d.close()
            raise control.stopped_error(p, steps_per_epoch, out / "last.pt")
        # ---- the final model, in transformers' layout, with its evaluation preprocessing
        if d.main and p.history:
            log(_save_final(ema.module if ema is not None else raw, out, cfg, splits, p))
    d.close()
    return p.history[-1] if p.history else {}


def _precision(cfg: TrainConfig, device: torch.device) -> tuple[torch.amp.GradScaler, torch.dtype | None, torch.autocast]:
    """The gradient scaler (fp16 only), the autocast dtype (None: full precision) and the autocast context."""
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    amp_dtype = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.amp]
    return scaler, amp_dtype, torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None)


def _mixup_and_loss(cfg: TrainConfig, num_classes: int) -> tuple[augment.Mixup | None, nn.CrossEntropyLoss]:
    mixup = augment.Mixup(cfg.mixup, cfg.cutmix, label_smoothing=cfg.label_smoothing,
                          num_classes=num_classes) if cfg.mixup > 0 or cfg.cutmix > 0 else None
    # Mixup's soft targets carry the label smoothing already: cross-entropy against them, unsmoothed.
    return mixup, nn.CrossEntropyLoss(label_smoothing=0.0 if mixup is not None else cfg.label_smoothing)


def _optimizer_step(cfg: TrainConfig, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    scaler: torch.amp.GradScaler, ema: EMA | None) -> None:
    """After the last micro-batch's backward: clip, step (through the fp16 scaler), the LR schedule, the EMA."""
    if cfg.clip_grad > 0:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    if ema is not None:
        ema.update(model)


def _save_epoch(out: Path, p: Progress, row: dict[str, Any], evaluated: nn.Module, cfg: TrainConfig,
                last: Callable[[], dict[str, Any]]) -> None:
    """The files of an epoch's end: best.pt when validation improved, last.pt (``last()``), the metrics."""
    if row["val_top1"] > p.best_top1:
        # best.pt before last.pt: a kill in between redoes this epoch and rewrites it the same.
        p.best_top1 = row["val_top1"]
        save_checkpoint(out / "best.pt", best_checkpoint(evaluated, cfg, p.epoch, row))
    save_checkpoint(out / "last.pt", last())
    write_metrics(p.history, out)


def _extension(state: dict[str, Any], cfg: TrainConfig) -> str:
    before = state["train_config"]["epochs"]
    return "" if before == cfg.epochs else f"; the schedule is recomputed for {cfg.epochs} epochs (was {before})"


def _check_batch_size(cfg: TrainConfig, n_train: int, d: Dist) -> int:
    """``n_train``, when it holds a global batch that splits evenly over processes and accumulation steps."""
    if cfg.batch_size > n_train:
        raise DataError(f"--batch-size {cfg.batch_size} is larger than the training set ({n_train} images in {cfg.data}); lower it")
    if cfg.batch_size % (d.world_size * cfg.accum_steps):
        raise ConfigError(f"--batch-size {cfg.batch_size} must be divisible by processes x --accum-steps "
                          f"({d.world_size} x {cfg.accum_steps})")
    return n_train


def _data_loading(cfg: TrainConfig, splits: DataSplits, d: Dist, device: torch.device
                  ) -> tuple[SeededSamples, torch.Tensor | None, DataLoader, dict[str, Any]]:
    """The training set keyed by ``(epoch, index)``, its drawing weights (``--balance-classes``; None:
    a permutation per epoch), this rank's validation loader and the DataLoader options of both."""
    val_set = splits.val if not d.enabled else Subset(splits.val, range(d.rank, len(splits.val), d.world_size))
    loader_args = dict(num_workers=_workers(cfg, d), pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    val_loader = DataLoader(val_set, batch_size=max(1, cfg.batch_size // d.world_size), **loader_args)
    draw_weights = class_balanced_weights(splits.train.targets) if cfg.balance_classes else None
    return SeededSamples(splits.train, cfg.seed), draw_weights, val_loader, loader_args


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


def _save_final(model: nn.Module, out: Path, cfg: TrainConfig, splits: DataSplits, p: Progress) -> str:
    """model.safetensors with its config and evaluation preprocessing, and the model card with the run's
    metrics; returns the run's last log lines (an early stop, where the files are)."""
    if cfg.data == "digits":
        # The digits tensors are the images at the model's size: a plain resize reproduces them.
        pre = PreprocessConfig(image_size=cfg.image_size, crop_pct=None, mean=splits.mean, std=splits.std)
    else:
        pre = dataclasses.replace(PreprocessConfig.for_resolution(cfg.image_size), mean=splits.mean, std=splits.std)
    with disk_full_is_one_line(out / "model.safetensors", out / "last.pt"):
        save_pretrained(model, out, preprocess=pre, model_card=False)
        pretrained_cfg = getattr(model, "pretrained_cfg", None) or {}
        write_model_card(out, model.config, pretrained_cfg=pretrained_cfg, **card_facts(cfg, splits, p.history),
                         base_model=pretrained_cfg.get("hub_id") if cfg.weights else None,
                         num_params=sum(t.numel() for t in model.parameters()))
    stopped_early = early_stop(p.history, cfg.early_stop) if p.epoch < cfg.epochs else None
    return (stopped_early + "\n" if stopped_early else "") + run_summary(p.history, out)


# ------------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    groups = add_options(parser, TrainConfig, help_default)
    groups[DATA].add_argument("--resume", action="store_true", help="continue the run in --output from its last.pt "
                              f"(its saved options apply; {', '.join(map(flag, RESUME_CHANGES))} may change)")
    groups[DATA].add_argument("--overwrite", action="store_true", help="start a new run in an --output that holds one, "
                              "deleting that run's files (without it such a folder is refused)")


# What --resume may change: how long the run goes on (the schedule follows a new --epochs), how
# often it saves, how it loads data. Anything else would make it another run.
RESUME_CHANGES = ("epochs", "max_steps", "early_stop", "checkpoint_every_steps", "checkpoint_every_minutes", "workers",
                  "tensorboard")


def resume_config(output: str, given: dict[str, Any]) -> TrainConfig:
    """The options saved in ``output``/last.pt, with the ``RESUME_CHANGES`` among ``given`` applied."""
    if int(os.environ.get("RANK", 0)) == 0:
        RunFolder(Path(output), resume=True).check()
    cfg = TrainConfig.from_dict(load_checkpoint(Path(output) / "last.pt")["train_config"])
    # --output (or --data, whose name makes the default folder) only says where the run is.
    ignored = [k for k, v in given.items() if k not in ("output", "data", *RESUME_CHANGES) and v not in (None, False)]
    if ignored:
        logger.warning("--resume continues with the saved options; ignoring %s", ", ".join(flag(k) for k in ignored))
    # A flag not given is False: it leaves the saved value (``--early-stop 0`` is given, and turns it off).
    changes = {k: given[k] for k in RESUME_CHANGES if given.get(k) is not None and given[k] is not False}
    cfg = dataclasses.replace(cfg, output=output, **changes)
    cfg.validate()
    return cfg


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(format="%(message)s", level=logging.INFO)
    main = int(os.environ.get("RANK", 0)) == 0
    if not main:
        logging.getLogger("torchcvt").setLevel(logging.ERROR)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "overwrite")}
    try:
        if args.resume:
            cfg = resume_config(args.output or default_output(args.data or "digits"), options)
        else:
            cfg = resolve_config(**options)
        retain_freed_memory()  # each step's activations without page faults (allocator.retain_freed_memory)
        train(cfg, resume=args.resume, overwrite=args.overwrite)
    except TrainingStopped as stop:
        if int(os.environ.get("WORLD_SIZE", 1)) > 1:
            # torchrun terminates the other ranks as soon as one exits: the checkpoint is written, so
            # let this rank exit 130/143 itself rather than die of that signal.
            ignore_stop_signals()
        if main:
            print(stop, file=sys.stderr)
        return stop.exit_code
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
