"""Which CvT models exist, and how to build one by name: torchcvt's counterpart of timm's
``_registry`` / ``_builder`` / ``default_cfgs``, and the only module that names the public weights.

A registry name (``cvt-13``, ``cvt-21-384-22k``, ``cvt-tiny``; any case, ``-`` or ``_``) or the hub
id of its public weights (``microsoft/cvt-13``) means one entry everywhere: one layout, one image
size, one evaluation crop and, where there are any, one set of public weights.

* ``create_model(name)``: the layout with random weights; ``create_model(name, pretrained=True)``:
  the public weights (downloaded once, then read from the Hugging Face cache, offline too). Its
  arguments are timm's (``num_classes``, ``in_chans``, ``global_pool``, ``features_only``,
  ``out_indices``, ``drop_path_rate``); ``features_only=True`` gives features.FeatureListNet.
* ``cvt summary NAME`` shows the layout at the entry's size; the commands that need trained
  weights (``cvt predict``, ``eval``, ``attention``, ``export --weights``) and ``Classifier`` load
  the public weights, through ``load_pretrained``.

Any other string is a checkpoint: a file, a folder or another hub id (``owner/name``). A local
folder that is called like a registry name is written as a path: ``./cvt-13``.

The image size of a checkpoint comes from the registry for the public hub ids, else from its
``config.json`` when torchcvt wrote it, else from the folder's ``preprocessor_config.json``
(transformers' ``config.json`` has none), else from an official file's name
(``CvT-13-384x384-IN-1k.pth``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoint import (
    Checkpoint, check_state_dict, download_from_hub, image_size_from_name, infer_config_fields, is_hub_id, read_checkpoint,
)
from .config import CvTConfig
from .errors import CheckpointError, ConfigError
from .fastpath import apply_fast_path
from .features import FeatureListNet
from .model import CvT
from .transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

logger = logging.getLogger("torchcvt")

# ------------------------------------------------------------------------------------------ layouts
# Architectures of the official microsoft/CvT configs (experiments/imagenet/cvt/*.yaml); every
# other field is CvTConfig's default, which is CvT-13's. CvT-W24 is the wide 24-block model.
LAYOUTS: dict[str, dict[str, Any]] = {
    "cvt-13": dict(embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 2, 10), drop_path_rate=(0.0, 0.0, 0.1)),
    "cvt-21": dict(embed_dim=(64, 192, 384), num_heads=(1, 3, 6), depth=(1, 4, 16), drop_path_rate=(0.0, 0.0, 0.1)),
    "cvt-w24": dict(embed_dim=(192, 768, 1024), num_heads=(3, 12, 16), depth=(2, 2, 20), drop_path_rate=(0.0, 0.0, 0.3)),
    # A small layout for quick experiments and the offline digits demo (not a published model):
    # CvT-13's 7x7 stride-4 first embedding, so a 32x32 input gives 8x8, 4x4 and 2x2 token grids;
    # widths 32/64/128, 1+2+3 blocks, 825k parameters. Depth 1, 2, 3 (not fewer): transformers' CvtStage
    # indexes its drop-path rates by stage and cannot build a stage i with depth <= i, and run folders
    # of `cvt train` are meant to load there. `cvt train` reaches ~99 % on the digits in under a minute.
    "cvt-tiny": dict(embed_dim=(32, 64, 128), num_heads=(1, 2, 2), depth=(1, 2, 3), drop_path_rate=(0.0, 0.0, 0.0)),
}


# ----------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class PretrainedCfg:
    """One registry entry: a layout at one resolution, with its public weights where there are any.

    ``crop_pct``: the centre crop of evaluation; None squashes the image to image_size x image_size.
    ``params``: trainable parameters with this head (the model zoos round them to 20M, 32M, 277M).
    ``labels``: what the head's classes are. ``top1``: ImageNet-1k val top-1 reported by the authors
    (microsoft/CvT README, Tables 2/3 of the paper). ``top1_ported``: the same released weights
    re-evaluated by PaddlePaddle PASSL's model zoo with this entry's crop (None where PASSL has none).
    """

    name: str
    layout: str  # a key of LAYOUTS
    image_size: int
    crop_pct: float | None
    params: int
    num_classes: int = 1000
    labels: str = "imagenet-1k"
    hub_id: str | None = None  # None: a layout without public weights
    pretrained_on: str | None = None
    top1: float | None = None
    top1_ported: float | None = None
    license: str | None = None
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def config(self, **overrides: Any) -> CvTConfig:
        """The layout at this entry's image size and head, with some fields changed."""
        config = CvTConfig(**LAYOUTS[self.layout], image_size=self.image_size, num_classes=self.num_classes)
        return config.replace(**overrides) if overrides else config

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig(self.image_size, self.crop_pct, self.interpolation, self.mean, self.std)

    def to_dict(self, preprocess: PreprocessConfig | None = None, in_chans: int = 3) -> dict[str, Any]:
        """The ``model.pretrained_cfg`` of models built from this entry (``preprocess``: when not the entry's)."""
        return _cfg_dict(preprocess or self.preprocess_config(), in_chans, name=self.name, hub_id=self.hub_id,
                         num_classes=self.num_classes, labels=self.labels, license=self.license,
                         pretrained_on=self.pretrained_on, top1=self.top1)


