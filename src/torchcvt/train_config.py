"""The options of a training run: ``TrainConfig`` (every option, resolved; its fields are also the
command-line options of ``cvt train``), the recipes that set their defaults, and ``resolve_config``,
which fills in a recipe's values for the options not given.

Recipes (``--recipe``; every value can be overridden by its option): ``paper`` from scratch, after
microsoft/CvT ``experiments/imagenet/cvt/*.yaml``; ``finetune`` (default with ``--weights``): the
checkpoint's weights with a new head when the class count differs, a short schedule and light
augmentation; ``digits`` (default for ``--data digits``, ``TrainConfig``'s defaults): ``cvt-tiny``
on the 8x8 scikit-learn digits. ``docs/training.md`` tabulates them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError
from .options import check_options, default_help, option, show
from .pretrained import preset_config, stated_image_size
from .tensorboard_log import require_tensorboard

# ------------------------------------------------------------------------------------------ config
# What a recipe changes; the rest comes from TrainConfig's defaults, which are the digits recipe.
# ``base_lr`` is the peak learning rate per 256 images: lr = base_lr x batch_size / 256 unless --lr.
RECIPES: dict[str, dict[str, Any]] = {
    "digits": dict(base_lr=1.2e-2),  # 3e-3 at the default batch of 64
    "paper": dict(
        epochs=300, batch_size=256, base_lr=2.5e-4, warmup_lr=1e-6, min_lr=1e-5, warmup_epochs=5.0,
        weight_decay=None, label_smoothing=0.1, mixup=0.8, cutmix=1.0, randaugment="rand-m9-mstd0.5-inc1",
        random_erasing=0.25, hflip=0.5, crop_scale=0.08, threads=None,
    ),
    "finetune": dict(
        epochs=10, batch_size=64, base_lr=2e-4, warmup_lr=1e-6, min_lr=1e-6, warmup_epochs=1.0,
        weight_decay=0.05, label_smoothing=0.1, mixup=0.0, cutmix=0.0, randaugment=None,
        random_erasing=0.0, hflip=0.5, crop_scale=0.35, threads=None,
    ),
}
# The official configs decay CvT-21 and CvT-W24 twice as hard as CvT-13.
_WEIGHT_DECAY_0_1 = ("cvt-21", "cvt-w24")

DATA, SCHEDULE, AUGMENT, EXECUTION = "what to train", "schedule and optimizer", "regularisation and augmentation", "execution"
FINETUNE = "fine-tuning and small data"


@dataclass
class TrainConfig:
    """Every option of a run, resolved. Saved as ``train_config.json`` and in every checkpoint;
    ``--resume`` reads it back from ``last.pt``. The defaults are the digits recipe, what ``cvt train``
    runs without arguments; ``resolve_config`` fills in the other recipes. Each field is also the
    command-line option of the same name (``options.add_options``)."""

    data: str = option("digits", "'digits' (embedded), an image folder (one sub-folder per class, optionally "
                       "train/ and val/), an Oxford-IIIT Pet folder or a path,label .csv", group=DATA)
    model: str | None = option("cvt-tiny", "a preset (`cvt models`)", group=DATA,
                               default_help="cvt-tiny for digits, cvt-13 otherwise; with --weights the checkpoint's layout")
    weights: str | None = option(None, "start from these weights (folder, file or hub id); a new head when the class count "
                                 "differs; selects --recipe finetune", group=DATA, none="random weights")
    recipe: str = option("digits", "the defaults of the options marked \"the recipe's\"", group=DATA, choices=tuple(RECIPES),
                         default_help="digits for --data digits, finetune with --weights, else paper")
    output: str = option("runs/digits", "run folder", group=DATA, default_help="runs/<data name>")
    image_size: int = option(32, "input side", group=DATA, check="> 0", default_help="the model's")
    epochs: int = option(15, "epochs; the cosine schedule spans them", group=SCHEDULE, check="> 0")
    batch_size: int = option(64, "global batch: over all processes and accumulation steps", group=SCHEDULE, check="> 0")
    lr: float | None = option(None, "peak learning rate", group=SCHEDULE, check="> 0")  # None: the recipe's base_lr, scaled
    warmup_lr: float = option(1e-5, "learning rate at the start of the linear warm-up", group=SCHEDULE, check=">= 0")
    min_lr: float = option(1e-5, "learning rate at the end of the cosine", group=SCHEDULE, check=">= 0")
    warmup_epochs: float = option(1.0, "epochs of linear warm-up", group=SCHEDULE, check=">= 0")
    weight_decay: float | None = option(0.05, "AdamW weight decay (none on norms, biases and cls tokens)",
                                        group=SCHEDULE, check=">= 0", none="0.05 (0.1 for cvt-21 and cvt-w24)")
    label_smoothing: float = option(0.1, "label smoothing", group=AUGMENT, check="[0, 1)")
    mixup: float = option(0.0, "mixup alpha (0: off)", group=AUGMENT, check=">= 0")
    cutmix: float = option(0.0, "cutmix alpha (0: off)", group=AUGMENT, check=">= 0")
    randaugment: str | None = option(None, "timm RandAugment spec, e.g. rand-m9-mstd0.5-inc1, or none", group=AUGMENT, none="off")
    random_erasing: float = option(0.0, "random-erasing probability", group=AUGMENT, check="probability")
    hflip: float = option(0.0, "horizontal-flip probability", group=AUGMENT, check="probability")
    crop_scale: float = option(1.0, "smallest area fraction of the random-resized crop", group=AUGMENT, check="(0, 1]")
    drop_path: tuple[float, ...] | None = option(None, "per-stage drop-path rates, e.g. 0,0,0.1", group=AUGMENT, none="the model's")
    accum_steps: int = option(1, "gradient accumulation: micro-batches per optimizer step", group=SCHEDULE, check="> 0")
    clip_grad: float = option(0.0, "max global gradient norm (0: no clipping)", group=SCHEDULE, check=">= 0")
    ema_decay: float = option(0.0, "keep an EMA of the weights, e.g. 0.9998; validation, best.pt and the final model "
                              "use it (0: off)", group=SCHEDULE, check="[0, 1)")
    freeze_backbone: bool = option(False, "linear probe: train the classifier only; the rest keeps its weights and stays in "
                                   "eval mode (BatchNorm statistics, no dropout or drop path)", group=FINETUNE)
    layer_decay: float | None = option(None, "layer-wise learning-rate decay, e.g. 0.75: the head learns at --lr, each "
                                       "layer before it (a block, or a stage's embedding) at this times the rate of the next", group=FINETUNE,
                                       check="(0, 1]", none="off")
    early_stop: int = option(0, "stop after this many epochs without a better val top-1; best.pt keeps the best "
                             "(0: off)", group=FINETUNE, check=">= 0")
    balance_classes: bool = option(False, "draw training images with replacement so that every class is drawn equally "
                                   "often (an epoch: as many draws as training images)", group=FINETUNE)
    tensorboard: bool = option(False, "also write TensorBoard event files in <output>/tensorboard (needs the tensorboard "
                               "package: pip install torchcvt[tensorboard])", group=EXECUTION)
    amp: str = option("none", "mixed precision (fp16: CUDA, with a gradient scaler)", group=EXECUTION, choices=("none", "bf16", "fp16"))
    compile: bool = option(False, "torch.compile the model", group=EXECUTION)
    seed: int = option(0, "training seed", group=EXECUTION)
    deterministic: bool = option(False, "deterministic algorithms (bit-identical resume on the CPU)", group=EXECUTION)
    # One thread for the digits: cvt-tiny's ops are so small that a second OpenMP thread gains little,
    # and on a shared, busy machine its barriers made steps up to 50x slower in our measurements.
    threads: int | None = option(1, "torch CPU threads per process", group=EXECUTION, check=">= 1", none="torch's")
    workers: int | None = option(None, "DataLoader workers per process", group=EXECUTION, check=">= 0",
                                 default_help="0 for digits, else min(8, CPUs per process - 1)")
    device: str | None = option(None, "cpu or cuda", group=EXECUTION, default_help="cuda when available; torchrun: cuda:LOCAL_RANK")
    checkpoint_every_steps: int = option(0, "also write last.pt every N steps (0: off)", group=EXECUTION, check=">= 0")
    checkpoint_every_minutes: float = option(10.0, "also write last.pt every X minutes, e.g. 0.5 for 30 s (0: off)",
                                             group=EXECUTION, check=">= 0")
    max_steps: int | None = option(None, "stop after N optimizer steps (the schedule still spans --epochs)",
                                   group=EXECUTION, check=">= 1", none="no limit")
    val_fraction: float = option(0.1, "held-out fraction of a folder without val/", group=EXECUTION)
    split_seed: int = option(0, "seed of that hold-out (apart from --seed: runs compare on the same images)", group=EXECUTION)
    skip_bad_images: bool = option(False, "skip unreadable images (counted) instead of stopping", group=EXECUTION)

    def __post_init__(self) -> None:
        """The defaults that follow from other fields, and the command line's spellings."""
        if self.lr is None and self.recipe in RECIPES:  # linear scaling with the global batch
            self.lr = RECIPES[self.recipe]["base_lr"] * self.batch_size / 256
        if self.weight_decay is None:
            self.weight_decay = 0.1 if self.model and self.model.lower().startswith(_WEIGHT_DECAY_0_1) else 0.05
        if self.randaugment in ("none", ""):
            self.randaugment = None
        if isinstance(self.drop_path, str):
            try:
                self.drop_path = tuple(float(v) for v in self.drop_path.split(","))
            except ValueError:
                raise ConfigError(f"--drop-path must be comma-separated per-stage rates such as 0,0,0.1, "
                                  f"got {self.drop_path!r}") from None
        elif self.drop_path is not None:
            self.drop_path = tuple(self.drop_path)  # a list, from JSON

    def validate(self) -> None:
        """One-line ConfigErrors naming the option: the declared ranges and choices, and CUDA when needed."""
        check_options(self)
        if self.device not in (None, "cpu") and not torch.cuda.is_available():
            raise ConfigError(f"--device {self.device}: CUDA is not available; use --device cpu")
        if self.amp == "fp16" and (self.device == "cpu" or not torch.cuda.is_available()):
            raise ConfigError("--amp fp16 needs CUDA (it uses a gradient scaler); use --amp bf16 on the CPU")
        if self.tensorboard:
            require_tensorboard()

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


