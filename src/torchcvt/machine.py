"""What this machine is and what was measured on it: CPU flags, alternating timing, per-machine records.

* ``cpu_info()``: the CPU's name and the instruction-set flags that decide which kernels are fast
  (avx2, avx512f, avx512_vnni, avx_vnni, avx512_bf16, amx_*), read from ``/proc/cpuinfo``, else from
  ``torch.backends.cpu.get_cpu_capability()``, once per process. Every figure torchcvt prints comes with it.
* ``time_alternating`` / ``median_ratio``: the one way torchcvt times candidates against each other
  (``cvt bench``, the ``"auto"`` backend's measurement): every candidate once per round, in rotating
  order, so neighbouring runs share the machine's load and the per-round ratios are steady;
  ``torch_threads`` runs them at a given thread count.
* Measurement records: a small JSON file, ``cache_dir() / "measurements.json"``, with one entry per
  (CPU name and flags, torch version, the onnxruntime version where it is timed, threads, what was
  measured: the model layout, the GEMM engine). ``"auto"``, the GEMM choice and the
  reduced-precision checks measure once per entry and read the record afterwards; delete the file
  (or the entry) to measure again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import TorchCvTError
from . import mkl_amd
from .fileio import atomic_save, cache_dir
from .version import __version__

logger = logging.getLogger("torchcvt")

# Flags that decide which fp32 / int8 / bf16 kernels a CPU runs fast, in the order they are printed.
KNOWN_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
INT8_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")  # an int8 dot-product instruction (VNNI or AMX)
BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # native bf16 dot products; without them bf16 is converted to fp32 and back


@dataclass(frozen=True)
class CpuInfo:
    name: str
    flags: frozenset[str]  # the KNOWN_FLAGS this CPU has
    capability: str  # torch.backends.cpu.get_cpu_capability(): the vector ISA torch's kernels use
    cores: int

    def has_any(self, flags: tuple[str, ...]) -> bool:
        return any(f in self.flags for f in flags)

    def flag_summary(self) -> str:
        """``"avx2 yes; avx512f no; ..."`` compacted: ``"avx2; no avx512f, avx512_vnni, ..."``."""
        have = [f for f in KNOWN_FLAGS if f in self.flags]
        missing = [f for f in KNOWN_FLAGS if f not in self.flags]
        parts = [", ".join(have) or "none of the flags"]
        if missing:
            parts.append("no " + ", ".join(missing))
        return "; ".join(parts)

    def describe(self) -> str:
        """One line for logs and tables: name, logical cores, flags."""
        return f"{self.name} ({self.cores} logical cores; {self.flag_summary()})"


def _read_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):  # x86 / arm
            return set(line.split(":", 1)[1].split())
    return set()


@functools.cache  # /proc/cpuinfo is read once per process (tests fake the CPU by passing ``cpuinfo``)
def cpu_info(cpuinfo: str | None = None) -> CpuInfo:
    """This CPU: name, known flags, torch's vector ISA, logical cores (``cpuinfo``: text to parse instead of /proc)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    name = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")), "")
    flags = _read_flags(cpuinfo)
    capability = torch.backends.cpu.get_cpu_capability()
    if not flags:  # no /proc/cpuinfo (macOS, Windows): what torch detected is the best we know
        flags = {"avx2"} if capability in ("AVX2", "AVX512") else set()
        flags |= {"avx512f"} if capability == "AVX512" else set()
    return CpuInfo(name or platform.processor() or platform.machine(), frozenset(flags & set(KNOWN_FLAGS)),
                   capability, os.cpu_count() or 1)


def load_average() -> str:
    """The 1/5/15-minute load average (other work on the machine), or ``"?"``."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


# ------------------------------------------------------------------------------------ timing
def time_alternating(candidates: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each candidate, ``repeats`` rounds after ``warmup`` untimed ones.

    Each round runs every candidate once; the order rotates by one each round so no candidate
    always follows the same one (caches, CPU frequency and neighbours' load affect all alike).
    """
    names = list(candidates)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            candidates[name]()
            elapsed = time.perf_counter() - start
            if r >= warmup:
                times[name].append(elapsed)
    return times


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``threads`` inside the block and restored after it."""
    before = torch.get_num_threads()
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def median_ratio(reference: list[float], other: list[float]) -> float:
    """Median over rounds of ``reference / other``: how many times faster ``other`` is."""
    return statistics.median(a / b for a, b in zip(reference, other))


# ------------------------------------------------------------------------ measurement records
def measurements_path() -> Path:
    return cache_dir() / "measurements.json"


def onnxruntime_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def record_key(layout: dict[str, Any], threads: int, *, onnxruntime: bool = False) -> tuple[str, dict[str, Any]]:
    """``(key, description)`` of a measurement: the machine, the software and what was measured (``layout``).

    ``onnxruntime``: the measurement times ONNX Runtime, so its version is part of the key (and only
    then is onnxruntime imported).
    """
    cpu = cpu_info()
    description = {"cpu": cpu.name, "flags": sorted(cpu.flags), "torch": torch.__version__, "torchcvt": __version__,
                   "threads": threads, "layout": layout}
    if onnxruntime:
        description["onnxruntime"] = onnxruntime_version()
    if mkl_amd.active():  # MKL's GEMMs run other kernels, at another speed (only here: other keys stay valid)
        description["mkl"] = "intel kernels"
    key = hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]
    return key, description


def read_record(key: str) -> dict[str, Any] | None:
    """The record stored under ``key``, or None (no file, no entry, or a file that is not JSON)."""
    try:
        records = json.loads(measurements_path().read_text())
    except (OSError, ValueError):
        return None
    record = records.get(key) if isinstance(records, dict) else None
    return record if isinstance(record, dict) else None


def update_record(key: str, description: dict[str, Any], results: dict[str, Any]) -> bool:
    """Merge ``results`` into the record under ``key`` (written atomically, with the date and load); True if stored.

    Not stored, with a warning, when other work skewed the timing (the 1-minute load average was above
    the core count: the next process measures again) or the cache cannot be written (read-only, full):
    the caller uses its measurement either way.
    """
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if load > (os.cpu_count() or 1):
        logger.warning("measured at load %.1f on %d cores: not stored, the next process measures again", load, os.cpu_count() or 1)
        return False
    path = measurements_path()
    try:
        records = json.loads(path.read_text())
        records = records if isinstance(records, dict) else {}
    except (OSError, ValueError):
        records = {}
    record = records.get(key) if isinstance(records.get(key), dict) else dict(description)
    record.update(results)
    record["measured"] = time.strftime("%Y-%m-%d %H:%M")
    record["load_average"] = load_average()
    records[key] = record
    try:
        atomic_save(lambda tmp: Path(tmp).write_text(json.dumps(records, indent=1, sort_keys=True)), path)
    except (OSError, TorchCvTError) as error:
        logger.warning("could not store the measurement in %s (%s): the next process measures again", path, error)
        return False
    return True