def _cfg_dict(pre: PreprocessConfig, in_chans: int = 3, **about: Any) -> dict[str, Any]:
    """A ``pretrained_cfg`` dict: timm's keys where timm has one (crop_pct None: squash, timm's
    crop_mode "squash"), and what is known about the weights (name, hub_id, license, ...)."""
    about = {"name": None, "hub_id": None, "num_classes": None, "labels": None, "license": None,
             "pretrained_on": None, "top1": None, **about}
    return {"input_size": (in_chans, pre.image_size, pre.image_size), "crop_pct": pre.crop_pct,
            "crop_mode": "squash" if pre.crop_pct is None else "center", "interpolation": pre.resample,
            "mean": pre.mean, "std": pre.std, "first_conv": "stages.0.patch_embed.proj", "classifier": "head", **about}


_CVT13_PARAMS, _CVT21_PARAMS, _CVTW24_PARAMS = 19_997_480, 31_622_696, 277_196_392
# The hub model cards of all seven microsoft/cvt-* repositories declare "License: apache-2.0"
# (huggingface.co/microsoft/cvt-13, ...; the official code, github.com/microsoft/CvT, is MIT).
_HUB_LICENSE = "apache-2.0"


def _public(name: str, layout: str, size: int, params: int, pretrained_on: str, top1: float, ported: float | None) -> PretrainedCfg:
    return PretrainedCfg(name, layout, size, PreprocessConfig.for_resolution(size).crop_pct, params,
                         hub_id=f"microsoft/{name}", pretrained_on=pretrained_on, top1=top1, top1_ported=ported,
                         license=_HUB_LICENSE)


def _layout_only(name: str, layout: str, size: int, params: int, **fields: Any) -> PretrainedCfg:
    return PretrainedCfg(name, layout, size, PreprocessConfig.for_resolution(size).crop_pct, params, **fields)


# Every name torchcvt knows. The official crops: 87.5 % centre crop at 224, a plain resize at 384.
REGISTRY: dict[str, PretrainedCfg] = {
    entry.name: entry
    for entry in (
        _public("cvt-13", "cvt-13", 224, _CVT13_PARAMS, "ImageNet-1k", 81.6, 81.59),
        _public("cvt-13-384", "cvt-13", 384, _CVT13_PARAMS, "ImageNet-1k", 83.0, None),
        _public("cvt-13-384-22k", "cvt-13", 384, _CVT13_PARAMS, "ImageNet-22k", 83.3, 82.90),
        _public("cvt-21", "cvt-21", 224, _CVT21_PARAMS, "ImageNet-1k", 82.5, 82.46),
        _public("cvt-21-384", "cvt-21", 384, _CVT21_PARAMS, "ImageNet-1k", 83.3, None),
        _public("cvt-21-384-22k", "cvt-21", 384, _CVT21_PARAMS, "ImageNet-22k", 84.9, 84.63),
        _layout_only("cvt-w24", "cvt-w24", 224, _CVTW24_PARAMS),
        _layout_only("cvt-w24-384", "cvt-w24", 384, _CVTW24_PARAMS),
        _public("cvt-w24-384-22k", "cvt-w24", 384, _CVTW24_PARAMS, "ImageNet-22k", 87.6, 87.39),
        _layout_only("cvt-tiny", "cvt-tiny", 32, 824_650, num_classes=10, labels="digits"),
    )
}
_BY_HUB_ID = {entry.hub_id.lower(): entry for entry in REGISTRY.values() if entry.hub_id}


