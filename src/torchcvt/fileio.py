"""Writing files so that nothing a user has is ever half-replaced: atomic saves, output checks,
full disks, stale temporaries, strict JSON.

``atomic_save(write, path)`` calls ``write(tmp)`` on a temporary file in ``path``'s folder, flushes
it to disk and renames it over ``path``. A crash, a kill -9 or a full disk mid-write leaves the old
file (or none), never half a file: checkpoints, configs, exports and results depend on it.

* Permissions: the temporary file is created as a plain ``open()`` would create ``path``: mode
  0666 minus the umask for a new file, the existing file's mode when one is replaced.
* A full disk (ENOSPC/EDQUOT, or the messages torch.save and safetensors wrap it in) becomes one
  ``DiskFullError`` line: no space, the path, and that the previous file is intact.
* Temporary files are named ``.NAME.PID-HOST-RANDOM.tmp``. A writer killed mid-write leaves one
  behind; the next write into that folder by any process removes it once its writer is gone: when
  HOST (a hash of the host name and the PID namespace) is this process's and PID is no running
  process, or, for another host, when it was last modified over a day ago. A live writer's file
  is never removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import DiskFullError, OutputError

STALE_AFTER_S = 24 * 3600  # temporaries of another host (or of the old mkstemp naming) older than this are stale
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]{6}\.tmp$")
_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
# How writers that do their own I/O report ENOSPC: torch.save's zip writer (a short write it only
# notices as a wrong file position), safetensors (the Rust io::Error text).
_DISK_FULL_TEXT = ("unexpected pos", "PytorchStreamWriter failed writing file", "No space left on device",
                   "Disk quota exceeded", "os error 28", "os error 122")
_cleaned_folders: set[Path] = set()


def _host_tag() -> str:
    """8 hex digits naming this host and PID namespace: PIDs are only comparable within one."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return hashlib.sha1(f"{socket.gethostname()}|{namespace}".encode()).hexdigest()[:8]


_HOST = _host_tag()


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except OverflowError:
        return False
    return True


def _is_stale(entry: os.DirEntry) -> bool:
    m = _TEMP_NAME.match(entry.name)
    if m is None:
        return False
    if m["host"] == _HOST:
        return int(m["pid"]) != os.getpid() and not _pid_running(int(m["pid"]))
    try:
        return time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S
    except OSError:
        return False


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files in ``folder`` whose writers are gone (see the module docstring).

    ``atomic_save`` calls it once per folder and process; a program may call it at its start.
    Returns what was removed; a file that cannot be removed is left alone.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        if entry.name.endswith(".tmp") and _is_stale(entry):
            try:
                os.unlink(entry.path)
                removed.append(Path(entry.path))
            except OSError:
                pass
    return removed


def _remove_legacy_temporaries(path: Path) -> None:
    """``.NAME.XXXXXXXX.tmp`` of earlier torchcvt versions (no PID in the name): by age alone."""
    legacy = re.compile(rf"^\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp$")
    try:
        for entry in os.scandir(path.parent):
            if legacy.match(entry.name) and time.time() - entry.stat(follow_symlinks=False).st_mtime > STALE_AFTER_S:
                os.unlink(entry.path)
    except OSError:
        pass


