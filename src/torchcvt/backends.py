"""Inference backends behind one call: a CvT in, a callable from pixels to logits out.

    runner = torchcvt.optimize_for_inference(model)   # backend="auto": the fastest measured here
    logits = runner(pixels)   # normalised float32 [B, 3, H, W] -> [B, num_classes]

* ``"eager"``: PyTorch, with the fast path's inference fusions (``fused.fuse_for_inference``:
  BatchNorm and scale folded, epilogues fused); the result is a ``CvT`` copy, so every model method
  works on it too.
* ``"onnxruntime"``: the model is exported once to ONNX (``export.export_onnx``) and run by ONNX
  Runtime's CPU provider. The file is cached per weights, under a content hash of the config and every
  tensor (``cache_dir() / "onnx"``), so the export cost (20-60 s for CvT-13 on 2 cores) is paid by the
  first call for those weights only. Intra-op threads follow ``torch.get_num_threads()``; spinning is
  off, so ONNX Runtime's idle threads do not steal the CPU from torch or from other work in the process
  (``onnxruntime_session``: the benchmarks open their sessions with it too).
* ``"auto"`` (the default): eager where ONNX Runtime cannot run (not installed, not the CPU, not
  float32); otherwise the backend measured faster on this machine for this layout. The first call per
  (CPU, software versions, threads, layout, the fast path's GEMM engine) times both alternately at
  batch 1 and 8, both at ``threads`` (seconds, after the export), and stores the result in
  ``cache_dir() / "measurements.json"`` (``machine.py``); later calls read it. One log line says
  which backend and why.

``precision``: ``"float32"`` (default), ``"int8"`` (ONNX Runtime's dynamic quantization: int8
weights, activations quantized per call) or ``"bfloat16"`` (eager under CPU autocast). Reduced
precision is offered only where it is faster: the CPU must have the instructions for it
(``machine.INT8_FLAGS``, ``machine.BF16_FLAGS``) and a measurement on this machine must show it
faster than float32 at batch 1 and 8; elsewhere a one-line ``ConfigError`` says why, with the figure.
A stored verdict is read before anything is built: a refusal costs no export or quantization.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from .config import CvTConfig
from .allocator import retain_freed_memory
from .errors import ConfigError
from .export import export_onnx, min_dynamic_side
from .fastpath import gemm_engine
from .fileio import atomic_save, cache_dir
from .fused import fuse_for_inference
from .machine import (BF16_FLAGS, INT8_FLAGS, cpu_info, measurements_path, median_ratio, read_record,
                      record_key, time_alternating, torch_threads, update_record)
from .model import CvT
from .version import __version__

logger = logging.getLogger("torchcvt")

BACKENDS = ("auto", "eager", "onnxruntime")
PRECISIONS = ("float32", "bfloat16", "int8")
MEASURED_BATCHES = (1, 8)
EAGER_REVISION = 3  # 2: GEMM measured faster, freed memory retained; 3: channels-last embedding weights (fused.py)
# 3: the layout names every field that changes compute (padding, qkv_bias, global_pool), eager records name the
# GEMM engine, eager and ONNX Runtime are timed at the same thread count, int8 and bfloat16 have records of their own.
RECORD_REVISION = 3

# What reduced precision measured on a CPU without the instructions for it (docs/performance.md, `cvt bench`):
# quoted when such a CPU asks for it and nothing was measured on the machine itself.
MEASURED_WITHOUT_FLAGS = {
    "int8": "0.75x at batch 1 and 0.74x at batch 8 (ONNX Runtime dynamic int8 against its float32) on an AVX2 AMD EPYC Zen 3",
    "bfloat16": "0.19x at batch 1 and 0.17x at batch 8 (CPU autocast against float32) on an AVX2 AMD EPYC Zen 3",
}
NEEDS = {"int8": INT8_FLAGS, "bfloat16": BF16_FLAGS}


def _onnxruntime_installed() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """The concrete backends this installation can run (``"auto"`` picks among them)."""
    return ["eager"] + (["onnxruntime"] if _onnxruntime_installed() else [])


def _check_choice(backend: str, precision: str = "float32") -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_backend(backend: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[str, str]:
    """``(backend, reason)`` decidable without measuring; ``"auto"`` stays ``"auto"`` where a measurement decides.

    A one-line ConfigError for a backend that cannot run here.
    """
    _check_choice(backend)
    device = torch.device(device)
    if backend == "eager":
        return backend, "asked for"
    if backend == "onnxruntime":
        if not _onnxruntime_installed():
            raise ConfigError("backend 'onnxruntime' needs onnxruntime: pip install 'torchcvt[export]'")
        if device.type != "cpu":
            raise ConfigError(f"backend 'onnxruntime' runs on the CPU; got device {device}")
        if dtype != torch.float32:
            raise ConfigError(f"backend 'onnxruntime' runs float32 only, got dtype {str(dtype).removeprefix('torch.')}")
        return backend, "asked for"
    if not _onnxruntime_installed():
        return "eager", "onnxruntime is not installed"
    if device.type != "cpu":
        return "eager", f"ONNX Runtime runs on the CPU only, the model is on {device}"
    if dtype != torch.float32:
        return "eager", f"ONNX Runtime runs float32 only, the model is {str(dtype).removeprefix('torch.')}"
    return "auto", "measured on this machine"


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d tensors (num_batches_tracked) too
    return h.hexdigest()


def onnxruntime_session(path: str | os.PathLike, threads: int):
    """An ONNX Runtime CPU session on ``path``: ``threads`` intra-op threads, one inter-op thread, spinning off.

    Without spinning, idle ONNX Runtime threads sleep instead of busy-waiting for the next op, so they
    do not take the CPU from torch or other work in the process (``cvt serve`` runs both).
    """
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _quantize_int8(source: Path, target: Path) -> None:
    """ONNX Runtime's dynamic int8 quantization of ``source`` (weights int8, activations quantized per call)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    logger.info("quantizing the ONNX file to int8 once for these weights: %s", target)
    atomic_save(lambda tmp: quantize_dynamic(source, tmp, weight_type=QuantType.QInt8), target)