def list_models(pretrained: bool = False) -> list[str]:
    """Registry names (``pretrained=True``: only those with public weights)."""
    return [name for name, entry in REGISTRY.items() if entry.hub_id or not pretrained]


# -------------------------------------------------------------------------------------- resolver
def resolve(name: str | os.PathLike | None) -> PretrainedCfg | None:
    """The registry entry that ``name`` means, or None when it means none (a path, another hub id).

    Registry names match in any case and with ``_`` for ``-`` (``CvT_13``); the hub ids of the
    public weights (``microsoft/cvt-13``) match their entries.
    """
    if not isinstance(name, str):
        return None
    key = name.strip().lower()
    return REGISTRY.get(key.replace("_", "-")) or _BY_HUB_ID.get(key)


def get_pretrained_cfg(name: str) -> PretrainedCfg:
    """The registry entry of ``name``; a ConfigError naming the known names when there is none."""
    entry = resolve(name)
    if entry is None:
        raise ConfigError(f"unknown model {name!r}; registry names: {', '.join(REGISTRY)}")
    return entry


def preset_config(name: str, **overrides: Any) -> CvTConfig:
    """The config of a registry name (its layout at its image size), with some fields changed."""
    return get_pretrained_cfg(name).config(**overrides)


def describe(config: CvTConfig) -> str:
    """The name of a config's layout (``cvt-13``), or its widths and depths."""
    for name, layout in LAYOUTS.items():
        if all(getattr(config, k) == v for k, v in layout.items() if k != "drop_path_rate"):
            return name
    return f"CvT(embed_dim={list(config.embed_dim)}, depth={list(config.depth)})"


def _no_weights(entry: PretrainedCfg) -> str:
    return (f"{entry.name} is a layout without public weights (random weights: create_model({entry.name!r}), "
            f"cvt export --model {entry.name}); names with weights: {', '.join(list_models(pretrained=True))}")


def _weights_source(source: str | os.PathLike) -> tuple[str | os.PathLike, PretrainedCfg | None]:
    """What to read for ``source``: a registry name becomes its entry's (downloaded or cached) hub
    repository; a path or another hub id stays as it is."""
    entry = resolve(source)
    if entry is not None:
        if entry.hub_id is None:
            raise ConfigError(_no_weights(entry))
        return download_from_hub(entry.hub_id), entry  # never a local folder that is named like the hub id
    text = os.fspath(source)
    if "/" not in text and os.sep not in text and not os.path.exists(text):
        # A bare word that is no file either: most likely a mistyped registry name.
        raise CheckpointError(
            f"unknown weights {text!r}: not a file or folder, nor a registry name with weights "
            f"({', '.join(list_models(pretrained=True))}), nor a Hugging Face Hub id (owner/name)"
        )
    return source, None


def _names_weights(source: Any) -> bool:
    """Whether a string that is no registry name names a checkpoint (an existing path or a hub id)."""
    if not isinstance(source, (str, os.PathLike)) or resolve(source) is not None:
        return False
    text = os.fspath(source)
    return os.path.exists(os.path.expanduser(text)) or is_hub_id(text)


