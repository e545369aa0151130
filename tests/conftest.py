"""Shared fixtures: reference checkpoints built by transformers with random weights, and an
offline Hugging Face cache to plant them in as hub repositories.

Every reference is a real ``CvtForImageClassification`` with random weights, random BatchNorm
running statistics and random LayerNorm affines (so a swapped or skipped norm shows), saved with
``save_pretrained``. Its config.json gets ``"hidden_act": "gelu"`` because transformers' port
hard-codes GELU where the official weights use QuickGELU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

# One thread per test process: two OpenMP threads stall each other on a shared 2-core machine, and
# `make test` runs two pytest workers (-n 2) instead.
torch.set_num_threads(1)
# The fast path's GEMM is measured per CPU (fastpath.gemm_engine); the suite pins oneDNN so its
# layers are exercised on every machine (and in every CLI subprocess). test_optimize covers "mkl".
os.environ.setdefault("TORCHCVT_GEMM", "onednn")
# The suite's processes import torch before torchcvt, so MKL keeps its own dispatch in them; its CLI
# subprocesses would get the AMD shim (mkl_amd.py) and other float32 rounding, and the exact-resume tests
# compare runs made both ways bit for bit. So the shim is off here; test_mkl_amd turns it on where tested.
os.environ.setdefault("TORCHCVT_MKL_INTEL_PATH", "0")

# transformers' CvtConfig kwargs for each reference layout. transformers cannot build depth[i] <= i
# (its drop-path list is indexed by stage), hence depth (1, 2, 3) for the tiny one.
REFERENCE_LAYOUTS = {
    "tiny": dict(embed_dim=[16, 32, 48], num_heads=[1, 2, 3], depth=[1, 2, 3], num_labels=7),
    "cvt-13": dict(embed_dim=[64, 192, 384], num_heads=[1, 3, 6], depth=[1, 2, 10], num_labels=1000),
    "cvt-21": dict(embed_dim=[64, 192, 384], num_heads=[1, 3, 6], depth=[1, 4, 16], num_labels=1000),
    "cvt-w24": dict(embed_dim=[192, 768, 1024], num_heads=[3, 12, 16], depth=[2, 2, 20], num_labels=1000),  # 277M: slow tests only
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


# The preprocessor_config.json of the microsoft/cvt-* repositories (transformers' old feature-extractor
# spelling: an int size, the shortest edge; from 384 up ConvNext squashes and ignores crop_pct).
HUB_PREPROCESSOR = {
    "crop_pct": 0.875, "do_normalize": True, "do_resize": True, "feature_extractor_type": "ConvNextFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406], "image_std": [0.229, 0.224, 0.225], "resample": 3,
}
HUB_REVISION = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as refs/main holds


def plant_hub_repo(cache: Path, repo_id: str, checkpoint: Path, size: int) -> Path:
    """Make ``checkpoint`` (a transformers folder) the cached snapshot of ``repo_id``, laid out as
    ``snapshot_download`` leaves it: ``models--owner--name/refs/main`` naming a commit and
    ``snapshots/<commit>/`` with the files (links, as the cache links its blobs), plus the hub's
    preprocessor_config.json at ``size``. Returns the snapshot folder."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / HUB_REVISION
    snapshot.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "pytorch_model.bin"):
        if (checkpoint / name).is_file():
            (snapshot / name).symlink_to((checkpoint / name).resolve())
    (snapshot / "preprocessor_config.json").write_text(json.dumps({**HUB_PREPROCESSOR, "size": size}))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(HUB_REVISION)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache, read offline (no request leaves the machine); returns its folder."""
    import huggingface_hub.constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads both variables once, when imported: its constants must change too.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


# ------------------------------------------------------------------------------------ training runs
@pytest.fixture
def torch_state():
    """In-process runs set torch's thread count (``--threads``) and seed its global RNG: restore both."""
    threads, rng = torch.get_num_threads(), torch.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.set_rng_state(rng)


def cvt_train(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m torchcvt train ARGS`` in ``cwd``; fails the test on a non-zero exit."""
    proc = subprocess.run([sys.executable, "-m", "torchcvt", "train", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc


def read_metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# Two deterministic epochs on the digits (22 steps each), checkpointing every 5 steps: the reference
# that interrupted and resumed runs must end byte-identical to.
DIGITS_RUN = ("--epochs", "2", "--deterministic", "--checkpoint-every-steps", "5")


@pytest.fixture(scope="session")
def digits_run(tmp_path_factory) -> Path:
    """The run folder of ``cvt train DIGITS_RUN``, never interrupted."""
    cwd = tmp_path_factory.mktemp("digits")
    cvt_train(*DIGITS_RUN, "--output", "run", cwd=cwd)
    return cwd / "run"


def image_folder(root: Path, classes: dict[str, int], size: int = 40) -> Path:
    """``classes``: name -> number of images; each class has its own dominant colour."""
    rng = np.random.default_rng(0)
    for c, (name, count) in enumerate(classes.items()):
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(0, 128, (size, size, 3), dtype=np.uint8)
            pixels[..., c % 3] += 127
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root
