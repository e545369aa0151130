"""``cvt train --tensorboard``: the run's metrics as TensorBoard event files in ``<output>/tensorboard``.

Per epoch (at its last optimizer step, the x axis TensorBoard and transformers' ``Trainer`` use):
``train/loss``, ``train/top1``, ``val/loss``, ``val/top1``, ``val/top5`` (with more than 5 classes),
``lr`` and ``images_per_sec``; once, a grid of the first batch as the model sees it (augmented,
un-normalised: ``train/augmented_images``); at the end the hyperparameters with the best val top-1
(the HPARAMS tab). Written through ``torch.utils.tensorboard``, which needs the ``tensorboard``
package (``pip install torchcvt[tensorboard]``). A resumed run drops the events after its checkpoint's
step (``purge_step``), so the curves show no doubled steps.

    tensorboard --logdir runs/pets/tensorboard
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .transforms import denormalize

_MAX_IMAGES = 32  # images in the grid of augmented inputs


def require_tensorboard() -> None:
    """A one-line ConfigError unless the tensorboard package is installed (``TrainConfig.validate`` asks
    before the run folder is touched)."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("--tensorboard needs the tensorboard package: pip install 'torchcvt[tensorboard]' "
                          "(or pip install tensorboard)")


class TensorBoardLog:
    """An event-file writer in ``out/tensorboard`` (a context manager that closes it); ``enabled`` False:
    every method does nothing. ``resume_step``: the step a resumed run continues from."""

    def __init__(self, out: Path, *, enabled: bool = True, resume_step: int | None = None) -> None:
        self.writer = None
        if not enabled:
            return
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)  # the checkpoint's own step was logged
        self.images_written = resume_step is not None and resume_step > 0

    def images(self, x: torch.Tensor, mean: Sequence[float], std: Sequence[float], step: int) -> None:
        """A grid of the (normalised) batch ``x`` ``[B, C, H, W]``; only the first call writes."""
        if self.writer is None or self.images_written:
            return
        pixels = denormalize(x[:_MAX_IMAGES].detach().float().cpu(), mean, std)
        self.writer.add_images("train/augmented_images", pixels, step, dataformats="NCHW")
        self.images_written = True

    def epoch(self, row: dict[str, Any]) -> None:
        """A row of the metrics history (``train_state.Progress.end_epoch``)."""
        if self.writer is None:
            return
        names = {"train_loss": "train/loss", "train_top1": "train/top1", "val_loss": "val/loss", "val_top1": "val/top1",
                 "val_top5": "val/top5", "lr": "lr", "images_per_sec": "images_per_sec"}
        for key, tag in names.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], row["step"])
        self.writer.flush()

    def hparams(self, train_config: Any, history: list[dict[str, Any]], finished: bool = True) -> None:
        """The run's options (numbers, strings, booleans; None as "none") and its best and last val top-1:
        once, when the run has ``finished`` (a stopped run writes them when its resumed run finishes)."""
        if self.writer is None or not history or not finished:
            return
        values = {k: ("none" if v is None else ",".join(map(str, v)) if isinstance(v, tuple) else v)
                  for k, v in dataclasses.asdict(train_config).items()}
        best = max(row["val_top1"] for row in history)
        self.writer.add_hparams(values, {"hparam/best_val_top1": best, "hparam/val_top1": history[-1]["val_top1"]},
                                run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> "TensorBoardLog":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