class OnnxRuntimeModel:
    """A CvT exported to ONNX and run by ONNX Runtime: ``runner(pixels) -> logits`` (torch tensors).

    The export has a free batch size; height and width are free too where the layout allows it at
    the model's size (``export.min_dynamic_side``), else one file per input size is exported on demand.
    ``precision="int8"``: the exported file quantized by ONNX Runtime (dynamic int8), cached beside it.
    Built directly it does not check whether int8 pays off; ``optimize_for_inference`` does.
    """

    backend = "onnxruntime"

    def __init__(self, model: CvT, *, threads: int | None = None, directory: str | os.PathLike | None = None,
                 precision: str = "float32") -> None:
        import onnxruntime

        if precision not in ("float32", "int8"):
            raise ConfigError(f"backend 'onnxruntime' runs float32 or int8, got precision {precision!r}")
        self.config = model.config
        self.precision = precision
        self._model = model.eval()
        self._threads = threads or torch.get_num_threads()
        self._directory = Path(directory) if directory is not None else cache_dir() / "onnx"
        self._key = f"{weights_hash(model)[:32]}-torch{torch.__version__.split('+')[0]}-torchcvt{__version__}"
        self._dynamic_hw = model.config.image_size >= min_dynamic_side(model.config)
        self._sessions: dict[tuple[int, int] | None, onnxruntime.InferenceSession] = {}
        self._session(self.config.image_size, self.config.image_size)  # export (or find) now, not at the first call

    def _session(self, height: int, width: int):
        key = None if self._dynamic_hw else (height, width)
        if key in self._sessions:
            return self._sessions[key]
        name = f"{self._key}.onnx" if key is None else f"{self._key}-{height}x{width}.onnx"
        path = self._directory / name
        if not path.is_file():
            logger.info("exporting the model to ONNX once for these weights: %s", path)
            if key is None:
                export_onnx(self._model, path, dynamic=True)
            else:
                self.config.feature_sizes(height, width)  # a one-line error for an input too small
                export_onnx(self._model, path, image_size=(height, width), dynamic="batch")
        if self.precision == "int8":
            source, path = path, path.with_name(path.stem + "-int8.onnx")
            if not path.is_file():
                _quantize_int8(source, path)
        session = onnxruntime_session(path, self._threads)
        self._sessions[key] = session
        self.path = path
        return session

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if pixels.ndim != 4 or pixels.shape[1] != self.config.num_channels:
            raise ValueError(f"expected pixels [B, {self.config.num_channels}, H, W], got shape {list(pixels.shape)}")
        x = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        session = self._session(int(x.shape[2]), int(x.shape[3]))
        return torch.from_numpy(session.run(["logits"], {"pixel_values": x})[0])

    def __repr__(self) -> str:
        return f"OnnxRuntimeModel({getattr(self, 'path', '?')}, threads={self._threads}, precision={self.precision})"


