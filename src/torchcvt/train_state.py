"""What a training run keeps and writes: its progress, the EMA of its weights, checkpoints, metrics and log lines.

``last.pt`` is the full training state (``training_checkpoint``; ``restore`` puts it back):
the model (torchcvt names) and its config, the ``TrainConfig``, the optimizer, the LR scheduler,
the gradient scaler, the EMA weights, the counters and history of ``Progress``, and every RNG
state. ``best.pt`` holds the weights validated best. Both are plain containers and tensors that
``torch.load(weights_only=True)`` reads, and ordinary checkpoints for ``load_model``, ``cvt eval``
and ``cvt predict``. ``metrics.jsonl``/``.csv`` and the learning curves are rewritten from the
whole history every epoch; ``describe_run``, ``epoch_line`` and ``run_summary`` are what the run prints.
Every file is written atomically (checkpoints also synced to disk), and a full disk is one line that
says the previous checkpoint is intact. ``check_resumable`` refuses a resume whose data lost or gained
classes, naming them.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .datasets import DataSplits, describe
from .distributed import Dist
from .errors import CheckpointError, ConfigError, DataError
from . import mkl_amd
from .evaluate import EvalResult
from .fastpath import gemm_engine
from .fileio import atomic_save, atomic_write_text
from .plots import plot_learning_curves
from .reproducibility import rng_state, set_rng_state
from .runs import disk_full_is_one_line

logger = logging.getLogger("torchcvt")


def _no_stats() -> dict[str, Any]:
    return {"loss_sum": 0.0, "correct": 0, "seen": 0, "seconds": 0.0}


@dataclass
class Progress:
    """Where a run stands: what a checkpoint needs besides the weights and the optimizer."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    epoch_step: int = 0  # optimizer steps completed in the current epoch
    best_top1: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)  # one metrics row per epoch
    epoch_stats: dict[str, Any] = field(default_factory=_no_stats)  # this epoch before a resume, all ranks

    def end_epoch(self, stats: dict[str, Any], val: EvalResult, *, lr: float) -> dict[str, Any]:
        """Close the epoch with its totals over all ranks (``EpochMeter.totals``), its validation and
        the learning rate after it; returns its row of the metrics history."""
        row = {
            "epoch": self.epoch + 1, "step": self.step,
            "train_loss": stats["loss_sum"] / stats["seen"], "train_top1": stats["correct"] / stats["seen"],
            "val_loss": val.loss, "val_top1": val.top1, **({"val_top5": val.top5} if val.reports_top5 else {}),
            "lr": lr, "images_per_sec": stats["seen"] / max(stats["seconds"], 1e-9), "epoch_seconds": stats["seconds"],
        }
        self.history.append(row)
        self.epoch, self.epoch_step, self.epoch_stats = self.epoch + 1, 0, _no_stats()
        return row


class EpochMeter:
    """This rank's loss sum, correct predictions and images since the epoch (or the resume) began,
    kept on the device: reading them is a host sync, so the loop does it only now and then."""

    def __init__(self, device: torch.device) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """One batch: its mean ``loss``, and the ``logits`` scored against the (un-mixed) ``labels``."""
        self.loss_sum += loss.detach().double() * len(labels)
        self.correct += (logits.detach().argmax(dim=-1) == labels).sum()
        self.seen += len(labels)

    def mean_loss(self) -> float:
        return float(self.loss_sum) / max(1, self.seen)

    def totals(self, before: dict[str, Any], d: Dist) -> dict[str, Any]:
        """The epoch's totals over all ranks: these counts summed, added to ``before`` (the part of
        the epoch before a resume). A collective: every rank calls it."""
        device = self.loss_sum.device
        local = torch.stack([self.loss_sum, self.correct.double(), torch.tensor(float(self.seen), dtype=torch.float64, device=device)])
        loss, right, count = d.all_reduce(local).tolist()
        return {"loss_sum": before["loss_sum"] + loss, "correct": before["correct"] + round(right),
                "seen": before["seen"] + round(count), "seconds": before["seconds"] + time.perf_counter() - self.start}


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


def _unwrapped(model: nn.Module) -> nn.Module:
    return getattr(model, "_orig_mod", model)  # the model inside torch.compile's wrapper


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in _unwrapped(model).state_dict().items()}