def resolve_config(**options: Any) -> TrainConfig:
    """A TrainConfig with the recipe's value for every option not given (None counts as not given).

    Options are TrainConfig's field names, as on the command line: ``resolve_config(data="./pets",
    weights="./cvt-13")`` is the fine-tuning recipe for that folder, ``resolve_config()`` the digits demo.
    """
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"unknown training option(s): {', '.join(unknown)}")
    given = {k: v for k, v in options.items() if v is not None}
    data, weights = given.get("data", "digits"), given.get("weights")
    recipe = given.get("recipe") or automatic_recipe(data, weights)
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe must be one of {', '.join(RECIPES)}, got {recipe!r}")
    # No --model: the checkpoint's architecture with --weights, else the default (cvt-tiny) for the digits, else cvt-13.
    model = given.get("model") or (None if weights else TrainConfig.model if data == "digits" else "cvt-13")
    values = {k: v for k, v in RECIPES[recipe].items() if k in known}
    values.update(data=data, recipe=recipe, output=default_output(data))
    values.update(given)
    values["model"] = model
    if "image_size" not in given:
        values["image_size"] = _model_image_size(model, weights)
    cfg = TrainConfig(**values)
    cfg.validate()
    return cfg


def automatic_recipe(data: str, weights: str | None) -> str:
    """The recipe without ``--recipe``: digits for the digits, finetune with ``--weights``, else paper."""
    return "digits" if data == "digits" else "finetune" if weights else "paper"


