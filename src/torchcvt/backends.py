"""Inference backends behind one call: a CvT in, a callable from pixels to logits out.

    runner = torchcvt.optimize_for_inference(model, backend="onnxruntime")
    logits = runner(pixels)   # normalised float32 [B, 3, H, W] -> [B, num_classes]

* ``"eager"``: PyTorch, with the fast path's inference fusions (``fastpath.fuse_for_inference``:
  BatchNorm and scale folded, epilogues fused); the result is a ``CvT`` copy, so every model method
  works on it too.
* ``"onnxruntime"``: the model is exported once to ONNX (``export.export_onnx``) and run by ONNX
  Runtime's CPU provider. The file is cached per weights, under a content hash of the config and every
  tensor (``cache_dir()``: ``$TORCHCVT_CACHE``, else ``$XDG_CACHE_HOME/torchcvt``, else
  ``~/.cache/torchcvt``), so the export cost (seconds for CvT-13) is paid by the first call for those
  weights only. Intra-op threads follow ``torch.get_num_threads()``; spinning is off, so ONNX Runtime's
  idle threads do not steal the CPU from torch or from other work in the same process.
* ``"auto"``: the fastest backend available for this machine (``resolve_backend`` says which and why).

``available_backends()`` lists what this installation can run.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ConfigError
from .export import export_onnx, min_dynamic_side
from .fastpath import fuse_for_inference
from .model import CvT
from .version import __version__

logger = logging.getLogger("torchcvt")

BACKENDS = ("auto", "eager", "onnxruntime")


def _onnxruntime_installed() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def available_backends() -> list[str]:
    """The concrete backends this installation can run (``"auto"`` picks among them)."""
    return ["eager"] + (["onnxruntime"] if _onnxruntime_installed() else [])


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> tuple[str, str]:
    """``(concrete backend, reason)`` for a requested backend on a device; a one-line error if impossible."""
    if backend not in BACKENDS:
        raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    device = torch.device(device)
    if backend == "onnxruntime":
        if not _onnxruntime_installed():
            raise ConfigError("backend 'onnxruntime' needs onnxruntime: pip install 'torchcvt[export]'")
        if device.type != "cpu":
            raise ConfigError(f"backend 'onnxruntime' runs on the CPU; got device {device}")
        return backend, "asked for"
    if backend == "eager":
        return backend, "asked for"
    return "eager", "the default until a faster backend is measured for this CPU"


def cache_dir() -> Path:
    """Where exported files are cached (``$TORCHCVT_CACHE``, ``$XDG_CACHE_HOME/torchcvt``, ``~/.cache/torchcvt``)."""
    if os.environ.get("TORCHCVT_CACHE"):
        return Path(os.environ["TORCHCVT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "torchcvt"


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 of the model's config and every tensor of its state dict (names, dtypes, shapes, bytes)."""
    h = hashlib.sha256(model.config.to_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-d tensors (num_batches_tracked) too
    return h.hexdigest()


class OnnxRuntimeModel:
    """A CvT exported to ONNX and run by ONNX Runtime: ``runner(pixels) -> logits`` (torch tensors).

    The export has a free batch size; height and width are free too where the layout allows it at
    the model's size (``export.min_dynamic_side``), else one file per input size is exported on demand.
    """

    backend = "onnxruntime"

    def __init__(self, model: CvT, *, threads: int | None = None, directory: str | os.PathLike | None = None) -> None:
        import onnxruntime

        self.config = model.config
        self._model = model.eval()
        self._threads = threads or torch.get_num_threads()
        self._directory = Path(directory) if directory is not None else cache_dir() / "onnx"
        self._key = f"{weights_hash(model)[:32]}-torch{torch.__version__.split('+')[0]}-torchcvt{__version__}"
        self._dynamic_hw = model.config.image_size >= min_dynamic_side(model.config)
        self._sessions: dict[tuple[int, int] | None, onnxruntime.InferenceSession] = {}
        self._session(self.config.image_size, self.config.image_size)  # export (or find) now, not at the first call

    def _session(self, height: int, width: int):
        import onnxruntime

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
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = self._threads
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
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
        return f"OnnxRuntimeModel({getattr(self, 'path', '?')}, threads={self._threads})"


def optimize_for_inference(model: CvT, backend: str = "eager", **options) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable from normalised ``[B, C, H, W]`` float pixels to logits, on the chosen backend.

    ``"eager"``: a fused CvT copy (``fastpath.fuse_for_inference``), same logits within 1e-4.
    ``"onnxruntime"``: an ``OnnxRuntimeModel`` (options: ``threads``, ``directory``), same top-k.
    ``"auto"``: ``resolve_backend`` picks; a log line says which.
    """
    if not isinstance(model, CvT):
        raise TypeError(f"optimize_for_inference expects a torchcvt CvT, got {type(model).__name__}")
    device = next(model.parameters()).device
    name, reason = resolve_backend(backend, device)
    if backend == "auto":
        logger.info("backend auto: %s (%s)", name, reason)
    if name == "onnxruntime":
        return OnnxRuntimeModel(model, **options)
    if options:
        raise ConfigError(f"backend 'eager' takes no options, got {sorted(options)}")
    return fuse_for_inference(model)


def describe_backend(runner: Callable) -> str:
    """A short description for logs: the backend name and, for ONNX Runtime, the cached file."""
    if isinstance(runner, OnnxRuntimeModel):
        return f"onnxruntime ({getattr(runner, 'path', 'not exported yet')})"
    return "eager"

