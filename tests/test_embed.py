"""``cvt embed`` and ``embed_images``: pre-logit features of image files, to .npz or .safetensors.

The reference: the model's own head input, ``forward_head(forward_features(x), pre_logits=True)``,
on each image preprocessed alone; the files read back with NumPy and safetensors directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import torchcvt
from torchcvt import cli
from torchcvt.embed import embed_images
from torchcvt.transforms import PreprocessConfig, preprocess


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = torchcvt.create_model("cvt-tiny").eval()
    directory = tmp_path_factory.mktemp("tiny")
    pre = PreprocessConfig(48, 0.875, "bilinear")  # not the model's 32: the folder's preprocessing must be the one used
    torchcvt.save_pretrained(model, directory, preprocess=pre)
    return model, pre, directory


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, size in (("a.png", (40, 30)), ("b.jpg", (64, 64)), ("sub/c.png", (50, 90))):
        Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)).save(folder / name)
    return folder


def expected_features(model, pre, paths) -> np.ndarray:
    with torch.no_grad():
        rows = [model.forward_head(model.forward_features(preprocess(p, pre)[None]), pre_logits=True)[0] for p in paths]
    return torch.stack(rows).numpy()


@pytest.mark.parametrize("suffix", [".npz", ".safetensors"])
def test_embed_three_images(checkpoint, images, tmp_path, capsys, suffix):
    model, pre, directory = checkpoint
    out = tmp_path / f"features{suffix}"
    rc = cli.main(["embed", "--weights", str(directory), "--output", str(out), "--batch-size", "2", "--workers", "0", str(images)])
    assert rc == 0 and capsys.readouterr().out == f"wrote {out}: 3 x 128 float32 features of 3 image(s)\n"
    if suffix == ".npz":
        with np.load(out) as f:  # no pickles needed
            features, paths = f["features"], f["paths"].tolist()
    else:
        with safe_open(str(out), framework="numpy") as f:
            features, paths = f.get_tensor("features"), json.loads(f.metadata()["paths"])
    assert paths == [str(images / "a.png"), str(images / "b.jpg"), str(images / "sub" / "c.png")]
    assert features.shape == (3, 128) and features.dtype == np.float32
    np.testing.assert_allclose(features, expected_features(model, pre, paths), atol=1e-5, rtol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the atomic write left no temporary file


def test_embed_images_in_python_and_its_errors(checkpoint, images, tmp_path, capsys):
    model, pre, directory = checkpoint
    (images / "broken.png").write_bytes(b"not an image")
    result = embed_images(model, [images / "b.jpg", images / "broken.png", images / "missing.png"], preprocess=pre,
                          batch_size=1, on_error="skip")
    assert result.paths == [str(images / "b.jpg")] and len(result.skipped) == 2
    np.testing.assert_allclose(result.features, expected_features(model, pre, result.paths), atol=1e-5, rtol=0)

    rc = cli.main(["embed", "--weights", str(directory), "--output", str(tmp_path / "f.npz"), str(images)])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: ") and "broken.png" in err and err.count("\n") == 1
    assert not (tmp_path / "f.npz").exists()
    rc = cli.main(["embed", "--weights", str(directory), "--output", str(tmp_path / "f.npz"), "--on-error", "skip", str(images)])
    captured = capsys.readouterr()
    assert rc == 0 and "skipped" in captured.err and "3 x 128" in captured.out and "skipped 1 unreadable" in captured.out
    rc = cli.main(["embed", "--weights", str(directory), "--output", str(tmp_path / "f.csv"), str(images)])
    assert rc == 1 and capsys.readouterr().err == f"error: --output {tmp_path / 'f.csv'}: must end in .npz or .safetensors\n"