def training_checkpoint(
    model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer, scheduler: Any, scaler: torch.amp.GradScaler,
    train_config: Any, progress: Progress, epoch_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The full training state as plain containers and tensors; ``epoch_stats`` replaces
    ``progress.epoch_stats`` mid-epoch. ``model`` and ``config`` make it a model checkpoint too."""
    return {
        "model": cpu_state(model),
        "config": _unwrapped(model).config.to_dict(),
        "train_config": dataclasses.asdict(train_config),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "ema": cpu_state(ema.module) if ema is not None else None,
        "epoch": progress.epoch,
        "step": progress.step,
        "epoch_step": progress.epoch_step,
        "best_top1": progress.best_top1,
        "history": progress.history,
        "epoch_stats": progress.epoch_stats if epoch_stats is None else epoch_stats,
        "rng": rng_state(),  # rank 0's; every stream is re-derived from the seed anyway
        "kernels": float_kernels(next(model.parameters()).device),
    }


def float_kernels(device: torch.device | str) -> dict[str, str]:
    """The kernels a run's float32 products on ``device`` run on: a resumed run is byte-identical to an
    uninterrupted one only on the same ones (torch version; on the CPU also the fast path's GEMM and
    MKL's dispatch, mkl_amd.py; neither is asked on a GPU, where the GEMM timing would be work for nothing)."""
    # str(): torch.__version__ is a TorchVersion, which torch.load(weights_only=True) refuses to unpickle
    kernels = {"torch": str(torch.__version__), "device": torch.device(device).type}
    if kernels["device"] == "cpu":
        kernels |= {"gemm": gemm_engine(), "mkl": "intel kernels" if mkl_amd.active() else "default dispatch"}
    return kernels


def kernels_note(state: dict[str, Any], device: torch.device | str) -> str:
    """``""``, or what differs from the kernels the checkpoint ``state`` was trained on, for the resume line."""
    before, now = state.get("kernels"), float_kernels(device)
    if not before or before == now:
        return ""
    changed = ", ".join(f"{k}: {before.get(k)} -> {v}" for k, v in now.items() if before.get(k) != v)
    return f"; float32 kernels differ from the checkpoint's ({changed}): not byte-identical to an uninterrupted run"


def best_checkpoint(model: nn.Module, train_config: Any, epoch: int, row: dict[str, Any]) -> dict[str, Any]:
    """The weights just validated, with their config, the run's options and the epoch's metrics."""
    return {"model": cpu_state(model), "config": _unwrapped(model).config.to_dict(),
            "train_config": dataclasses.asdict(train_config), "epoch": epoch, "metrics": row}


def restore(state: dict[str, Any], model: nn.Module, ema: EMA | None, optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: torch.amp.GradScaler) -> Progress:
    """Put a ``training_checkpoint`` back into these objects and the RNGs; returns its progress."""
    model.load_state_dict(state["model"])
    if ema is not None:
        ema.module.load_state_dict(state["ema"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"])
    return Progress(state["epoch"], state["step"], state["epoch_step"], state["best_top1"], state["history"],
                    state["epoch_stats"])


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``state`` to ``path`` atomically and synced to disk; on a full disk a one-line DiskFullError
    (the old file stays as it was)."""
    def write(tmp: str) -> None:
        # Through a Python file: a full disk then raises OSError(ENOSPC), where torch's own file
        # writer says "unexpected pos" or "iostream error".
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())

    with disk_full_is_one_line(path, path.parent / "last.pt"):
        atomic_save(write, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    """A training checkpoint, with one-line errors for a missing or unreadable file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint to resume from (start without --resume, or pass the run's --output)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise CheckpointError(f"{path}: cannot read the training checkpoint ({reason})") from None


def write_train_config(out: Path, train_config: Any) -> None:
    """``train_config.json``: every option of the run, resolved (rewritten when a resume extends it)."""
    with disk_full_is_one_line(out / "train_config.json", out / "last.pt"):
        atomic_write_text(out / "train_config.json", json.dumps(dataclasses.asdict(train_config), indent=2) + "\n")


def check_resumable(state: dict[str, Any], train_config: Any, splits: DataSplits, path: Path) -> None:
    """One-line errors for a resume of the checkpoint ``state`` (read from ``path``) that cannot continue
    it: data whose classes changed since the run started, or fewer ``epochs`` than it has completed."""
    before = {int(k): v for k, v in (state["config"].get("id2label") or {}).items()}
    if before and before != splits.id2label:
        old, new = set(before.values()), set(splits.id2label.values())
        changes = [f"{what} {_names(names)}" for what, names in (("new", new - old), ("missing", old - new)) if names]
        raise DataError(f"--resume: the classes of {train_config.data} differ from those the run in {path.parent} "
                        f"started with: {'; '.join(changes) or 'the same names in another order'} ({len(new)} classes "
                        f"now, {len(old)} then); resume with the original data, or fine-tune from it (--weights {path})")
    if train_config.epochs < state["epoch"]:
        raise ConfigError(f"--epochs {train_config.epochs}: the run in {path.parent} has already completed {state['epoch']} "
                          "epochs; give more to extend it")


def _names(names: set[str], shown: int = 10) -> str:
    ordered = sorted(names)
    return ", ".join(ordered[:shown]) + (f", ... ({len(ordered)} in all)" if len(ordered) > shown else "")


def describe_run(cfg: Any, splits: DataSplits, model: nn.Module, world_size: int, steps_per_epoch: int) -> str:
    """The first log lines of a run (``cfg``: its TrainConfig): data, model, optimizer, output."""
    params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    arch = cfg.model or f"the architecture of {cfg.weights}"
    per_process = cfg.batch_size // world_size // cfg.accum_steps
    extras = [name for name, on in (("EMA", cfg.ema_decay > 0), ("compile", cfg.compile), ("deterministic", cfg.deterministic),
                                    (f"amp {cfg.amp}", cfg.amp != "none"), (f"clip {cfg.clip_grad}", cfg.clip_grad > 0),
                                    ("frozen backbone (linear probe)", cfg.freeze_backbone),
                                    (f"layer decay {cfg.layer_decay}", cfg.layer_decay is not None),
                                    (f"early stop after {cfg.early_stop} epoch(s) without progress", cfg.early_stop > 0),
                                    ("class-balanced sampling", cfg.balance_classes)) if on]
    return "\n".join([
        f"data: {describe(splits)}",
        f"model: {arch}{' from ' + cfg.weights if cfg.weights and cfg.model else ''}, {params:,} parameters, "
        f"{cfg.image_size}x{cfg.image_size} input, recipe {cfg.recipe}",
        f"optimizer: AdamW lr {cfg.lr:.3g} (global batch {cfg.batch_size} = {world_size} process(es) x {per_process} "
        f"x {cfg.accum_steps} accumulation), weight decay {cfg.weight_decay}, cosine to {cfg.min_lr:g} after "
        f"{cfg.warmup_epochs:g} warm-up epoch(s); {cfg.epochs} epoch(s) of {steps_per_epoch} steps"
        + (f"; {', '.join(extras)}" if extras else ""),
        f"output: {cfg.output}",
    ])


def epoch_line(row: dict[str, Any], epochs: int, k: int) -> str:
    """The log line of a metrics row (``k``: the top-k of ``val_top5``, shown only with more than 5 classes)."""
    top5 = f" top-{k} {100 * row['val_top5']:.2f} %" if "val_top5" in row else ""
    return (f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} top-1 {100 * row['train_top1']:.2f} %  "
            f"val loss {row['val_loss']:.4f} top-1 {100 * row['val_top1']:.2f} %{top5}  "
            f"lr {row['lr']:.2e}  {row['images_per_sec']:.0f} img/s  {row['epoch_seconds']:.1f} s")


def run_summary(history: list[dict[str, Any]], out: Path) -> str:
    """The last log line of a run: where the final model is, and the best epoch."""
    best = max(history, key=lambda r: r["val_top1"])
    return (f"done: {out}/model.safetensors (epoch {history[-1]['epoch']}, val top-1 {100 * history[-1]['val_top1']:.2f} %); "
            f"best val top-1 {100 * best['val_top1']:.2f} % at epoch {best['epoch']} in {out}/best.pt; "
            f"learning curves: {out}/learning_curves.png")


def card_facts(cfg: Any, splits: DataSplits, history: list[dict[str, Any]]) -> dict[str, Any]:
    """What a run's model card says about it (``modelcard.write_model_card``'s ``metrics``, ``data``,
    ``recipe``): the final model's validation metrics and the best epoch, the data and the options."""
    last, best = history[-1], max(history, key=lambda r: r["val_top1"])
    metrics = {k: last[k] for k in ("val_top1", "val_top5", "val_loss", "train_loss") if k in last}
    metrics.update({"epochs trained": last["epoch"], "best val top-1 (best.pt)": f"{100 * best['val_top1']:.2f} % at epoch {best['epoch']}"})
    data = {"name": "digits" if cfg.data == "digits" else Path(cfg.data.rstrip("/\\")).name, "classes": splits.num_classes,
            "train images": len(splits.train), "val images": len(splits.val)}
    shown = ("recipe", "weights", "epochs", "batch_size", "lr", "weight_decay", "warmup_epochs", "label_smoothing", "mixup",
             "cutmix", "randaugment", "drop_path", "ema_decay", "freeze_backbone", "layer_decay", "early_stop",
             "balance_classes", "seed")
    recipe = {k: getattr(cfg, k) for k in shown if getattr(cfg, k) is not None and getattr(cfg, k) is not False}  # 0 is shown
    return {"metrics": metrics, "data": data, "recipe": recipe}


def write_metrics(history: list[dict[str, Any]], out: Path) -> None:
    """``metrics.jsonl`` and ``metrics.csv`` rewritten from the whole history (resume-safe) and the
    learning-curve PNG redrawn."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(history[0]))
    writer.writeheader()
    writer.writerows(history)
    with disk_full_is_one_line(f"the metrics in {out}", out / "last.pt"):
        atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(row) + "\n" for row in history))
        atomic_write_text(out / "metrics.csv", buffer.getvalue())
        plot_learning_curves(history, out / "learning_curves.png")