class AutocastModel:
    """``model`` run under CPU autocast (bfloat16 matrix products and convolutions); float32 logits out."""

    backend = "eager"

    def __init__(self, model: CvT, dtype: torch.dtype = torch.bfloat16) -> None:
        self.model, self.dtype, self.config = model, dtype, model.config
        self.precision = str(dtype).removeprefix("torch.")

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast("cpu", dtype=self.dtype):
            return self.model(pixels).float()

    def __repr__(self) -> str:
        return f"AutocastModel({type(self.model).__name__}, dtype={self.precision})"


# ------------------------------------------------------------------------ measuring on this machine
# Config fields that change no computation at inference: dropout and drop path are off in eval mode, the
# epsilon's value costs nothing, label names are names. Every other field (new ones too) is in the layout.
NOT_LAYOUT = ("attention_drop_rate", "drop_rate", "drop_path_rate", "layer_norm_eps", "id2label")


def layout_of(config: CvTConfig) -> dict:
    """The fields of a config that decide its speed (not its weights or label names), for measurement records."""
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in dataclasses.fields(config) if f.name not in NOT_LAYOUT}


def measurement_key(config: CvTConfig, threads: int, *, eager: bool, onnxruntime: bool) -> tuple[str, dict]:
    """``(key, description)`` of a record measuring ``config``'s layout at ``threads`` threads.

    ``eager``: the eager path is timed, so the key names its revision and the GEMM engine its linears
    run on at that thread count (``fastpath.gemm_engine()``); ``onnxruntime``: ONNX Runtime is timed,
    so the key names its version. ``RECORD_REVISION`` makes records of older torchcvt versions measured again.
    """
    layout = {**layout_of(config), "revision": RECORD_REVISION}
    if eager:
        with torch_threads(threads):
            layout |= {"eager": EAGER_REVISION, "gemm": gemm_engine()}
    return record_key(layout, threads, onnxruntime=onnxruntime)


def measure_speedups(candidates: dict[str, Callable[[torch.Tensor], torch.Tensor]], reference: str, image_size: int,
                     batches: tuple[int, ...] = MEASURED_BATCHES) -> dict[str, dict[str, float]]:
    """``{name: {batch: speed-up over reference}}``, timed alternately (8 rounds at batch 1, 3 above) on random pixels."""
    result: dict[str, dict[str, float]] = {name: {} for name in candidates if name != reference}
    for batch in batches:
        x = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            times = time_alternating({k: (lambda f=f: f(x)) for k, f in candidates.items()}, repeats=8 if batch == 1 else 3)
        for name in result:
            result[name][str(batch)] = round(median_ratio(times[reference], times[name]), 3)
    return result


def _speeds(ratios: dict[str, float]) -> str:
    return ", ".join(f"{r:.2f}x at batch {b}" for b, r in ratios.items())


