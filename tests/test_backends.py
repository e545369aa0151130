"""Inference backends: ONNX Runtime against eager PyTorch on the same weights, the export cache, threads."""

from __future__ import annotations

import pytest
import torch

import torchcvt
from torchcvt import backends
from torchcvt.backends import OnnxRuntimeModel, available_backends, optimize_for_inference, resolve_backend, weights_hash
from torchcvt.errors import ConfigError

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export cache for the module: tests on the same weights reuse one export (seconds each)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHCVT_CACHE", str(root))
        yield root / "onnx"


def _model(image_size: int, seed: int = 0) -> torchcvt.CvT:
    torch.manual_seed(seed)
    config = torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=7,
                                image_size=image_size)
    model = torchcvt.create_model(config).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so a skipped norm shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_available_backends_and_resolution():
    assert available_backends() == ["eager", "onnxruntime"]
    assert resolve_backend("eager")[0] == "eager" and resolve_backend("onnxruntime")[0] == "onnxruntime"
    assert resolve_backend("auto")[0] in available_backends()
    with pytest.raises(ConfigError, match="backend must be one of auto, eager, onnxruntime"):
        resolve_backend("tensorrt")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_backend("onnxruntime", "cuda")


@pytest.mark.parametrize("image_size", [64, 32], ids=["dynamic-size", "fixed-size"])
def test_onnxruntime_matches_eager(cache, image_size):
    model = _model(image_size)
    runner = optimize_for_inference(model, "onnxruntime", threads=1)
    assert isinstance(runner, OnnxRuntimeModel)
    g = torch.Generator().manual_seed(1)
    for batch, height, width in [(1, image_size, image_size), (3, image_size, image_size), (2, image_size + 16, image_size + 8)]:
        x = torch.randn(batch, 3, height, width, generator=g)
        with torch.no_grad():
            expected = model(x)
        got = runner(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-4
        assert torch.equal(got.topk(3).indices, expected.topk(3).indices)
    files = sorted(p.name for p in cache.glob(f"{runner._key}*.onnx"))
    # One dynamic file; or one file per input size where the layout cannot take free sizes at this resolution.
    assert len(files) == (1 if image_size >= backends.min_dynamic_side(model.config) else 2)


def test_export_is_cached_per_weights(cache, monkeypatch):
    model = _model(64)
    first = optimize_for_inference(model, "onnxruntime", threads=1)
    assert first.path.is_file() and first.path.parent == cache

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the file for these weights is cached")

    monkeypatch.setattr(backends, "export_onnx", no_export)
    again = optimize_for_inference(_model(64), "onnxruntime", threads=1)  # same seed: the same weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max() < 1e-4
    with pytest.raises(AssertionError, match="exported again"):
        optimize_for_inference(_model(64, seed=1), "onnxruntime", threads=1)  # other weights: another file


def test_weights_hash_sees_every_tensor():
    model = _model(32)
    before = weights_hash(model)
    with torch.no_grad():
        model.stages[1].blocks[0].attn.conv_proj_k.bn.running_var[0] += 1e-3  # a buffer, not a parameter
    assert weights_hash(model) != before


def test_session_threads_and_no_spinning(cache):
    runner = optimize_for_inference(_model(64), "onnxruntime", threads=2)
    options = next(iter(runner._sessions.values())).get_session_options()
    assert options.intra_op_num_threads == 2
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_classifier_backends_agree(cache, tmp_path):
    model = _model(64)
    directory = torchcvt.save_pretrained(model, tmp_path / "ckpt")
    eager = torchcvt.Classifier(str(directory), device="cpu")
    onnx = torchcvt.Classifier(str(directory), device="cpu", backend="onnxruntime")
    assert onnx.backend == "onnxruntime" and "backend=onnxruntime" in repr(onnx)
    images = [torch.rand(3, 80, 70, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for ours, theirs in zip(eager(images, top_k=3), onnx(images, top_k=3)):
        assert [label for label, _ in ours] == [label for label, _ in theirs]
        assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) < 1e-5
    with pytest.raises(ConfigError, match="float32 only"):
        torchcvt.Classifier(str(directory), device="cpu", dtype="bfloat16", backend="onnxruntime")
