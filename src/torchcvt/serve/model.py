"""The served model: a ``Classifier`` plus what the server needs around it.

Bytes in (an uploaded file), pixels out: the image's size is read from its header and checked
against ``max_pixels`` before anything is decoded, then the weights' own evaluation transform
(``Classifier.preprocess``) makes the ``[3, S, S]`` tensor. Batches of such tensors become
softmax probabilities on the inference backend (``forward``); the top-k rows are shaped like
``cvt predict --format json``; the attention overlay is a PNG of the last stage's cls-token
attention over the crop the model saw.

``forward`` and ``attention_png`` run model code: the server calls them from its one model thread.
``decode`` is pure image work and runs in the request threads.
"""

from __future__ import annotations

import io
import re

import numpy as np
import torch
from PIL import Image

from ..attention_maps import cls_attention, overlay, upsample
from ..inference import Classifier, best_k, json_top_k
from ..transforms import denormalize

# 50 Mpx: above a phone camera's default photo (12-50 Mpx), below Pillow's 89 Mpx decompression-bomb
# warning; one such RGB image is 150 MB decoded, so the limit also bounds the decoders' memory.
DEFAULT_MAX_PIXELS = 50_000_000


def model_name_for(source: str) -> str:
    """A URL-safe model name from a weights argument: ``cvt-13``, ``runs/digits`` -> ``digits``."""
    base = re.split(r"[\\/]", str(source).rstrip("/\\"))[-1] or "model"
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-.") or "model"


class ModelService:
    """One model behind the server: name, labels, input size, and the three steps of a request."""

    def __init__(self, classifier: Classifier, name: str) -> None:
        self.classifier = classifier
        self.name = name
        self.labels = classifier.labels
        self.image_size = classifier.preprocess_config.image_size
        self.has_attention = self._attention_grid() not in (None, (1, 1))

    def _attention_grid(self) -> tuple[int, int] | None:
        """The key grid of the last block's cls-token attention at the input size; None without a
        cls token. A 1x1 grid (small inputs, e.g. the 32 px digits model) has nothing to show."""
        if not self.classifier.model.config.cls_token[-1]:
            return None
        maps, _ = cls_attention(self.classifier.model, torch.zeros(3, self.image_size, self.image_size))
        return tuple(maps.shape[-2:])

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def backend(self) -> str:
        return self.classifier.backend

    def decode(self, data: bytes, name: str) -> torch.Tensor:
        """An encoded image file -> the normalised float32 ``[3, S, S]`` tensor the model sees: decoded once,
        after its header was checked against the classifier's ``max_pixels`` (``--max-pixels``)."""
        return self.classifier.preprocess(data, name)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Softmax probabilities ``[B, num_classes]`` (float32, CPU) of a ``[B, 3, S, S]`` batch."""
        return self.classifier.probabilities(pixels).cpu()

    def top_k(self, probabilities: torch.Tensor, k: int) -> list[list[dict]]:
        """Per row, the best ``k`` classes as ``cvt predict --format json`` lists them."""
        return [json_top_k(row) for row in self.classifier.ranked(best_k(probabilities, k))]

    @torch.inference_mode()
    def attention_png(self, pixels: torch.Tensor) -> bytes:
        """A PNG of the crop the model saw with its cls-token attention (mean over heads) laid over it."""
        c = self.classifier
        maps, _ = cls_attention(c.model, pixels)  # [heads, h, w]
        size = (pixels.shape[-2], pixels.shape[-1])
        heat = upsample(maps.mean(dim=0, keepdim=True).cpu(), size)[0].numpy()
        pre = c.preprocess_config
        rgb = denormalize(pixels.float().cpu(), pre.mean, pre.std).permute(1, 2, 0).numpy()
        blended = np.clip(np.round(overlay(rgb, heat) * 255), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(blended).save(buffer, format="PNG")
        return buffer.getvalue()