def _auto(model: CvT, threads: int, options: dict) -> tuple[Callable, str]:
    """The faster of eager and ONNX Runtime for this layout here (measured once, then read from the record)."""
    key, description = measurement_key(model.config, threads, eager=True, onnxruntime=True)
    record = read_record(key) or {}
    eager = ort = None
    if "onnxruntime" not in record:
        logger.info("backend auto: timing eager against onnxruntime once for this CPU and layout (export, then ~10 s)")
        eager, ort = fuse_for_inference(model), OnnxRuntimeModel(model, threads=threads, **options)
        with torch_threads(threads):  # eager at the thread count ONNX Runtime runs at
            record = {"onnxruntime": measure_speedups({"eager": eager, "onnxruntime": ort}, "eager", model.config.image_size)["onnxruntime"]}
        update_record(key, description, record)
    ratios = record["onnxruntime"]
    # ONNX Runtime when it is faster on the geometric mean of batch 1 and 8; eager on a tie (it needs no export).
    name = "onnxruntime" if statistics.geometric_mean(ratios.values()) > 1.0 else "eager"
    reason = (f"onnxruntime ran {_speeds(ratios)} against eager on {cpu_info().name} with {threads} threads, "
              f"measured {record.get('measured', 'now')} ({measurements_path()})")
    if name == "onnxruntime":
        runner = ort if ort is not None else OnnxRuntimeModel(model, threads=threads, **options)
    else:
        runner = eager if eager is not None else fuse_for_inference(model)
    return runner, reason


def _reduced_runner(model: CvT, precision: str, threads: int, options: dict) -> Callable:
    if precision == "int8":
        return OnnxRuntimeModel(model, threads=threads, precision="int8", **options)
    return AutocastModel(fuse_for_inference(model), torch.bfloat16)


def _reduced(model: CvT, backend: str, precision: str, threads: int, options: dict) -> Callable:
    """The ``precision`` runner where this CPU has the instructions and it measured faster; else a ConfigError.

    The stored verdict is read first: the runner (an export, a quantization) is built only to be timed
    or returned, never for a refusal.
    """
    cpu = cpu_info()
    needs = NEEDS[precision]
    if not cpu.has_any(needs):
        raise ConfigError(f"{precision} is slower than float32 on this CPU ({cpu.name}, no {'/'.join(needs)}): "
                          f"{MEASURED_WITHOUT_FLAGS[precision]}; use --precision float32")
    int8 = precision == "int8"  # int8 against ONNX Runtime float32; bfloat16 against the eager backend
    key, description = measurement_key(model.config, threads, eager=not int8, onnxruntime=int8)
    record = read_record(key) or {}
    reduced = None
    if precision not in record:
        logger.info("%s: timing it against float32 once for this CPU and layout", precision)
        reduced = _reduced_runner(model, precision, threads, options)
        fp32 = OnnxRuntimeModel(model, threads=threads, **options) if int8 else reduced.model
        with torch_threads(threads):
            record = {precision: measure_speedups({"float32": fp32, precision: reduced}, "float32", model.config.image_size)[precision]}
        update_record(key, description, record)
    if min(record[precision].values()) <= 1.0:
        raise ConfigError(f"{precision} is slower than float32 on this CPU ({cpu.name}): {_speeds(record[precision])} "
                          f"measured {record.get('measured', 'now')}; use --precision float32")
    logger.info("precision %s on %s: %s float32 (%s)", precision, backend, _speeds(record[precision]), measurements_path())
    return reduced if reduced is not None else _reduced_runner(model, precision, threads, options)


