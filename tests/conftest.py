"""Shared fixtures: reference checkpoints built by transformers with random weights.

Every reference is a real ``CvtForImageClassification`` with random weights, random BatchNorm
running statistics and random LayerNorm affines (so a swapped or skipped norm shows), saved with
``save_pretrained``. Its config.json gets ``"hidden_act": "gelu"`` because transformers' port
hard-codes GELU where the official weights use QuickGELU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

# One thread per test process: two OpenMP threads stall each other on a shared 2-core machine, and
# `make test` runs two pytest workers (-n 2) instead.
torch.set_num_threads(1)

# transformers' CvtConfig kwargs for each reference layout. transformers cannot build depth[i] <= i
# (its drop-path list is indexed by stage), hence depth (1, 2, 3) for the tiny one.
REFERENCE_LAYOUTS = {
    "tiny": dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=7),
    "cvt-13": dict(embed_dim=[64, 192, 384], num_heads=[1, 3, 6], depth=[1, 2, 10], num_labels=1000),
    "cvt-21": dict(embed_dim=[64, 192, 384], num_heads=[1, 3, 6], depth=[1, 4, 16], num_labels=1000),
}


def randomize_norms(model: torch.nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm)):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=g))


def build_reference(name: str, directory: Path, *, safe: bool = True, hidden_act: str | None = "gelu"):
    from transformers import CvtConfig, CvtForImageClassification

    torch.manual_seed(hash(name) % 1000)
    model = CvtForImageClassification(CvtConfig(**REFERENCE_LAYOUTS[name])).eval()
    randomize_norms(model)
    if safe:
        model.save_pretrained(directory)
    else:  # like microsoft/cvt-13-384: config.json + pytorch_model.bin (transformers 5 writes only safetensors)
        model.config.save_pretrained(directory)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
    if hidden_act is not None:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        config["hidden_act"] = hidden_act
        path.write_text(json.dumps(config))
    return model


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``reference(name) -> (transformers model, checkpoint directory)``, built once per session."""
    cache: dict[str, tuple] = {}

    def get(name: str):
        if name not in cache:
            directory = tmp_path_factory.mktemp(f"hf-{name}")
            cache[name] = (build_reference(name, directory), directory)
        return cache[name]

    return get