def _create_temporary(path: Path) -> Path:
    """A new, empty temporary file beside ``path``, with the mode ``open(path, "w")`` would give."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{_HOST}-{os.urandom(3).hex()}.tmp")
        try:
            # 0o666 through os.open: the kernel applies the umask, as for a plain open().
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        try:
            os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))  # replacing a file keeps its mode, as open() would
        except FileNotFoundError:
            pass
        return tmp
    raise OutputError(f"{path}: cannot create a temporary file beside it")


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or an exception it was raised from) says the disk or the quota is full."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        if not isinstance(exc, OSError) and any(text in str(exc) for text in _DISK_FULL_TEXT):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _write_error(exc: BaseException, path: Path, existed: bool) -> OutputError:
    if is_disk_full(exc):
        kept = f"the previous {path.name} is intact" if existed else f"{path.name} was not written"
        return DiskFullError(f"no space left on device writing {path}; {kept} (free some space and run again)")
    return OutputError(f"cannot write {path}: {getattr(exc, 'strerror', None) or exc}")


def cache_dir() -> Path:
    """Where exports, measurements and the MKL shim are cached (``$TORCHCVT_CACHE``, ``$XDG_CACHE_HOME/torchcvt``, ``~/.cache/torchcvt``)."""
    if os.environ.get("TORCHCVT_CACHE"):
        return Path(os.environ["TORCHCVT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "torchcvt"


def atomic_save(write: Callable[[str], object], path: str | os.PathLike, *, mode: int | None = None) -> None:
    """Call ``write(tmp_path)``, flush the file to disk, then rename it over ``path``.

    ``mode``: the new file's permissions, instead of those a plain ``open()`` would give it. The folder
    is created when missing. Raises ``OutputError`` (one line) when the folder cannot
    be written or ``path`` is a directory, ``DiskFullError`` when the disk fills up; in every case
    the temporary file is gone and ``path`` is as it was.
    """
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path}: is a directory, expected a file name")
    if path.exists() and not path.is_file():  # renaming over /dev/null would replace the device itself
        raise OutputError(f"{path}: not a regular file (a device, a pipe or a socket), expected a file name")
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.parent not in _cleaned_folders:
            _cleaned_folders.add(path.parent)
            remove_stale_temporaries(path.parent)
            _remove_legacy_temporaries(path)
        tmp = _create_temporary(path)
        mode = stat.S_IMODE(tmp.stat().st_mode) if mode is None else mode
    except OSError as exc:
        if isinstance(exc, OutputError):
            raise
        raise _write_error(exc, path, existed) from None
    try:
        write(str(tmp))
        os.chmod(tmp, mode)  # some writers (safetensors) replace the file they are given with a 0600 one
        with open(tmp, "rb") as f:  # flushed before the rename: a power cut leaves the old file or the new one
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        refused = isinstance(exc, OSError) and exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR)
        if not isinstance(exc, OutputError) and (refused or is_disk_full(exc)):
            raise _write_error(exc, path, existed) from exc
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the rename itself is done
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_save(lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), path)


def check_output(path: str | os.PathLike, option: str, *, streamed: bool = False) -> Path:
    """``path`` as an output file that can be written, checked before any work is done; else an
    ``OutputError`` naming the option: a directory, a missing folder, a folder that is no folder
    or one this process cannot write in (tried by creating and removing a temporary file).

    ``streamed``: the file will be opened and written in place (not through ``atomic_save``), so
    an existing file this process may write (``/dev/stdout`` too) needs nothing of its folder.
    """
    path = Path(path).expanduser()
    folder = path.parent
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a directory; give a file name inside it")
    if streamed and path.exists() and os.access(path, os.W_OK):
        return path
    if path.exists() and not path.is_file():
        raise OutputError(f"{option} {path}: not a regular file (a device, a pipe or a socket); give a file name")
    if not folder.exists():
        raise OutputError(f"{option} {path}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OutputError(f"{option} {path}: {folder} is not a folder")
    try:
        _create_temporary(path).unlink()
    except OSError as exc:
        reason = "no space left on device" if is_disk_full(exc) else (exc.strerror or str(exc)).lower()
        raise OutputError(f"{option} {path}: cannot write in folder {folder} ({reason})") from None
    return path


# ------------------------------------------------------------------------------------ strict JSON
def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def to_json(value: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always gives strict JSON (RFC 8259): NaN and infinities become null
    instead of the bare ``NaN`` Python writes, which no other JSON reader accepts."""
    return json.dumps(_finite(value), allow_nan=False, **kwargs)