# --------------------------------------------------------------------------------------- builders
def create_model(
    model_name: str | CvTConfig | os.PathLike | None = None,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    global_pool: str | None = None,
    features_only: bool = False,
    out_indices: int | Sequence[int] | None = None,
    drop_path_rate: float | Sequence[float] | None = None,
    *,
    weights: str | os.PathLike | None = None,
    allow_nonfinite: bool = False,
    **kwargs: Any,
) -> CvT | FeatureListNet:
    """Build a CvT from a registry name or a config, optionally loading weights: timm's ``create_model``.

    ``create_model("cvt_13")``: random weights, the entry's layout and image size (any case, ``-`` or ``_``).
    ``create_model("cvt-13-384", pretrained=True)``: the entry's public weights.
    ``create_model("cvt-21", weights="path/or/hub-id")``: the layout, checked against the checkpoint.
    ``create_model(weights="path/or/hub-id")`` (or ``create_model("path/or/hub-id")``): the
    checkpoint's own layout.

    ``num_classes``: the head; different from the checkpoint's, a new randomly initialised one
    (fine-tuning); 0 none. ``in_chans``: input channels (default the layout's or checkpoint's, 3);
    with weights of another count the first convolution is adapted as timm does (summed for 1,
    repeated and scaled otherwise). ``global_pool``: what the classifier reads, "token" (the last
    stage's cls token), "avg" (the mean of its spatial tokens) or "" (no pooling); default what the
    official model does ("token" with a cls token). ``features_only=True``: a FeatureListNet
    returning the stage maps ``out_indices`` (default all) instead of logits. ``drop_path_rate``:
    stochastic depth, per stage or a float for the last stage (where the official configs put it).
    ``kwargs`` change other CvTConfig fields, e.g. ``hidden_act="gelu"``. The model's
    ``pretrained_cfg`` says how its inputs are preprocessed (timm's keys).
    ``allow_nonfinite``: load weights holding NaN or inf (refused by default), for debugging.
    """
    if weights is None and not pretrained and (isinstance(model_name, os.PathLike) or _names_weights(model_name)):
        model_name, weights = None, model_name
    entry = get_pretrained_cfg(model_name) if isinstance(model_name, str) else None
    if pretrained:
        if entry is None or weights is not None:
            raise ConfigError("pretrained=True takes a registry name and no weights=, e.g. create_model('cvt-13', pretrained=True)")
        weights = entry.name  # its public weights (a ConfigError for a layout without any)
    if out_indices is not None and not features_only:
        raise ConfigError("out_indices selects the stages of a features_only=True model; pass features_only=True")
    if "num_channels" in kwargs:
        raise ConfigError("create_model calls the input channels in_chans (timm's name; num_channels is the CvTConfig field)")
    overrides = {k: v for k, v in (("global_pool", global_pool), ("drop_path_rate", drop_path_rate)) if v is not None}
    overrides.update(kwargs)
    base = entry.config() if entry is not None else model_name
    if weights is not None:
        model = load_model(weights, config=base, num_classes=num_classes, in_chans=in_chans,
                           allow_nonfinite=allow_nonfinite, **overrides)
    elif base is None:
        raise ConfigError("create_model needs a registry name (torchcvt.list_models()), a CvTConfig or weights")
    else:
        config = _with_overrides(base, num_classes=num_classes, num_channels=in_chans, **overrides)
        same_size = entry is not None and config.image_size == entry.image_size
        pre = entry.preprocess_config() if same_size else PreprocessConfig.for_resolution(config.image_size)
        model = _finish(CvT(config=config), pre, entry)
    return FeatureListNet(model, out_indices) if features_only else model


