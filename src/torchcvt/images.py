"""Decoding: any image input (a path, encoded bytes, a PIL image, an array, a tensor) -> an RGB PIL image.

``load_image`` decodes and converts to RGB as transformers' ``load_image`` does (its image-classification
pipeline passes every input through it): EXIF orientation, then Pillow's ``convert("RGB")``, which drops
alpha. Every failure is one ``ImageError`` line naming the input. ``image_extensions``/``is_image_file``
say which file names ``cvt train`` and ``cvt predict`` take. Preprocessing (resize, crop, normalise) is
``transforms.py``.

Where transformers gives no usable answer we choose, and say so:

* 16-bit modes (``I;16*``) are scaled to 8 bits with ``round(v / 257)`` (the inverse of the usual
  ``v * 257`` expansion, so an 8-bit image stored as 16-bit comes back unchanged); ``I`` images are
  clipped to 0..65535 first, because Pillow uses ``I`` for 16-bit PPM and TIFF files. Pillow's
  ``convert`` (and so transformers) clips these at 255, turning most 16-bit photos white.
* ``F`` images whose values all lie within 0..1 are taken as 0..1 and become ``round(v * 255)``;
  otherwise they are taken as 0..255 and converted by Pillow (clip and truncate), as transformers does.
  Pillow's ``convert`` would truncate 0..1 data to black.
* Float arrays and tensors must lie in 0..1 and become ``round(v * 255)``, so that
  ``u8 / 255`` reproduces ``u8`` exactly.
* Images over ``max_pixels`` (default Pillow's ~89 Mpx bomb threshold; 0: no limit) are refused from
  the header: a 420 KB PNG can hold 12000x12000 pixels, 1.4 GB decoded.
"""

from __future__ import annotations

import functools
import io
import os
import threading
import warnings
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

ImageSource = Union[str, os.PathLike, bytes, Image.Image, np.ndarray, torch.Tensor]

# Channel counts an array or tensor may have: grey, RGB, RGBA.
_CHANNEL_COUNTS = (1, 3, 4)
_PILLOW_LIMIT = threading.Lock()  # guards Pillow's global limit and the warning filters around Image.open


def load_image(source: ImageSource, *, max_pixels: int | None = None, name: str | None = None) -> Image.Image:
    """Decode ``source`` into an RGB PIL image, or raise ``ImageError`` with a one-line reason.

    Accepts a path, the bytes of an encoded file (``name`` in messages), a PIL image, an ``HxWxC``/``HxW`` NumPy array, or a ``CxHxW``/``HxWxC``/``HxW``
    tensor (uint8 0..255 or float 0..1; C = 1, 3 or 4). EXIF orientation is applied, as
    transformers' ``load_image`` does for files and PIL images alike. Images of more than
    ``max_pixels`` pixels are refused before decoding (None: Pillow's ``Image.MAX_IMAGE_PIXELS``, whose
    warning never shows; 0: no limit).
    """
    max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels or None  # from here, None: no limit
    if isinstance(source, (str, os.PathLike)):
        return _load_file(Path(source), max_pixels)
    if isinstance(source, bytes):  # an encoded file that never touched the disk (an upload)
        return _load_file(io.BytesIO(source), max_pixels, name or "<bytes>")
    if isinstance(source, Image.Image):
        return _decoded(source, getattr(source, "filename", "") or "<PIL image>", max_pixels)
    if isinstance(source, torch.Tensor):
        return _decoded(_tensor_to_pil(source), "<tensor>", max_pixels)
    if isinstance(source, np.ndarray):
        return _decoded(_array_to_pil(source, "<array>"), "<array>", max_pixels)
    raise ImageError(
        f"unsupported image input {type(source).__name__}: expected a path, a PIL image, "
        "a NumPy array or a torch tensor"
    )


