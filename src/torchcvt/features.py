"""Feature extraction: ``create_model(name, features_only=True)``, timm's ``FeatureListNet`` for CvT.

The module keeps the stages of a CvT up to the last one asked for (the very same modules, so the
parameter names are the classifier's: ``stages.0.patch_embed.proj.weight``, ...) and returns the
selected stage maps, each a contiguous ``[B, C, H, W]`` tensor, as a list. For CvT-13 at 224x224:
64, 192 and 384 channels at strides 4, 8 and 16 (56x56, 28x28, 14x14). ``feature_info`` says so
(``channels()``, ``reduction()``, ``module_name()``) for the selected stages. The final norm, the
cls token's output and the head are not part of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import ConfigError
from .model import CvT, check_input


def stage_indices(out_indices: int | Sequence[int] | None, num_stages: int) -> tuple[int, ...]:
    """``out_indices`` as sorted stage indices: None all stages, an int n the last n, negatives from the end."""
    if out_indices is None:
        return tuple(range(num_stages))
    if isinstance(out_indices, int):
        if not 1 <= out_indices <= num_stages:
            raise ConfigError(f"out_indices={out_indices}: an int selects the last n stages, 1..{num_stages}")
        return tuple(range(num_stages - out_indices, num_stages))
    indices = list(out_indices)
    bad = [i for i in indices if not -num_stages <= i < num_stages]
    if bad or not indices:
        raise ConfigError(f"out_indices {indices} must select stages among 0..{num_stages - 1} (or -{num_stages}..-1)")
    return tuple(sorted({i % num_stages for i in indices}))


class FeatureListNet(nn.Module):
    """The stages of ``model`` up to the last of ``out_indices``; ``forward(x)`` returns their maps."""

    def __init__(self, model: CvT, out_indices: int | Sequence[int] | None = None) -> None:
        super().__init__()
        self.config = model.config
        self.out_indices = stage_indices(out_indices, len(model.stages))
        self.stages = nn.ModuleList(model.stages[: self.out_indices[-1] + 1])
        self.feature_info = model.feature_info.from_other(self.out_indices)
        self.pretrained_cfg = getattr(model, "pretrained_cfg", None)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        if not torch.compiler.is_compiling():
            check_input(self.config, x)
        maps = []
        for i, stage in enumerate(self.stages):
            x, _ = stage(x)
            if i in self.out_indices:
                maps.append(x.contiguous())  # inside the model a channels-last view (stage 2's: past its cls token)
        return maps
