"""Exports run outside PyTorch and give PyTorch's numbers: ONNX in onnxruntime, .pt2 reloaded.

The tiny reference layout keeps the default suite quick (each export ~10-30 s on 2 cores); the
CvT-13 ONNX check at batch 1 and 4, 224 and 288 is the slow test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import torchcvt
from torchcvt.cli import main
from torchcvt.export import ONNX_OPSETS, export_onnx, export_program, min_dynamic_side, onnx_opset
from torchcvt.fastpath import OneDNNLinear
from torchcvt.fused import fuse_for_inference
from torchcvt.transforms import IMAGENET_MEAN, IMAGENET_STD

TOL = 1e-4


def onnx_logits(path, x: torch.Tensor) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["pixel_values"]
    return session.run(["logits"], {"pixel_values": x.numpy()})[0]


def check_onnx(hf_model, path, shapes):
    """onnxruntime against transformers' logits (the reference), shape by shape."""
    for shape in shapes:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(sum(shape)))
        with torch.no_grad():
            expected = hf_model(x).logits.numpy()
        assert np.abs(onnx_logits(path, x) - expected).max() < TOL, shape


@pytest.mark.parametrize("optimized", [False, True])
def test_onnx_dynamic_tiny(reference, tmp_path, optimized):
    hf_model, directory = reference("tiny")
    model = torchcvt.create_model(weights=str(directory))
    assert isinstance(model.stages[0].blocks[0].mlp.fc1, OneDNNLinear)  # the fast path falls back to ATen ops while exporting
    if optimized:  # folded BatchNorm and fused linears export too (plain ATen ops while exporting)
        model = fuse_for_inference(model)
    path = export_onnx(model, tmp_path / "tiny.onnx", image_size=64)
    check_onnx(hf_model, path, [(1, 3, 64, 64), (4, 3, 64, 64), (4, 3, 96, 80)])


def test_pt2_dynamic_tiny(reference, tmp_path):
    hf_model, directory = reference("tiny")
    model = torchcvt.create_model(weights=str(directory))
    assert isinstance(model.stages[0].blocks[0].mlp.fc1, OneDNNLinear)
    path = export_program(model, tmp_path / "tiny.pt2", image_size=64)
    program = torch.export.load(str(path)).module()
    for shape in [(1, 3, 64, 64), (4, 3, 96, 80)]:
        x = torch.randn(shape)
        with torch.no_grad():
            assert (program(x) - hf_model(x).logits).abs().max() < TOL


def test_min_dynamic_side_by_hand():
    # CvT-13: grids s/4, s/8, s/16 and stride-2 k/v grids; the last k/v grid reaches 2 rows at s = 35:
    # 35 -> 9 (7x7 stride 4, pad 2) -> 5 -> 3 -> k/v (3 + 2 - 3) // 2 + 1 = 2; at 34 it is 1.
    assert min_dynamic_side(torchcvt.preset_config("cvt-13")) == 35


def test_cli_export_writes_checks_and_documents(reference, tmp_path, capsys):
    _, directory = reference("tiny")
    out = tmp_path / "model.onnx"
    code = main(["export", "--weights", str(directory), "--format", "onnx", "--output", str(out), "--image-size", "64",
                 "--opset", str(ONNX_OPSETS.start)])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert onnx_opset(out) == ONNX_OPSETS.start  # the opset asked for, exactly
    assert "max |onnx - pytorch| =" in printed and "1x3x64x64" in printed
    info = json.loads((tmp_path / "model.onnx.json").read_text())
    assert info["input"]["name"] == "pixel_values" and info["output"]["shape"] == ["batch", 7]
    assert info["preprocess"]["mean"] == pytest.approx(list(IMAGENET_MEAN))
    assert info["preprocess"]["std"] == pytest.approx(list(IMAGENET_STD))
    assert not list(tmp_path.glob(".*.tmp"))  # written through a temporary file and a rename


def test_cli_export_errors_are_one_line(tmp_path, capsys):
    code = main(["export", "--weights", "cvt-tiny", "--format", "pt2", "--output", str(tmp_path / "x.pt2"), "--opset", "18"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: --opset") and err.count("\n") == 1
    code = main(["export", "--weights", "cvt-13", "--format", "onnx", "--output", str(tmp_path / "x.onnx"), "--image-size", "2"])
    err = capsys.readouterr().err
    assert code == 1 and "--image-size 2" in err and err.count("\n") == 1
    code = main(["export", "--weights", "cvt-13", "--format", "onnx", "--output", str(tmp_path / "x.onnx"), "--image-size", "34", "--dynamic"])
    err = capsys.readouterr().err
    assert code == 1 and "at least 35" in err and err.count("\n") == 1
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.slow
def test_onnx_cvt13_batches_and_sizes(reference, tmp_path):
    hf_model, directory = reference("cvt-13")
    path = export_onnx(torchcvt.create_model(weights=str(directory)), tmp_path / "cvt13.onnx")
    check_onnx(hf_model, path, [(1, 3, 224, 224), (4, 3, 224, 224), (1, 3, 288, 288), (4, 3, 288, 288)])
