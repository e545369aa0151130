"""Model cards: the ``README.md`` that ``save_pretrained`` (and a training run) writes beside the weights.

The card follows the Hugging Face Hub's format: YAML metadata (``library_name``, ``license``,
``tags``, ``datasets``, ``metrics``, ``pipeline_tag: image-classification`` and, with metrics, a
``model-index`` that the hub shows as evaluation results), then the architecture, data, recipe,
metrics, the evaluation preprocessing and how to use the model in torchcvt and in transformers
(with the QuickGELU/GELU note). The metadata is written by huggingface_hub's ``ModelCardData``, so
it is what the hub parses; the text is plain Markdown composed here (``ModelCard.from_template``
would need jinja2, which torchcvt does not depend on, for no gain).

Nothing a user made is overwritten: a README.md is replaced only when its first lines carry
``MARKER``, the comment torchcvt writes into its cards; otherwise it is kept and a log line says so.

    write_model_card("runs/pets", model.config, pretrained_cfg=model.pretrained_cfg,
                     metrics={"top1": 0.93, "top5": 0.99, "loss": 0.27},
                     data={"name": "oxford-iiit-pet", "train images": 3680, "val images": 3669},
                     recipe={"recipe": "finetune", "epochs": 30, "lr": 5e-5}, base_model=model.pretrained_cfg["hub_id"])
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .config import CvTConfig
from .fileio import atomic_write_text
from .transforms import PreprocessConfig, read_preprocessor_config
from .version import __version__

logger = logging.getLogger("torchcvt")

MARKER = "<!-- model card written by torchcvt: replaced when torchcvt saves to this folder again; delete this line to keep your edits -->"
CARD_NAME = "README.md"
PLACEHOLDER_REPO = "OWNER/MODEL"
CITATION = """@inproceedings{wu2021cvt,
  title     = {CvT: Introducing Convolutions to Vision Transformers},
  author    = {Wu, Haiping and Xiao, Bin and Codella, Noel and Liu, Mengchen and Dai, Xiyang and Yuan, Lu and Zhang, Lei},
  booktitle = {Proceedings of the IEEE/CVF International Conference on Computer Vision (ICCV)},
  year      = {2021}
}"""
# Metric names (as training and evaluation write them) that are accuracies, as fractions.
_ACCURACIES = {"top1": "top-1 accuracy", "val_top1": "top-1 accuracy", "top5": "top-5 accuracy", "val_top5": "top-5 accuracy"}


def is_torchcvt_card(path: str | os.PathLike) -> bool:
    """Whether the README.md at ``path`` is one torchcvt wrote (its marker in the first 40 lines)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return any(MARKER in line for _, line in zip(range(40), f))
    except FileNotFoundError:
        return False


def write_model_card(
    directory: str | os.PathLike,
    config: CvTConfig,
    *,
    pretrained_cfg: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | str | None = None,
    recipe: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    num_params: int | None = None,
) -> Path | None:
    """Write ``directory/README.md`` (atomically); None, and a log line, when a README.md that torchcvt
    did not write is there already. Arguments as ``model_card``; the evaluation preprocessing is the
    folder's ``preprocessor_config.json`` when it has one."""
    path = Path(directory) / CARD_NAME
    if path.exists() and not is_torchcvt_card(path):
        logger.warning("kept %s: it was not written by torchcvt (no model card written; delete it, or merge by hand)", path)
        return None
    preprocess = read_preprocessor_config(directory)
    text = model_card(config, pretrained_cfg=pretrained_cfg, metrics=metrics, data=data, recipe=recipe,
                      base_model=base_model, num_params=num_params, preprocess=preprocess)
    atomic_write_text(path, text)
    return path


