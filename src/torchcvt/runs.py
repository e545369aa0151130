"""The run folder (``cvt train --output``): who may write in it, what a new run may replace, and what a
failed write leaves.

A run claims its folder for its whole life (``RunFolder(path, ...).claim()``; rank 0 alone under torchrun):

* the folder: ``--output`` must be a folder or not exist yet, its parent folder must exist (a typo does
  not silently start a new tree; the default ``runs/<name>`` makes ``runs/``), and this process must be
  able to write in it;
* an exclusive lock: ``fcntl.flock`` on ``.lock`` in the folder, which holds ``PID host`` of the holder.
  The OS releases a flock when its process ends, however it ends (``kill -9`` included), so a lock is
  never stale; a second run on the folder refuses at once, naming the holder. (Not the filelock
  library: it opens the lock file with ``O_TRUNC``, which would erase the holder's PID from it.)
* what is there: a new run into a folder that holds a run refuses, naming ``--resume`` (continue it)
  and ``--overwrite`` (delete its files first); nothing is deleted without ``--overwrite``, and
  ``--overwrite`` deletes only the files a run writes (``RUN_FILES``). Temporary files left by a writer
  killed mid-write are removed: with the lock held, no writer of this folder is alive.

``check`` makes every refusal that needs no write, so the trainer can refuse at once, before reading the
data, and bad data leaves no folder behind. ``disk_full_is_one_line`` turns a full disk, however the OS
or ``torch.save`` reports it, into one line that says which file failed and that the previous
checkpoint is intact (files are written atomically: a failed write leaves the old file).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .errors import DiskFullError, TorchCvTError
from .fileio import is_disk_full

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_FILE = ".lock"
# What a run writes in its folder: what makes a folder "hold a run", and all that --overwrite deletes.
RUN_FILES = ("last.pt", "best.pt", "train_config.json", "metrics.jsonl", "metrics.csv",
             "learning_curves.png", "config.json", "model.safetensors", "preprocessor_config.json",
             "tensorboard")  # a folder (--tensorboard): a new run's events would be drawn with the old run's
OPTION = "--output"


class RunFolderError(TorchCvTError):
    """``--output`` cannot hold this run: a file, not writable, in use, or holding another run."""


@dataclass
class RunFolder:
    """A run folder this process has claimed: it holds the lock until ``release`` (or its end)."""

    path: Path
    resume: bool = False
    overwrite: bool = False
    make_parents: bool = False  # create missing parent folders (the default --output, runs/<name>)
    _lock_fd: int | None = field(default=None, repr=False)

    def check(self) -> None:
        """Every refusal ``claim`` would make that needs no write: a one-line RunFolderError."""
        if self.resume and self.overwrite:
            raise RunFolderError("--resume and --overwrite exclude each other: --resume continues the run in "
                                 f"{OPTION} {self.path}, --overwrite deletes it")
        self._check_path()
        if fcntl is not None and (self.path / LOCK_FILE).is_file():
            fd = os.open(self.path / LOCK_FILE, os.O_RDONLY)
            try:  # a shared lock needs no write access (on NFS an exclusive one does) and fails just the same
                self._lock_or_refuse(fd, fcntl.LOCK_SH)
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        if self.path.is_dir() or self.resume:
            self._check_contents(delete=False)

    def claim(self) -> "RunFolder":
        """Make the folder if needed, take its lock, check that it can be written, and refuse a folder
        holding another run unless ``resume`` or ``overwrite`` (which deletes that run's files)."""
        self.check()
        try:
            self.path.mkdir(parents=self.make_parents, exist_ok=True)
            fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _not_writable(self.path, exc) from None
        try:
            self._lock_or_refuse(fd)
            self._lock_fd = fd
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
            with tempfile.TemporaryFile(dir=self.path):  # the lock file may be writable where the folder is not
                pass
            self._check_contents(delete=True)
        except BaseException as exc:
            os.close(fd) if self._lock_fd is None else self.release()
            if isinstance(exc, OSError):
                raise _not_writable(self.path, exc) from None
            raise
        return self

    def release(self) -> None:
        """Give up the lock (the lock file stays: removing it could let two later runs lock two files)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    # ------------------------------------------------------------------------------------ checks
    def _check_path(self) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{OPTION} {path} is a file, not a folder: give a folder (a new run creates it)")
        if path.exists():
            return
        nearest = next(p for p in path.parents if p.exists())  # the folder that would hold the new ones
        if not nearest.is_dir():
            raise RunFolderError(f"{OPTION} {path}: {nearest} is a file, not a folder")
        if nearest != path.parent and not self.make_parents:
            raise RunFolderError(f"{OPTION} {path}: the folder {path.parent} does not exist (create it first, "
                                 f"or choose another {OPTION})")

    def _lock_or_refuse(self, fd: int, kind: int | None = None) -> None:
        """Take the lock on ``fd`` (exclusive unless ``kind``) or refuse, naming its holder."""
        if fcntl is None:
            return
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX if kind is None else kind) | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            who = f"PID {holder[0]} on {holder[1]}" if len(holder) == 2 else "a process that is starting"
            raise RunFolderError(f"{OPTION} {self.path} is in use by another cvt train ({who}); wait for it to end, "
                                 f"or choose another {OPTION}") from None

    def _check_contents(self, *, delete: bool) -> None:
        found = [name for name in RUN_FILES if (self.path / name).exists()]
        if self.resume:
            if "last.pt" not in found:
                raise RunFolderError(f"{OPTION} {self.path}: no last.pt to resume from (start without --resume, "
                                     "or give the run's folder)")
        elif found and not self.overwrite:
            raise RunFolderError(f"{OPTION} {self.path} holds a run ({', '.join(found)}): continue it with --resume, "
                                 "or delete it and start over with --overwrite")
        elif found and delete:
            for name in found:
                path = self.path / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if delete:  # the lock is ours: a temporary file of a run file belongs to a writer that was killed
            stale = re.compile(r"\.(%s)\..*\.tmp" % "|".join(re.escape(name) for name in RUN_FILES))
            for tmp in self.path.iterdir():
                if stale.fullmatch(tmp.name):
                    tmp.unlink()


def _not_writable(path: Path, exc: OSError) -> RunFolderError:
    reason = exc.strerror or type(exc).__name__
    return RunFolderError(f"{OPTION} {path} is not writable ({reason}): choose a folder you can write to")


# ------------------------------------------------------------------------------------- full disk
@contextmanager
def disk_full_is_one_line(path: str | os.PathLike, checkpoint: Path) -> Iterator[None]:
    """Writing ``path``: a full disk becomes a DiskFullError naming it and saying whether ``checkpoint``
    (the run's last.pt, untouched by a failed atomic write) is there to resume from."""
    try:
        yield
    except (OSError, RuntimeError) as exc:
        if not (isinstance(exc, DiskFullError) or is_disk_full(exc)):
            raise
        kept = (f"the previous checkpoint {checkpoint} is intact: free some space, then continue with --resume"
                if checkpoint.is_file() else "no checkpoint was written yet: free some space and start again")
        raise DiskFullError(f"no space left on device writing {path}; {kept}") from None