def optimize_for_inference(model: CvT, backend: str = "auto", *, precision: str = "float32",
                           **options) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable from normalised ``[B, C, H, W]`` float pixels to logits, on the chosen backend.

    ``"eager"``: a fused CvT copy (``fused.fuse_for_inference``), same logits within 1e-4.
    ``"onnxruntime"``: an ``OnnxRuntimeModel`` (options: ``threads``, ``directory``), same top-k.
    ``"auto"``: measured once per machine and layout (module docstring); a log line says which.
    ``precision``: ``"float32"``, or ``"int8"`` / ``"bfloat16"`` where they measure faster (else a ConfigError).
    """
    if not isinstance(model, CvT):
        raise TypeError(f"optimize_for_inference expects a torchcvt CvT, got {type(model).__name__}")
    _check_choice(backend, precision)
    if backend == "eager" and options:
        raise ConfigError(f"backend 'eager' takes no options, got {sorted(options)}")
    param = next(model.parameters())
    if precision == "int8":
        backend = "onnxruntime" if backend == "auto" else backend
        if backend != "onnxruntime":
            raise ConfigError("precision int8 runs on the onnxruntime backend (ONNX Runtime's dynamic quantization)")
    elif precision == "bfloat16":
        backend = "eager" if backend == "auto" else backend
        if backend != "eager":
            raise ConfigError("precision bfloat16 runs on the eager backend (PyTorch's CPU autocast)")
    name, reason = resolve_backend(backend, param.device, param.dtype)
    threads = options.pop("threads", None) or torch.get_num_threads()
    retain_freed_memory()  # no page faults for activations on every call (allocator.retain_freed_memory)
    if precision != "float32":
        if param.device.type != "cpu" or param.dtype != torch.float32:
            raise ConfigError(f"precision {precision} converts a float32 CPU model, got {param.dtype} on {param.device}")
        return _reduced(model, name, precision, threads, options)
    if name == "auto":
        runner, reason = _auto(model, threads, options)
        name = backend_of(runner)
    else:
        runner = OnnxRuntimeModel(model, threads=threads, **options) if name == "onnxruntime" else fuse_for_inference(model)
    if backend == "auto":
        logger.info("backend auto: %s (%s)", name, reason)
    return runner


def describe_backend(runner: Callable) -> str:
    """A short description for logs: the backend name and, for ONNX Runtime, the cached file."""
    if isinstance(runner, OnnxRuntimeModel):
        return f"onnxruntime ({getattr(runner, 'path', 'not exported yet')}, {runner.precision})"
    if isinstance(runner, AutocastModel):
        return f"eager ({runner.precision} autocast)"
    return "eager"


def backend_of(runner: Callable) -> str:
    """The concrete backend a runner from ``optimize_for_inference`` runs on."""
    return "onnxruntime" if isinstance(runner, OnnxRuntimeModel) else "eager"


def inference_runner(model: CvT, backend: str | None = None, precision: str = "float32", *,
                     copy: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """What ``Classifier``, ``cvt predict``, ``cvt eval`` and ``cvt serve`` run:
    ``optimize_for_inference(model, backend, precision=precision)``, except for the eager float32 backend
    with ``copy=False`` or off the CPU, where it is the model itself (a model its caller may still change).

    ``backend=None``: the backend the precision runs on (eager; onnxruntime for int8). On the CPU the
    eager runner is ``fuse_for_inference``'s copy: 1.06-1.09x the model's speed on CvT-13 (docs/performance.md row 23),
    for a second copy of the weights.
    """
    backend = backend or ("onnxruntime" if precision == "int8" else "eager")
    param = next(model.parameters())
    fused_copy = copy and param.device.type == "cpu" and param.dtype == torch.float32
    if precision == "float32" and not fused_copy and resolve_backend(backend, param.device, param.dtype)[0] == "eager":
        retain_freed_memory()  # as optimize_for_inference does: most of its gain here (docs/performance.md)
        return model
    return optimize_for_inference(model, backend, precision=precision)


# ------------------------------------------------------------------------------------------ CLI
def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend`` and ``--precision``, shared by the commands that classify (predict, eval)."""
    parser.add_argument("--backend", default=None, choices=BACKENDS,
                        help="inference backend: eager (PyTorch; the default, it starts at once), onnxruntime (exported "
                             "once per weights and cached; CPU, float32/int8; the default for --precision int8) or auto "
                             "(the faster of the two on this machine, measured once per CPU and layout)")
    parser.add_argument("--precision", default="float32", choices=PRECISIONS,
                        help="float32 (default); int8 (onnxruntime) or bfloat16 (eager) only on CPUs where they measure "
                             "faster (with avx512_vnni/avx_vnni/amx_int8, avx512_bf16/amx_bf16); elsewhere the command "
                             "says why and stops")


def log_backend_choice(args: argparse.Namespace) -> None:
    """Show torchcvt's log lines on stderr (which backend "auto" chose and why, the export) when one may print."""
    if args.backend not in (None, "eager") or args.precision != "float32":
        if not logger.handlers and not logging.getLogger().handlers:
            handler = logging.StreamHandler()
            handler.setFormatter(logging.Formatter("%(message)s"))
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)