def model_card(
    config: CvTConfig,
    *,
    pretrained_cfg: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    data: Mapping[str, Any] | str | None = None,
    recipe: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    num_params: int | None = None,
    preprocess: PreprocessConfig | None = None,
    repo_id: str | None = None,
) -> str:
    """The card's text.

    ``pretrained_cfg``: the model's (its registry name; that entry's public weights and licence).
    ``metrics``: name -> value, accuracies as fractions (``top1``, ``top5``, ``val_top1``, ...),
    anything else shown as is. ``data``: a description, or a mapping with ``name`` (and
    ``hub_dataset``, a hub dataset id) and any counts. ``recipe``: training options, name -> value.
    ``base_model``: the hub id of the weights it was fine-tuned from. ``num_params``: shown if given.
    ``preprocess``: the evaluation transform (default: the official recipe for the model's size;
    ``write_model_card`` passes the folder's ``preprocessor_config.json``). ``repo_id``: where it
    will live; by default the usage snippets name ``PLACEHOLDER_REPO``, which ``push_to_hub``
    replaces with the repository it uploads to.
    """
    from huggingface_hub import EvalResult, ModelCardData

    cfg = dict(pretrained_cfg or {})
    info = {"description": data} if isinstance(data, str) else dict(data or {})
    name = cfg.get("name") or _layout_name(config)
    repo = repo_id or PLACEHOLDER_REPO
    # Without a data description, the registry entry's classes name the dataset when the head is the entry's.
    labels = cfg.get("labels") if cfg.get("num_classes") == config.num_classes else None
    dataset = info.get("hub_dataset") or info.get("name") or _slug(labels)
    accuracies = {k: float(v) for k, v in (metrics or {}).items() if k in _ACCURACIES and v is not None}
    results = [
        EvalResult(task_type="image-classification", dataset_type=str(dataset or "unknown"), dataset_name=str(info.get("name") or dataset or "unknown"),
                   metric_type="accuracy", metric_name=_ACCURACIES[k], metric_value=round(100 * v, 2))
        for k, v in accuracies.items()
    ]
    card_data = ModelCardData(
        library_name="torchcvt", license=cfg.get("license"), pipeline_tag="image-classification",
        tags=["image-classification", "vision", "cvt", "torchcvt"], datasets=[str(dataset)] if dataset else None,
        metrics=["accuracy"], base_model=base_model, model_name=name if results else None, eval_results=results or None,
    )
    pre = preprocess or PreprocessConfig.for_resolution(config.image_size)
    sections = [
        f"# {name}",
        _summary(config, cfg, name, num_params, base_model),
        "## Architecture\n\n" + _table(_architecture(config, name, num_params)),
        "## Data\n\n" + _data_text(info, config),
        "## Training recipe\n\n" + (_table({k: _show(v) for k, v in recipe.items()}) if recipe else "Not recorded."),
        "## Metrics\n\n" + _metrics_text(metrics),
        "## Evaluation preprocessing\n\n" + _preprocess_text(pre),
        "## Usage with torchcvt\n\n" + _torchcvt_usage(repo),
        "## Usage with transformers\n\n" + _transformers_usage(repo, config),
        "## Citation\n\n```bibtex\n" + CITATION + "\n```",
    ]
    return f"---\n{card_data.to_yaml()}\n---\n{MARKER}\n\n" + "\n\n".join(sections) + "\n"


def transformers_differences(config: CvTConfig) -> list[str]:
    """What of this layout transformers' CvT does not compute as torchcvt does (empty: the same, up to
    the activation). It knows only dw_bn projections and a cls token in the last stage at most, pools
    its own way (the cls token with one, else the mean), and its ``CvtStage`` indexes the per-block
    drop-path rates by stage number: IndexError whenever ``depth[i] <= i``. Every item but the pooling
    one stops transformers from building the model (``checkpoint.transformers_incompatibilities``)."""
    found = []
    if any(m != "dw_bn" for m in config.qkv_projection_method):
        found.append(f"qkv_projection_method {list(config.qkv_projection_method)} (only dw_bn)")
    if any(config.cls_token[:-1]):
        found.append(f"cls_token {list(config.cls_token)} (only in the last stage)")
    short = [i for i, d in enumerate(config.depth) if d <= i]
    if short:
        found.append(f"depth {list(config.depth)} has depth[i] <= i at stage(s) {short} (its CvtStage raises IndexError)")
    if config.pool != ("token" if config.cls_token[-1] else "avg"):
        found.append(f"global_pool={config.pool!r}")
    return found


# ----------------------------------------------------------------------------------- sections
def _layout_name(config: CvTConfig) -> str:
    return f"CvT (widths {list(config.embed_dim)}, depths {list(config.depth)})"


def _slug(text: Any) -> str | None:
    return str(text).strip().lower().replace(" ", "-") if text else None


def _show(value: Any) -> str:
    if isinstance(value, float):
        return format(value, ".6g")
    if isinstance(value, (list, tuple)):
        return ", ".join(_show(v) for v in value)
    return "-" if value is None else str(value)


def _table(rows: Mapping[str, Any]) -> str:
    lines = ["| | |", "|---|---|"] + [f"| {k} | {str(v).replace('|', '/')} |" for k, v in rows.items()]
    return "\n".join(lines)


def _summary(config: CvTConfig, cfg: Mapping[str, Any], name: str, num_params: int | None, base_model: str | None) -> str:
    size = f", {num_params / 1e6:.1f}M parameters" if num_params else ""
    text = (f"A CvT (Convolutional Vision Transformer, Wu et al. 2021, [arXiv 2103.15808](https://arxiv.org/abs/2103.15808)) "
            f"image classifier: {name}{size}, {config.image_size}x{config.image_size} input, {config.num_classes} classes. "
            f"Saved by torchcvt {__version__} in transformers' layout (`config.json`, `model.safetensors`, "
            f"`preprocessor_config.json`).")
    if base_model:
        text += f" Fine-tuned from {base_model}."
    if cfg.get("hub_id"):
        facts = ", ".join(f for f in (cfg.get("pretrained_on") and f"trained on {cfg['pretrained_on']}",
                                       cfg.get("top1") and f"{cfg['top1']} % ImageNet-1k top-1 reported by the authors") if f)
        text += f" Its layout is the registry entry `{cfg.get('name')}`, whose public weights are {cfg['hub_id']} ({facts})."
    return text