# Below this many training images, training from scratch (the paper's recipe, made for ImageNet's 1.28 M) overfits.
SMALL_DATA = 10_000


def recipe_line(cfg: TrainConfig, train_images: int) -> str:
    """The log line that says which recipe a run follows and why, with advice for small data."""
    why = {"digits": "the digits demo", "paper": "no --weights: from scratch, as the paper on ImageNet",
           "finetune": "--weights given: a short schedule, light augmentation, a new head when the classes differ"}
    reason = why[cfg.recipe] if cfg.recipe == automatic_recipe(cfg.data, cfg.weights) else "--recipe given"
    line = f"recipe: {cfg.recipe} ({reason})"
    if cfg.recipe == "paper" and train_images < SMALL_DATA and not cfg.weights:
        line += (f"; with {train_images} training images a model trained from scratch overfits: fine-tune a pretrained "
                 "one instead (--weights cvt-13), adding --freeze-backbone for very few images per class")
    elif cfg.weights and train_images < SMALL_DATA and not (cfg.freeze_backbone or cfg.layer_decay):
        line += f"; {train_images} training images: --freeze-backbone (a linear probe) or --layer-decay 0.75 may generalise better"
    return line


def _model_image_size(model: str | None, weights: str | None) -> int:
    """The resolution a registry name or a checkpoint was made for (none stated: 224, CvT-13's)."""
    if model is not None:
        return preset_config(model).image_size
    return stated_image_size(weights) or preset_config("cvt-13").image_size


def default_output(data: str) -> str:
    return str(Path("runs") / ("digits" if data == "digits" else Path(data.rstrip("/\\")).stem or "data"))


def help_default(f: dataclasses.Field) -> str | None:
    """An option's default for ``--help``: each recipe's value where the recipes set it."""
    key = "base_lr" if f.name == "lr" else f.name
    if not any(key in values for values in RECIPES.values()):
        return default_help(f)
    per_recipe = ", ".join(f"{name}: {show(values.get(key, f.default), f)}" for name, values in RECIPES.items())
    return f"the recipe's rate per 256 images ({per_recipe}) x batch / 256" if f.name == "lr" else f"the recipe's ({per_recipe})"
