"""MKL's own kernels on AMD CPUs: a one-function library loaded before torch, when torchcvt is imported first.

PyTorch's x86 wheels link Intel MKL, and MKL asks ``mkl_serv_intel_cpu_true()`` before it picks its
kernels: on an AMD CPU the answer is no and single-precision GEMM runs a generic path. A library
that defines that function to return 1, loaded before MKL, makes MKL dispatch on the CPU's
instruction sets as it does on Intel (AVX2 on a Zen 3, AVX-512 on a Zen 4/5). This is the recipe
PyTorch's maintainers give for full speed on AMD (pytorch/builder#1245, which ships the same
one-line C function for ``LD_PRELOAD``). On a Zen 3 it made the 2048^3 sgemm and CvT-13's eager
forward faster (docs/performance.md, row 22); results change only by float32 rounding.

How: ``import torchcvt`` calls ``enable()`` before anything imports torch. On Linux x86-64 with an
AMD CPU it compiles the function once with the system C compiler into ``cache_dir()`` and loads it
with ``RTLD_GLOBAL``, so that libtorch_cpu's reference resolves to it when torch loads. It cannot
act once torch is loaded (MKL asks when torch initialises it), so a script that imports torch first
keeps MKL's default dispatch; ``status()`` says which applies and why, and ``cvt bench`` prints it.
For such a script, ``LD_PRELOAD="$(python -c 'from torchcvt import mkl_amd; print(mkl_amd.build_shim())')"``
loads the same file at process start. ``$TORCHCVT_MKL_INTEL_PATH=0`` turns it off. No torch import here: this
module runs before torch exists in the process.
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

# The call counter lets status() tell "MKL asked us" from "loaded but never consulted".
SHIM_SOURCE = """\
static int calls;
int mkl_serv_intel_cpu_true(void) { calls++; return 1; }
int torchcvt_mkl_shim_calls(void) { return calls; }
"""
_state: dict[str, object] = {"reason": "not tried: torchcvt.mkl_amd.enable() has not run"}


def _cpu_vendor() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    return next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("vendor_id")), "")


def shim_path() -> Path:
    """Where the compiled function is kept: named by a hash of its source and the machine type."""
    tag = hashlib.sha256(f"{SHIM_SOURCE}|{platform.machine()}".encode()).hexdigest()[:12]
    return cache_dir() / f"mkl-intel-path-{tag}.so"


def _safe_to_load(path: Path) -> bool:
    """Ours: a file owned by this user that others cannot write (a library loaded into the process runs as us)."""
    info = path.lstat()
    return stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid() and not info.st_mode & 0o002


def build_shim() -> Path:
    """The compiled shim, built with ``$CC`` (else cc/gcc/clang) when missing; OSError when it cannot be built."""
    path = shim_path()
    if path.exists() or path.is_symlink():
        if _safe_to_load(path):
            return path
        path.unlink()  # not one we would load: built again below, or OSError if it is not ours to remove
    compiler = next((c for c in (os.environ.get("CC"), "cc", "gcc", "clang") if c and shutil.which(c)), None)
    if compiler is None:
        raise OSError("no C compiler (cc, gcc or clang) on PATH")
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "mkl_intel_path.c"
        source.write_text(SHIM_SOURCE)

        def compile_to(target: str) -> None:
            done = subprocess.run([compiler, "-shared", "-fPIC", "-O2", "-o", target, str(source)],
                                  capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise OSError(f"{compiler} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")

        atomic_save(compile_to, path)
    return path


def enable() -> bool:
    """Load the shim for MKL if this process can use it; True if loaded. Never raises."""
    if os.environ.get("TORCHCVT_MKL_INTEL_PATH") == "0":
        _state["reason"] = "off ($TORCHCVT_MKL_INTEL_PATH=0)"
    elif sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        _state["reason"] = "not needed: not Linux on x86-64"
    elif _cpu_vendor() != "AuthenticAMD":
        _state["reason"] = f"not needed: {_cpu_vendor() or 'unknown'} CPU, MKL dispatches on its own"
    elif "torch" in sys.modules:
        _state["reason"] = "not applied: torch was imported before torchcvt (MKL had already chosen its kernels)"
    else:
        try:
            path = build_shim()
            library = ctypes.CDLL(str(path), mode=os.RTLD_GLOBAL)
            library.torchcvt_mkl_shim_calls  # AttributeError: not the shim
            _state["library"] = library
            _state["reason"] = f"loaded from {path}"
            return True
        except Exception as exc:  # noqa: BLE001 -- a speed-up that cannot be had must not stop the import
            _state["reason"] = f"not applied: {exc}"
    return False


def status() -> str:
    """One line: whether MKL runs its Intel kernels here, and why (asks MKL once, with a small product)."""
    library = _state.get("library")
    preloaded = any(Path(p).name.startswith("mkl-intel-path-") for p in os.environ.get("LD_PRELOAD", "").split(":"))
    if library is None and preloaded:
        library = ctypes.CDLL(None)  # the preloaded copy is in the global scope
    if library is None:
        return f"MKL's default dispatch ({_state['reason']})"
    import torch

    if library.torchcvt_mkl_shim_calls() == 0 and torch.backends.mkl.is_available():
        torch.mm(torch.ones(64, 64), torch.ones(64, 64))  # MKL asks on its first call
    if library.torchcvt_mkl_shim_calls() == 0:
        return "MKL's default dispatch (the shim is loaded but MKL never asked for it)"
    return "MKL's Intel kernels on this AMD CPU (torchcvt's mkl_serv_intel_cpu_true shim; $TORCHCVT_MKL_INTEL_PATH=0 turns it off)"


def active() -> bool:
    """True when MKL asked the shim and runs its Intel kernels."""
    return status().startswith("MKL's Intel kernels")