def _with_overrides(config: CvTConfig, **overrides: Any) -> CvTConfig:
    """``config`` with the given fields changed (None: unchanged); a single drop-path rate applies
    to the last stage, the others keep none, as in the official configs."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    rate = overrides.get("drop_path_rate")
    if isinstance(rate, (int, float)):
        overrides["drop_path_rate"] = (0.0,) * (config.num_stages - 1) + (float(rate),)
    return config.replace(**overrides) if overrides else config


def adapt_input_conv(in_chans: int, weight: torch.Tensor) -> torch.Tensor:
    """A first-convolution weight ``[O, 3, k, k]`` for ``in_chans`` inputs, as timm's ``adapt_input_conv``:
    summed over RGB for one channel (a grey image repeated three times gives the same output), else
    RGB repeated to ``in_chans`` channels and scaled by ``3 / in_chans``."""
    if weight.shape[1] != 3:
        raise CheckpointError(f"cannot adapt a first convolution of {weight.shape[1]} input channels to {in_chans}; only RGB weights")
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeated = weight.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans]
    return repeated * (3 / in_chans)


def load_model(
    source: str | os.PathLike,
    *,
    config: CvTConfig | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    allow_nonfinite: bool = False,
    **overrides: Any,
) -> CvT:
    """Build a CvT from a checkpoint, strictly: a folder, a file, a hub id or a registry name.

    The image size is the one the checkpoint states (see the module docstring), and
    ``model.pretrained_cfg`` its evaluation transform (the folder's ``preprocessor_config.json``,
    the registry's for public weights, else the official recipe for the size). ``config``: the architecture to load into (checked against the tensors); default: the
    checkpoint's own (``config.json``, an embedded config, or inferred from the tensors).
    ``num_classes``: a head size; when it differs from the checkpoint's, the head is replaced by a
    new, randomly initialised one (fine-tuning), and a log message says so. ``in_chans``: input
    channels; other than the checkpoint's, its first convolution is adapted (``adapt_input_conv``).
    ``overrides``: config fields to change, e.g. ``hidden_act="gelu"``.
    ``allow_nonfinite``: load weights holding NaN or inf, which are refused by default (for debugging).
    """
    location, entry = _weights_source(source)
    ckpt = read_checkpoint(location, allow_nonfinite=allow_nonfinite)
    sd = ckpt.state_dict
    stated_size = entry.image_size if entry is not None else _checkpoint_image_size(ckpt)
    own = ckpt.config or config_from_state_dict(sd, image_size=stated_size)
    if stated_size is not None and own.image_size != stated_size:
        own = own.replace(image_size=stated_size)
    if config is None:
        target = own
    else:
        # An explicit architecture; what the checkpoint says beyond the architecture still applies.
        given = ckpt.config_dict or {}
        keep = {k: getattr(own, k) for k in ("hidden_act", "layer_norm_eps", "global_pool") if k in given and k not in overrides}
        if stated_size is not None and "image_size" not in overrides:
            keep["image_size"] = stated_size
        target = config.replace(**keep) if keep else config
    target = _with_overrides(target, **overrides)
    first_conv = "stages.0.patch_embed.proj.weight"
    if in_chans is not None and first_conv in sd and sd[first_conv].shape[1] != in_chans:
        logger.warning("adapted %s's first convolution from %d to %d input channels", ckpt.path, sd[first_conv].shape[1], in_chans)
        sd = {**sd, first_conv: adapt_input_conv(in_chans, sd[first_conv])}
    if in_chans is not None:
        target = target.replace(num_channels=in_chans)

    ckpt_classes = sd["head.weight"].shape[0] if "head.weight" in sd else 0
    new_head = num_classes is not None and num_classes != ckpt_classes
    if new_head:
        target = target.replace(num_classes=num_classes, id2label=None)
        sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    elif target.id2label is None and own.id2label is not None and target.num_classes == own.num_classes:
        target = target.replace(id2label=own.id2label)

    model = CvT(config=target)
    expected = model.state_dict()
    if new_head:
        expected = {k: v for k, v in expected.items() if not k.startswith("head.")}
    hint = ""
    if "head.weight" in sd and "head.weight" in expected and sd["head.weight"].shape != expected["head.weight"].shape:
        hint = f" (to fine-tune with a new {target.num_classes}-class head, pass num_classes={target.num_classes})"
    try:
        check_state_dict(expected, sd, source=f"{ckpt.path} ({ckpt.format} format)", target=f"the {describe(target)} model")
    except CheckpointError as exc:
        raise CheckpointError(str(exc) + hint) from None
    model.load_state_dict(sd, strict=not new_head)
    if new_head:
        logger.warning(
            "loaded %s without its head: new %d-class head, randomly initialised (the checkpoint has %d classes)",
            ckpt.path, target.num_classes, ckpt_classes,
        )
    pre = entry.preprocess_config() if entry is not None else ckpt.preprocess or PreprocessConfig.for_resolution(target.image_size)
    return _finish(model, pre, entry)


def load_pretrained(source: str | os.PathLike, *, allow_nonfinite: bool = False) -> tuple[CvT, PreprocessConfig, str]:
    """Trained weights with the evaluation preprocessing that belongs to them, and a display name.

    A registry name or public hub id loads the entry's public weights as ``create_model(name,
    pretrained=True)`` does; anything else is a checkpoint for ``load_model``. For ``Classifier``,
    ``cvt predict``, ``cvt eval``, ``cvt attention`` and ``cvt export``.
    """
    entry = resolve(source)
    if entry is not None:
        model = create_model(entry.name, pretrained=True, allow_nonfinite=allow_nonfinite)
    else:
        model = load_model(source, allow_nonfinite=allow_nonfinite)
    return model, preprocess_config_of(model), entry.hub_id if entry is not None else os.fspath(source)


def preprocess_config_of(model: torch.nn.Module) -> PreprocessConfig:
    """The evaluation transform of a model: its ``pretrained_cfg``, else the official recipe for its size."""
    cfg = getattr(model, "pretrained_cfg", None)
    if not cfg:
        return PreprocessConfig.for_resolution(model.config.image_size)
    return PreprocessConfig(cfg["input_size"][-1], cfg["crop_pct"], cfg["interpolation"], cfg["mean"], cfg["std"])


def _finish(model: CvT, pre: PreprocessConfig, entry: PretrainedCfg | None) -> CvT:
    """The last step of every build: attach what the model is and how its inputs are preprocessed,
    and apply the CPU fast path (fastpath.py; ``remove_fast_path`` gives the plain model back)."""
    chans = model.config.num_channels
    model.pretrained_cfg = entry.to_dict(pre, chans) if entry is not None else _cfg_dict(pre, chans, num_classes=model.config.num_classes)
    return apply_fast_path(model)


# ---------------------------------------------------------------------------- checkpoints' layouts
def _checkpoint_image_size(ckpt: Checkpoint) -> int | None:
    """The resolution a checkpoint states: torchcvt's config.json, the folder's preprocessor
    config, or an official file's name (``CvT-13-384x384-IN-1k.pth``)."""
    if ckpt.config is not None and "image_size" in (ckpt.config_dict or {}):
        return ckpt.config.image_size
    if ckpt.preprocess is not None:
        return ckpt.preprocess.image_size
    return image_size_from_name(ckpt.path) if ckpt.config is None else None


