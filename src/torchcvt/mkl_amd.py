"""MKL's own kernels on AMD CPUs: a one-function library loaded before torch, when torchcvt is imported first.

PyTorch's x86 wheels link Intel MKL, and MKL asks ``mkl_serv_intel_cpu_true()`` before it picks its
kernels: on an AMD CPU the answer is no and single-precision GEMM runs a generic path. A library
that defines that function to return 1, loaded before MKL, makes MKL dispatch on the CPU's
instruction sets as it does on Intel (AVX2 on a Zen 3, AVX-512 on a Zen 4/5). This is the recipe
PyTorch's maintainers give for full speed on AMD (pytorch/builder#1245, which ships the same
one-line C function for ``LD_PRELOAD``). On a Zen 3 it made the 2048^3 sgemm and CvT-13's eager
forward faster (docs/performance.md, row 22); results change only by float32 rounding, which is
why a training checkpoint records it (``train_state.float_kernels``).

How: ``import torchcvt`` calls ``enable()`` before anything imports torch. On Linux x86-64 with an
AMD (or Hygon) CPU it compiles the function once with the system C compiler into ``cache_dir()/mkl``
(a folder only this user can write) and loads it with ``RTLD_GLOBAL``, so that libtorch_cpu's
reference resolves to it when torch loads. It cannot act once torch is loaded (MKL asks when torch
initialises it), so a script that imports torch first keeps MKL's default dispatch; ``status()`` says
which applies and why, and ``cvt bench`` prints it. Such a script can load the same file at process
start: ``LD_PRELOAD="$(python -c 'from torchcvt import mkl_amd; print(mkl_amd.build_shim())')"``.
``$TORCHCVT_MKL_INTEL_PATH=0`` turns it off. No torch import at module level: this module runs
before torch exists in the process. Nothing here raises into ``import torchcvt``: a shim that
cannot be built or trusted leaves MKL as it is, with the reason in ``status()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

from .fileio import atomic_save, cache_dir

AMD_VENDORS = ("AuthenticAMD", "HygonGenuine")  # Hygon's Dhyana is a Zen core
# MKL asks once or twice per process; the flag lets status() tell "MKL asked" from "loaded, never asked".
SHIM_SOURCE = """\
static int asked;
int mkl_serv_intel_cpu_true(void) { asked = 1; return 1; }
int torchcvt_mkl_shim_asked(void) { return asked; }
"""
COMPILE_TIMEOUT_S = 15  # the compile runs inside `import torchcvt`; a hung compiler must not hold it longer
_library: ctypes.CDLL | None = None  # the shim, when loaded (by us or by LD_PRELOAD)
_how = ""  # how it came in
_reason = "not tried: torchcvt.mkl_amd.enable() has not run"  # why not, when it did not


def _cpu_vendor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")


def shim_path() -> Path:
    """Where the compiled function is kept: named by a hash of its source and the machine type."""
    tag = hashlib.sha256(f"{SHIM_SOURCE}|{platform.machine()}".encode()).hexdigest()[:12]
    return cache_dir() / "mkl" / f"mkl-intel-path-{tag}.so"


def _private_folder(folder: Path) -> None:
    """``folder`` created 0700, or checked: ours and writable by no one else, else OSError (nothing is loaded from it)."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.is_dir():
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:  # another process made it just now (a file there fails the check below)
                pass
        info = folder.lstat()
    except OSError as exc:  # FileExistsError included: the cache path is a file
        raise OSError(f"cannot create the shim's folder {folder}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o022:
        raise OSError(f"{folder}: not a folder of this user's that others cannot write; not loading a library from it")


def _ours(info: os.stat_result) -> bool:
    """A regular file of this user's that no one else can write: the only kind loaded into the process."""
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o022


def build_shim() -> Path:
    """The compiled shim, built with ``$CC`` (else cc/gcc/clang) when missing or not trusted; OSError when it cannot be."""
    path = shim_path()
    _private_folder(path.parent)
    if (path.exists() or path.is_symlink()) and _ours(path.lstat()):  # a symlink is not ours: it is rebuilt over
        return path
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    with tempfile.TemporaryDirectory() as work:
        source, built = Path(work) / "mkl_intel_path.c", Path(work) / "mkl_intel_path.so"
        source.write_text(SHIM_SOURCE)
        try:
            done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", str(built), str(source)],
                                  capture_output=True, text=True, timeout=COMPILE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            raise OSError(f"{compiler} did not finish in {COMPILE_TIMEOUT_S} s") from None
        if done.returncode != 0:
            raise OSError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
        # Replaced atomically (a process that loaded the old file keeps it); 0755 whatever the umask says.
        atomic_save(lambda tmp: shutil.copyfile(built, tmp), path, mode=0o755)
    return path


def _load_trusted(path: Path) -> ctypes.CDLL:
    """dlopen the very file that was checked: opened without following links, checked, loaded through its fd."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        if not _ours(os.fstat(fd)):
            raise OSError(f"{path}: changed after it was checked; not loading it")
        library = ctypes.CDLL(f"/proc/self/fd/{fd}", mode=os.RTLD_GLOBAL)
    finally:
        os.close(fd)  # the loader holds its own mapping
    if not hasattr(library, "torchcvt_mkl_shim_asked"):
        raise OSError(f"{path}: not torchcvt's MKL shim")
    return library


def enable() -> bool:
    """Load the shim for MKL if this process can use it; True if it is in the process. Never raises."""
    global _library, _how, _reason
    if _library is not None:
        return True
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        _reason = "not needed: not Linux on x86-64"
        return False
    preloaded = ctypes.CDLL(None)  # the process's global scope: a copy from LD_PRELOAD answers here
    if hasattr(preloaded, "torchcvt_mkl_shim_asked"):
        _library, _how = preloaded, "preloaded with LD_PRELOAD"
        return True
    vendor = _cpu_vendor()
    if os.environ.get("TORCHCVT_MKL_INTEL_PATH") == "0":
        _reason = "off ($TORCHCVT_MKL_INTEL_PATH=0)"
    elif vendor not in AMD_VENDORS:
        _reason = f"not needed: {vendor or 'unknown'} CPU, MKL dispatches on its own"
    elif "torch" in sys.modules:
        _reason = "not applied: torch was imported before torchcvt (MKL had already chosen its kernels)"
    else:
        try:
            _library = _load_trusted(build_shim())
            _how = "loaded by import torchcvt; $TORCHCVT_MKL_INTEL_PATH=0 turns it off"
            return True
        except Exception as exc:  # noqa: BLE001 -- a speed-up that cannot be had must not stop the import
            _reason = f"not applied: {exc}"
    return False


def active() -> bool:
    """True when MKL asked the shim and runs its Intel kernels (asks MKL once, with a small product). Never raises."""
    if _library is None:
        return False
    if not _library.torchcvt_mkl_shim_asked():
        import torch

        if torch.backends.mkl.is_available():
            torch.mm(torch.ones(64, 64), torch.ones(64, 64))  # MKL asks on its first call
    return bool(_library.torchcvt_mkl_shim_asked())


def status() -> str:
    """One line: whether MKL runs its Intel kernels here, and why. Never raises."""
    if active():
        return f"MKL's Intel kernels on this AMD CPU (torchcvt's mkl_serv_intel_cpu_true shim, {_how})"
    if _library is None:
        return f"MKL's default dispatch ({_reason})"
    return "MKL's default dispatch (torchcvt's shim is loaded but MKL never asked for it)"