def _architecture(config: CvTConfig, name: str, num_params: int | None) -> dict[str, Any]:
    rows = {
        "layout": name,
        "stages": config.num_stages,
        "widths (embed_dim)": _show(config.embed_dim),
        "heads": _show(config.num_heads),
        "blocks (depth)": _show(config.depth),
        "strides": ", ".join(map(str, config.reductions())),
        "cls token": f"stage {config.cls_token.index(True)}" if any(config.cls_token) else "none",
        "pooling (global_pool)": {"token": "the cls token", "avg": "mean of the last stage's tokens", "": "none"}[config.pool],
        "q/k/v projection": _show(config.qkv_projection_method),
        "MLP activation": config.hidden_act,
        "input": f"{config.num_channels} x {config.image_size} x {config.image_size}",
        "classes": config.num_classes,
    }
    if num_params:
        rows["parameters"] = f"{num_params:,}"
    return rows


def _data_text(info: Mapping[str, Any], config: CvTConfig) -> str:
    parts = []
    if info:
        parts.append(_table({k: _show(v) for k, v in info.items()}))
    else:
        parts.append("Not recorded.")
    if config.id2label:
        names = [config.id2label[i] for i in range(config.num_classes)]
        shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
        parts.append(f"Classes (`id2label` in config.json): {shown}.")
    return "\n\n".join(parts)


def _metrics_text(metrics: Mapping[str, Any] | None) -> str:
    rows = {}
    for key, value in (metrics or {}).items():
        if key in _ACCURACIES and value is not None:
            rows[f"{_ACCURACIES[key]} (`{key}`)"] = f"{100 * float(value):.2f} %"
        else:
            rows[key] = _show(value)
    return _table(rows) if rows else "None recorded."


def _preprocess_text(pre: PreprocessConfig) -> str:
    s = pre.image_size
    if pre.crop_pct is None:
        geometry = f"resize to {s}x{s} ({pre.resample}, aspect ratio not kept)"
    else:
        geometry = f"resize the shorter side to {int(s / pre.crop_pct)} ({pre.resample}), centre crop {s}x{s}"
    return (f"RGB; {geometry}; scale to 0..1; normalise with mean {_show(pre.mean)} and std {_show(pre.std)}. "
            "This is `preprocessor_config.json`, which torchcvt and transformers' image processor both apply.")


def _torchcvt_usage(repo: str) -> str:
    return f"""```python
import torchcvt

# The weights with their evaluation preprocessing and class names:
classifier = torchcvt.Classifier("{repo}")
classifier("image.jpg", top_k=5)  # [(label, probability), ...], best first
# The nn.Module (num_classes=N: a new head, to fine-tune; features_only=True: the stage maps):
model = torchcvt.create_model(weights="{repo}")
```

```bash
cvt predict --weights {repo} image.jpg
cvt embed --weights {repo} --output features.npz photos/
```"""


def _transformers_usage(repo: str, config: CvTConfig) -> str:
    code = f"""```python
from transformers import AutoImageProcessor, CvtForImageClassification
from transformers.activations import QuickGELUActivation

processor = AutoImageProcessor.from_pretrained("{repo}")
model = CvtForImageClassification.from_pretrained("{repo}").eval()
"""
    if config.hidden_act == "quick_gelu":
        code += """for module in model.modules():  # the activation this model was trained with (see below)
    if type(module).__name__ == "CvtIntermediate":
        module.activation = QuickGELUActivation()
"""
        note = ("This model was trained with QuickGELU (`x * sigmoid(1.702 x)`, `\"hidden_act\": \"quick_gelu\"` in "
                "config.json), as the official microsoft/CvT weights were. transformers' CvT ignores `hidden_act` and "
                "hard-codes GELU, so without the loop above its logits differ slightly from torchcvt's and the "
                "official code's (and so may its predictions and accuracy); with it they agree.")
    else:
        note = "This model uses GELU (`\"hidden_act\": \"gelu\"`), the activation transformers' CvT hard-codes: its logits are torchcvt's."
    code += """inputs = processor(images=image, return_tensors="pt")  # image: a PIL image
logits = model(**inputs).logits
```"""
    differences = transformers_differences(config)
    if differences:
        note += f" Note: transformers' CvT does not support {', '.join(differences)}: use torchcvt for this model."
    return code + "\n\n" + note