def stated_image_size(source: str | os.PathLike) -> int | None:
    """The resolution weights were made for, as ``load_model`` reads it (None when nothing says);
    a registry name needs no download."""
    entry = resolve(source)
    if entry is not None:
        return entry.image_size
    return _checkpoint_image_size(read_checkpoint(_weights_source(source)[0], allow_nonfinite=True))


def config_from_state_dict(state_dict: dict[str, torch.Tensor], image_size: int | None = None) -> CvTConfig:
    """A full config for a checkpoint without one (official ``.pth`` files).

    Fields the tensors do not determine come from the layout with the same widths and depths
    (CvT-13/21/W24), or else from CvT-13's per-stage settings with 64-channel heads, the head
    width of every published CvT.
    """
    fields = infer_config_fields(state_dict)
    n = len(fields["depth"])
    base: dict[str, Any] = {}
    for layout in LAYOUTS.values():
        if layout["embed_dim"] == fields["embed_dim"] and layout["depth"] == fields["depth"]:
            base = layout
            break
    defaults = CvTConfig()
    kwargs: dict[str, Any] = {}
    for name in ("patch_stride", "patch_padding", "attention_drop_rate", "drop_rate", "drop_path_rate", "padding_kv",
                 "stride_kv", "padding_q", "stride_q", "qkv_projection_method", "kernel_qkv"):
        if name in fields:
            continue
        value = base.get(name, getattr(defaults, name))
        if len(value) != n:
            value = (value[-1],) * n if name.endswith("rate") else tuple(value[:n]) + (value[-1],) * max(0, n - len(value))
        kwargs[name] = value
    if "num_heads" in base:
        kwargs["num_heads"] = base["num_heads"]
    else:
        kwargs["num_heads"] = tuple(max(1, d // 64) if d % 64 == 0 else 1 for d in fields["embed_dim"])
    kwargs.update(fields)
    if image_size is not None:
        kwargs["image_size"] = image_size
    try:
        return CvTConfig(**kwargs)
    except ConfigError as exc:
        raise CheckpointError(f"cannot infer a CvT layout from the checkpoint: {exc}") from None


__all__ = [
    "LAYOUTS", "REGISTRY", "PretrainedCfg", "list_models", "resolve", "get_pretrained_cfg", "preset_config", "describe",
    "create_model", "load_model", "load_pretrained", "adapt_input_conv", "preprocess_config_of", "stated_image_size", "config_from_state_dict",
]