@functools.cache
def image_extensions() -> frozenset[str]:
    """File suffixes that Pillow can open here (``.jpg``, ``.png``, ``.webp``, ``.tif``, ...), lower case.

    Read once per process: register extra Pillow plugins (such as pillow-heif) before the first call.
    """
    return frozenset(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def is_image_file(path: str | os.PathLike) -> bool:
    """Whether a folder walk takes ``path``: a visible name (not ``.*``, which includes macOS ``._x.jpg``
    resource forks) with a suffix Pillow can open. Training data and ``cvt predict`` both use it."""
    path = Path(path)
    return not path.name.startswith(".") and path.suffix.lower() in image_extensions()


def _load_file(source: Path | io.BytesIO, max_pixels: int | None, name: str | None = None) -> Image.Image:
    name = name or source
    if isinstance(source, io.BytesIO):
        problem = "empty file" if not source.getbuffer().nbytes else None
    else:
        problem = "no such file" if not source.exists() else "is a directory" if source.is_dir() else (
            "empty file" if source.stat().st_size == 0 else None)
    if problem:
        raise ImageError(f"{name}: cannot read image: {problem}")
    try:
        img = _open_header(source, name, max_pixels)
    except ImageError:
        raise
    except Exception as exc:
        raise ImageError(f"{name}: cannot read image: {_reason(exc)}") from exc
    with img:
        return _decoded(img, name, max_pixels)


def _open_header(source: Path | io.BytesIO, name: object, max_pixels: int | None) -> Image.Image:
    """``Image.open`` (the header only) with our limit in place of Pillow's: its warning is silenced,
    and its refusal past twice its limit is lifted when ``max_pixels`` allows more."""
    with _PILLOW_LIMIT, warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        pillow = Image.MAX_IMAGE_PIXELS
        if pillow is not None and (max_pixels is None or max_pixels > 2 * pillow):
            Image.MAX_IMAGE_PIXELS = None
        try:
            return Image.open(source)
        except Image.DecompressionBombError:
            raise ImageError(_too_large(name, f"over {2 * pillow:,} pixels", max_pixels)) from None
        finally:
            Image.MAX_IMAGE_PIXELS = pillow


def _too_large(name: object, size: str, max_pixels: int) -> str:
    return (f"{name}: refused before decoding: {size}, over the limit of {max_pixels:,} (too large: the limit "
            "guards against decompression bombs); if you trust the file, raise it with --max-pixels N (max_pixels=N in Python)")


def _decoded(img: Image.Image, name: object, max_pixels: int | None) -> Image.Image:
    """Fully decoded, upright, RGB copy of ``img``; every failure becomes a one-line ImageError."""
    width, height = img.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageError(_too_large(name, f"{width}x{height} = {width * height:,} pixels", max_pixels))
    try:
        # Pillow decodes lazily; load() here makes truncation and corruption fail now, not mid-resize.
        img.load()
        return _to_rgb(ImageOps.exif_transpose(img))
    except Exception as exc:
        # Pillow's decoders raise many types for bad data (OSError, SyntaxError, EOFError, struct.error, ...).
        raise ImageError(f"{name}: cannot read image: {_reason(exc)}") from exc


def _reason(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image, or a format Pillow cannot read"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror  # without the "[Errno N]" prefix and the repeated path
    return " ".join(str(exc).split()) or type(exc).__name__


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB as transformers' load_image makes it, with 16-bit and float modes scaled to 8 bits first."""
    if img.mode == "I" or img.mode.startswith("I;16"):
        values = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        # (v + 128) // 257 == round(v / 257) exactly: 257 is odd, so there are no ties.
        img = Image.fromarray(((values + 128) // 257).astype(np.uint8))
    elif img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        finite = values[np.isfinite(values)]
        if finite.size == 0 or finite.max() <= 1.0:
            unit = np.clip(np.nan_to_num(values, nan=0.0), 0.0, 1.0)
            img = Image.fromarray(np.round(unit * 255).astype(np.uint8))
    return img if img.mode == "RGB" else img.convert("RGB")


def _tensor_to_pil(tensor: torch.Tensor) -> Image.Image:
    t = tensor.detach().cpu()
    if t.is_floating_point():
        t = t.to(torch.float32)  # NumPy has no bfloat16
    if t.ndim == 3 and t.shape[0] in _CHANNEL_COUNTS:
        # CxHxW is the torch convention and wins when both readings are possible.
        t = t.permute(1, 2, 0)
    elif not (t.ndim == 2 or (t.ndim == 3 and t.shape[-1] in _CHANNEL_COUNTS)):
        raise ImageError(f"<tensor>: expected a CxHxW, HxWxC (C = 1, 3 or 4) or HxW tensor, got shape {tuple(tensor.shape)}")
    return _array_to_pil(t.numpy(), "<tensor>")


def _array_to_pil(arr: np.ndarray, name: str) -> Image.Image:
    """An ``HxW`` or ``HxWxC`` uint8 (0..255) or float (0..1) array as an L, RGB or RGBA image."""
    if not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[-1] in _CHANNEL_COUNTS)) or 0 in arr.shape:
        raise ImageError(f"{name}: expected an HxWxC (C = 1, 3 or 4) or HxW image, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageError(f"{name}: float pixels must lie in 0..1, got {np.nanmin(arr)}..{np.nanmax(arr)}")
        arr = np.round(arr * 255).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise ImageError(f"{name}: expected dtype uint8 (0..255) or float (0..1), got {arr.dtype}")
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return Image.fromarray(np.ascontiguousarray(arr))
