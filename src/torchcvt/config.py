"""CvTConfig: one frozen, validated object that describes any CvT layout.

Field names and meanings follow transformers' ``CvtConfig`` so that our ``config.json`` is the
file transformers reads. Per-stage fields are tuples with one entry per stage; any number of
stages is allowed.

Differences from transformers, on purpose:

* ``hidden_act`` chooses the MLP activation. ``"quick_gelu"`` (``x * sigmoid(1.702 x)``) is what the
  official microsoft/CvT weights were trained with and is the default; ``"gelu"`` is what
  transformers' port computes (it hard-codes ``nn.GELU``), offered for bit-for-bit agreement with it.
* ``layer_norm_eps`` is read by the model (transformers declares it but every LayerNorm of its
  port uses 1e-5). When we read a transformers ``config.json`` we therefore ignore its value unless
  torchcvt wrote the file.
* ``num_classes``, ``image_size``, ``id2label`` and ``global_pool`` live here too, so a config
  describes a whole classifier.
* ``num_channels`` is transformers' name for the input channels (it is the ``config.json`` key);
  ``create_model`` and ``CvT(...)`` call the same number ``in_chans``, timm's name.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_text
from .version import __version__

__version_marker__ = "torchcvt_version"

PROJECTION_METHODS = ("dw_bn", "avg", "linear")
ACTIVATIONS = ("quick_gelu", "gelu")
# What the classifier reads: "token" the last stage's cls token, "avg" the mean of its spatial tokens,
# "" every token unpooled (the head, if any, then classifies each token). None: what the official
# model does, "token" with a cls token in the last stage and "avg" without.
GLOBAL_POOLS = ("token", "avg", "")

# Per-stage fields in transformers' order, with the Python type of one entry.
STAGE_FIELDS: dict[str, type] = {
    "patch_sizes": int,
    "patch_stride": int,
    "patch_padding": int,
    "embed_dim": int,
    "num_heads": int,
    "depth": int,
    "mlp_ratio": float,
    "attention_drop_rate": float,
    "drop_rate": float,
    "drop_path_rate": float,
    "qkv_bias": bool,
    "cls_token": bool,
    "qkv_projection_method": str,
    "kernel_qkv": int,
    "padding_kv": int,
    "stride_kv": int,
    "padding_q": int,
    "stride_q": int,
}


@dataclass(frozen=True)
class CvTConfig:
    """Architecture and head of a CvT model. Defaults are CvT-13 at 224x224 with 1000 classes.

    Per-stage fields (one entry per stage):
        patch_sizes, patch_stride, patch_padding: the convolutional token embedding of each stage.
        embed_dim: channels of each stage. num_heads: attention heads (must divide embed_dim).
        depth: transformer blocks per stage. mlp_ratio: MLP hidden width / embed_dim.
        attention_drop_rate: dropout on attention probabilities. drop_rate: dropout after the
            embedding and on the attention/MLP outputs. drop_path_rate: the stage's maximum
            stochastic-depth rate; block j of a stage of depth d uses ``rate * j / (d - 1)``.
        qkv_bias: bias of the q/k/v linear projections. cls_token: whether the stage carries a
            classification token (CvT: only the last one); it bypasses the convolutions.
        qkv_projection_method: ``"dw_bn"`` (depthwise conv + BatchNorm), ``"avg"`` (average
            pooling for k/v, none for q) or ``"linear"`` (no convolutional projection).
        kernel_qkv, padding_q, stride_q, padding_kv, stride_kv: the projection convolutions.
    Whole-model fields:
        num_channels: input channels (``in_chans`` in create_model and CvT()). num_classes:
            classifier outputs (0: no head, a backbone).
        image_size: the resolution the weights were trained for (inputs may have any size).
        hidden_act: ``"quick_gelu"`` (official) or ``"gelu"`` (transformers' port).
        layer_norm_eps: epsilon of every LayerNorm (official: 1e-5).
        id2label: class names, ``{index: name}``, or None.
        global_pool: ``"token"``, ``"avg"``, ``""`` or None (the official choice); see ``GLOBAL_POOLS``.
    """

    num_channels: int = 3
    patch_sizes: tuple[int, ...] = (7, 3, 3)
    patch_stride: tuple[int, ...] = (4, 2, 2)
    patch_padding: tuple[int, ...] = (2, 1, 1)
    embed_dim: tuple[int, ...] = (64, 192, 384)
    num_heads: tuple[int, ...] = (1, 3, 6)
    depth: tuple[int, ...] = (1, 2, 10)
    mlp_ratio: tuple[float, ...] = (4.0, 4.0, 4.0)
    attention_drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_rate: tuple[float, ...] = (0.0, 0.0, 0.0)
    drop_path_rate: tuple[float, ...] = (0.0, 0.0, 0.1)
    qkv_bias: tuple[bool, ...] = (True, True, True)
    cls_token: tuple[bool, ...] = (False, False, True)
    qkv_projection_method: tuple[str, ...] = ("dw_bn", "dw_bn", "dw_bn")
    kernel_qkv: tuple[int, ...] = (3, 3, 3)
    padding_kv: tuple[int, ...] = (1, 1, 1)
    stride_kv: tuple[int, ...] = (2, 2, 2)
    padding_q: tuple[int, ...] = (1, 1, 1)
    stride_q: tuple[int, ...] = (1, 1, 1)
    num_classes: int = 1000
    image_size: int = 224
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    id2label: dict[int, str] | None = field(default=None, hash=False, compare=True)
    global_pool: str | None = None

    def __post_init__(self) -> None:
        # Normalise lists (from JSON or users) to tuples of the right type, then validate.
        for name, kind in STAGE_FIELDS.items():
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ConfigError(f"CvTConfig.{name} must be a list with one entry per stage, got {value!r}")
            try:
                converted = tuple(_convert(kind, v) for v in value)
            except (TypeError, ValueError):
                raise ConfigError(f"CvTConfig.{name} entries must be {kind.__name__}, got {list(value)!r}") from None
            object.__setattr__(self, name, converted)
        if self.id2label is not None:
            try:
                labels = {int(k): str(v) for k, v in dict(self.id2label).items()}
            except (TypeError, ValueError):
                raise ConfigError("CvTConfig.id2label must map integer class indices to names") from None
            object.__setattr__(self, "id2label", labels)
        self._validate()

    def _validate(self) -> None:
        n = len(self.depth)
        if n == 0:
            raise ConfigError("CvTConfig needs at least one stage (depth is empty)")
        wrong = [f"{k} has {len(getattr(self, k))}" for k in STAGE_FIELDS if len(getattr(self, k)) != n]
        if wrong:
            raise ConfigError(f"CvTConfig per-stage fields must all have {n} entries (len(depth)); " + ", ".join(wrong))
        for name in ("patch_sizes", "patch_stride", "embed_dim", "num_heads", "depth", "kernel_qkv", "stride_kv", "stride_q"):
            bad = [v for v in getattr(self, name) if v <= 0]
            if bad:
                raise ConfigError(f"CvTConfig.{name} entries must be positive, got {list(getattr(self, name))}")
        for name in ("patch_padding", "padding_kv", "padding_q"):
            if any(v < 0 for v in getattr(self, name)):
                raise ConfigError(f"CvTConfig.{name} entries must be >= 0, got {list(getattr(self, name))}")
        for i, (dim, heads) in enumerate(zip(self.embed_dim, self.num_heads)):
            if dim % heads:
                raise ConfigError(f"CvTConfig: stage {i} num_heads={heads} does not divide embed_dim={dim}")
        for i, ratio in enumerate(self.mlp_ratio):
            if not ratio > 0 or int(self.embed_dim[i] * ratio) < 1:
                raise ConfigError(f"CvTConfig.mlp_ratio must be positive, got {list(self.mlp_ratio)}")
        for name in ("attention_drop_rate", "drop_rate", "drop_path_rate"):
            if any(not (0.0 <= v < 1.0) for v in getattr(self, name)):
                raise ConfigError(f"CvTConfig.{name} entries must be in [0, 1), got {list(getattr(self, name))}")
        unknown = [m for m in self.qkv_projection_method if m not in PROJECTION_METHODS]
        if unknown:
            raise ConfigError(f"CvTConfig.qkv_projection_method: unknown {unknown}; expected one of {list(PROJECTION_METHODS)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"CvTConfig.hidden_act must be one of {list(ACTIVATIONS)}, got {self.hidden_act!r}")
        if self.num_channels <= 0:
            raise ConfigError(f"CvTConfig.num_channels must be positive, got {self.num_channels}")
        if self.num_classes < 0:
            raise ConfigError(f"CvTConfig.num_classes must be >= 0, got {self.num_classes}")
        if self.image_size <= 0:
            raise ConfigError(f"CvTConfig.image_size must be positive, got {self.image_size}")
        if not (0 < self.layer_norm_eps < 1):
            raise ConfigError(f"CvTConfig.layer_norm_eps must be in (0, 1), got {self.layer_norm_eps}")
        if self.global_pool is not None and self.global_pool not in GLOBAL_POOLS:
            raise ConfigError(f"CvTConfig.global_pool must be one of {list(GLOBAL_POOLS)} or None, got {self.global_pool!r}")
        if self.global_pool == "token" and not self.cls_token[-1]:
            raise ConfigError("CvTConfig.global_pool='token' needs a cls token in the last stage (cls_token[-1]); use 'avg'")
        if self.id2label is not None and sorted(self.id2label) != list(range(self.num_classes)):
            raise ConfigError(
                f"CvTConfig.id2label must name classes 0..{self.num_classes - 1}, got {len(self.id2label)} entries"
            )
        try:
            self.feature_sizes(self.image_size, self.image_size)
        except ConfigError as exc:
            raise ConfigError(f"CvTConfig.image_size={self.image_size}: {exc}") from None

    # ----------------------------------------------------------------------------------- helpers
    @property
    def num_stages(self) -> int:
        return len(self.depth)

    @property
    def pool(self) -> str:
        """The pooling in effect: ``global_pool``, or the official one ("token" with a last-stage cls token, else "avg")."""
        if self.global_pool is not None:
            return self.global_pool
        return "token" if self.cls_token[-1] else "avg"

    @property
    def num_features(self) -> int:
        """Width of the pooled features that the classifier sees."""
        return self.embed_dim[-1]

    def replace(self, **changes: Any) -> "CvTConfig":
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown CvTConfig field(s) {unknown}")
        if "num_classes" in changes and "id2label" not in changes and self.id2label is not None:
            if changes["num_classes"] != self.num_classes:
                changes["id2label"] = None  # old names do not describe a new head
        return dataclasses.replace(self, **changes)

    def _grid_sizes(self, height: int, width: int) -> tuple[list[tuple[int, int]], str | None]:
        """Token grids stage by stage, and why the input is too small (None when it fits)."""
        sizes: list[tuple[int, int]] = []
        h, w = height, width
        for i in range(self.num_stages):
            k, s, p = self.patch_sizes[i], self.patch_stride[i], self.patch_padding[i]
            h, w = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
            if h < 1 or w < 1:
                return sizes, f"stage {i} would have a {h}x{w} token grid"
            # The q/k/v convolutions must also produce at least one position.
            if self.qkv_projection_method[i] != "linear":
                pad = min(self.padding_kv[i], self.padding_q[i])
                if min(h, w) + 2 * pad < self.kernel_qkv[i]:
                    return sizes, f"stage {i}'s {h}x{w} grid is smaller than the q/k/v kernel {self.kernel_qkv[i]}"
            sizes.append((h, w))
        return sizes, None

    def feature_sizes(self, height: int, width: int) -> list[tuple[int, int]]:
        """Token grid (H, W) after each stage's embedding for an input of height x width.

        Raises ConfigError when the input is too small to reach the last stage.
        """
        sizes, problem = self._grid_sizes(height, width)
        if problem:
            raise ConfigError(
                f"an input of {height}x{width} is too small: {problem} "
                f"(smallest input for this layout: {self.min_input_size()}x{self.min_input_size()})"
            )
        return sizes

    def min_input_size(self) -> int:
        """Smallest square input side that reaches the last stage."""
        side = 1
        while self._grid_sizes(side, side)[1] is not None:
            side += 1
        return side

    def reductions(self) -> list[int]:
        """Nominal stride of each stage's output relative to the input (4, 8, 16 for CvT)."""
        out, r = [], 1
        for s in self.patch_stride:
            r *= s
            out.append(r)
        return out

    # -------------------------------------------------------------------------------- JSON form
    def to_dict(self) -> dict[str, Any]:
        """The ``config.json`` dict: transformers' CvtConfig reads it; torchcvt reads it back exactly."""
        d: dict[str, Any] = {
            "model_type": "cvt",
            "architectures": ["CvtForImageClassification"],
        }
        for name, kind in STAGE_FIELDS.items():
            # transformers' config validation rejects ints where it expects floats (mlp_ratio, rates).
            d[name] = [float(v) if kind is float else v for v in getattr(self, name)]
        d["num_channels"] = self.num_channels
        d["hidden_act"] = self.hidden_act
        d["layer_norm_eps"] = float(self.layer_norm_eps)
        d["image_size"] = self.image_size
        d["num_classes"] = self.num_classes
        if self.num_classes > 0:
            labels = self.id2label or {i: f"LABEL_{i}" for i in range(self.num_classes)}
            d["id2label"] = {str(i): labels[i] for i in range(self.num_classes)}
            d["label2id"] = {name: i for i, name in sorted(labels.items(), reverse=True)}
            d["torchcvt_has_labels"] = self.id2label is not None
        else:
            # transformers builds a classifier only for num_labels > 0 (an Identity otherwise).
            d["num_labels"] = 0
        if self.global_pool is not None:
            d["global_pool"] = self.global_pool  # torchcvt's; transformers always reads the cls token
        d["initializer_range"] = 0.02
        d[__version_marker__] = __version__
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CvTConfig":
        """Read a config.json dict written by torchcvt or by transformers (``CvtConfig``)."""
        if d.get("model_type", "cvt") != "cvt":
            raise ConfigError(f"config.json describes model_type {d.get('model_type')!r}, not 'cvt'")
        ours = __version_marker__ in d
        kwargs: dict[str, Any] = {}
        names = {f.name for f in dataclasses.fields(cls)}
        for key in names:
            if key in d and key not in ("id2label", "num_classes", "layer_norm_eps"):
                kwargs[key] = d[key]
        if ours and "layer_norm_eps" in d:
            kwargs["layer_norm_eps"] = d["layer_norm_eps"]
        # transformers' own layer_norm_eps (default 1e-12) is read by none of its layers: ignore it.
        id2label = d.get("id2label")
        if "num_classes" in d:
            num_classes = int(d["num_classes"])
        elif id2label:
            num_classes = len(id2label)
        elif "num_labels" in d:
            num_classes = int(d["num_labels"])
        else:
            num_classes = 2  # transformers' PretrainedConfig default
        kwargs["num_classes"] = num_classes
        if id2label and num_classes > 0:
            labels = {int(k): v for k, v in id2label.items()}
            generic = all(v == f"LABEL_{i}" for i, v in labels.items())
            if d.get("torchcvt_has_labels", not generic):
                kwargs["id2label"] = labels
        return cls(**kwargs)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "CvTConfig":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config.json is not valid JSON: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write ``config.json`` atomically."""
        atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CvTConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            text = path.read_text()
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        try:
            return cls.from_json(text)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None


def _convert(kind: type, value: Any) -> Any:
    if kind is bool:
        if not isinstance(value, (bool, int)):
            raise TypeError(value)
        return bool(value)
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(value)
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise TypeError(value)
        return float(value)
    if not isinstance(value, str):
        raise TypeError(value)
    return value
