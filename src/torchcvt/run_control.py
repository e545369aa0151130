"""When the training loop writes ``last.pt`` and when it stops: every N optimizer steps, every M
minutes of training, and on SIGINT or SIGTERM, decided after each optimizer step, the same on every rank.

* Signals: while ``RunControl`` is active, SIGINT and SIGTERM only set a flag (a second one changes
  nothing); the loop finishes the step it is in, writes a resumable checkpoint and stops, and the
  command exits 128 + the signal number (130, 143). DataLoader workers ignore both
  (``ignore_stop_signals``, their ``worker_init_fn``): a Ctrl-C reaches the whole process group, and a
  worker that died of it would break the step the main process is finishing.
* Agreement: the flags of all ranks are combined (a maximum) after every step, and the clock is
  rank 0's, so every rank checkpoints and stops at the same step even when a signal reaches one rank
  only. One tiny all-reduce per step, over a CPU (gloo) group, so no GPU sync.
* The clock decides only *when* a checkpoint is written; a checkpoint is the full state at a step
  boundary, so a run resumed from any of them ends bit-identical to one never stopped.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .distributed import Dist
from .errors import TorchCvTError

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingStopped(TorchCvTError):
    """The run stopped on a signal after writing a resumable checkpoint (``exit_code``: 128 + the signal)."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def ignore_stop_signals(worker_id: int = 0) -> None:
    """A DataLoader ``worker_init_fn``: SIGINT and SIGTERM are the main process's to handle."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


@dataclass(frozen=True)
class Decision:
    checkpoint: bool  # write last.pt after this step
    stop: int  # the signal that stops the run after this step (0: none)


class RunControl:
    """``with RunControl(d, every_steps=0, every_minutes=10.0) as control:`` around the loop; after each
    optimizer step ``control.after_step(step)`` (a collective) says whether to checkpoint and stop,
    and ``control.saved()`` restarts the clock after any write of last.pt."""

    def __init__(self, d: Dist, *, every_steps: int = 0, every_minutes: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.d, self.every_steps, self.every_seconds, self.clock = d, every_steps, every_minutes * 60, clock
        self.signal = 0  # the first stop signal this process received
        self.stopped = 0  # the agreed stop signal, once the loop is stopping
        self.last_saved = clock()
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "RunControl":
        self.last_saved = self.clock()
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            self._previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        return self

    def __exit__(self, *exc_info) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _request_stop(self, signum: int, frame: object) -> None:
        self.signal = self.signal or signum

    def after_step(self, step: int) -> Decision:
        """Whether to write last.pt after optimizer step ``step`` (counted from 1) and whether to stop.
        Every rank must call it after every step."""
        due = self.every_seconds > 0 and self.d.main and self.clock() - self.last_saved >= self.every_seconds
        stop, due = self.d.agree([self.signal, int(due)])
        self.stopped = stop
        every = self.every_steps > 0 and step % self.every_steps == 0
        return Decision(checkpoint=bool(every or due or stop), stop=stop)

    def poll_stop(self) -> int:
        """The agreed stop signal (0: none) between steps, e.g. after an epoch's validation. A collective."""
        self.stopped = self.d.agree([self.signal])[0]
        return self.stopped

    def saved(self) -> None:
        self.last_saved = self.clock()

    def stopped_error(self, progress: Any, steps_per_epoch: int, checkpoint: Path) -> TrainingStopped:
        """The one line of a run stopped where ``progress`` (a train_state.Progress) says, with the exit
        status of the signal (130 for SIGINT, 143 for SIGTERM)."""
        p = progress
        where = (f"epoch {p.epoch + 1}, step {p.epoch_step} of {steps_per_epoch}" if p.epoch_step else f"the end of epoch {p.epoch}")
        return TrainingStopped(f"stopped by {signal.Signals(self.stopped).name} after step {p.step} ({where}); {checkpoint} "
                               f"holds it: continue with cvt train --resume --output {checkpoint.parent}", 128 + self.stopped)


def early_stop(history: list[dict[str, Any]], patience: int) -> str | None:
    """Why to stop now (None: go on): ``patience`` > 0 epochs since the best val top-1 without a
    better one (an equal one is no better). From the metrics alone, so a resumed run decides the same."""
    if patience <= 0 or not history:
        return None
    best = max(history, key=lambda row: row["val_top1"])  # the first of equals: the one best.pt holds
    waited = history[-1]["epoch"] - best["epoch"]
    if waited < patience:
        return None
    return (f"early stop after epoch {history[-1]['epoch']}: no better val top-1 in {waited} epoch(s) since epoch "
            f"{best['epoch']} ({100 * best['val_top1']:.2f} %, its weights in best.pt)")
