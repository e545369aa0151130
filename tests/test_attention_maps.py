"""Attention maps: recomputed cls-token attention against transformers' own attention probabilities,
and the ``cvt attention`` figure."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

import torchcvt
from torchcvt import cli
from torchcvt.attention_maps import attention_maps, cls_attention, overlay, upsample
from torchcvt.errors import ConfigError


def test_maps_match_transformers_attention_probabilities(reference):
    hf_model, directory = reference("tiny")
    model = torchcvt.create_model(weights=str(directory)).train()  # train mode must not matter
    x = torch.randn(3, 96, 128, generator=torch.Generator().manual_seed(0))  # non-square: catches h/w swaps

    # transformers computes einsum("bhlk,bhtk->bhlt", q, k) * scale, softmax, then its attention
    # dropout: the dropout's input is the probability matrix [B, heads, queries, keys].
    captured = {}
    dropout = hf_model.cvt.encoder.stages[-1].layers[-1].attention.attention.dropout
    handle = dropout.register_forward_hook(lambda m, args, out: captured.setdefault("probs", args[0]))
    with torch.no_grad():
        hf_logits = hf_model(x[None]).logits
    handle.remove()
    probs = captured["probs"]  # [1, heads, 1 + 6*8, 1 + 3*4]: queries on the 6x8 grid, keys strided to 3x4

    maps = attention_maps(model, x)
    assert maps.shape == (3, 3, 4) and maps.dtype == torch.float32
    expected = probs[0, :, 0, 1:].reshape(3, 3, 4)  # the cls token's row, keys without the cls token
    torch.testing.assert_close(maps, expected, atol=1e-6, rtol=1e-5)
    # The cls token's attention to itself is the missing mass.
    torch.testing.assert_close(maps.sum(dim=(1, 2)), 1 - probs[0, :, 0, 0], atol=1e-6, rtol=0)
    # The model is left as it was: still training, no hook behind.
    assert model.training
    assert not model.stages[-1].blocks[-1]._forward_pre_hooks
    _, logits = cls_attention(model, x)
    torch.testing.assert_close(logits, hf_logits[0], atol=1e-4, rtol=0)


def test_model_without_cls_token_is_a_clear_error():
    model = torchcvt.create_model("cvt-tiny", cls_token=(False, False, False))
    with pytest.raises(ConfigError, match="need a cls token in the last stage"):
        attention_maps(model, torch.zeros(3, 32, 32))


def test_overlay_by_hand():
    white = np.ones((1, 2, 3))
    heat = np.array([[0.0, 1.0]])
    # jet: 0 -> (0, 0, 0.5) dark blue, 1 -> (0.5, 0, 0) dark red; half of each over white.
    np.testing.assert_allclose(overlay(white, heat, alpha=0.5), [[[0.5, 0.5, 0.75], [0.75, 0.5, 0.5]]], atol=1e-6)
    np.testing.assert_allclose(overlay(white, heat, alpha=0.0), white)


def test_upsample_keeps_orientation_and_scales_each_map():
    maps = torch.zeros(2, 2, 3)
    maps[0, 0, 2] = 0.5  # top right
    maps[1, 1, 0] = 0.1  # bottom left
    up = upsample(maps, (20, 30))
    assert up.shape == (2, 20, 30)
    assert up[0, :10, 20:].max() == 1 and up[0, 10:, :10].max() == 0
    assert up[1, 10:, :10].max() == 1 and up[1, :10, 20:].max() == 0


def test_attention_command_draws_the_heatmap_over_the_image(reference, tmp_path, capsys):
    _, directory = reference("tiny")
    image = tmp_path / "photo.png"
    ramp = np.linspace(0, 255, 300, dtype=np.uint8)
    Image.fromarray(np.stack([np.tile(ramp, (200, 1))] * 3, axis=-1)).save(image)  # grey ramp, 300x200

    def draw(name: str, alpha: str) -> np.ndarray:
        out = tmp_path / name
        rc = cli.main(["attention", "--weights", str(directory), str(image), "--output", str(out), "--alpha", alpha])
        assert rc == 0
        assert f"wrote {out}" in capsys.readouterr().out
        with Image.open(out) as png:
            assert png.format == "PNG" and png.size == (1000, 500)  # 10 x 5 inches at 100 dpi
            return np.asarray(png.convert("RGB")).astype(int)

    heat = draw("heat.png", "0.5")
    plain = draw("plain.png", "0")  # the same figure, heatmap fully transparent
    left, right = np.abs(heat - plain)[:, :500], np.abs(heat - plain)[:, 500:]
    assert left.mean() > 20 and right.mean() > 5  # both the mean overlay and the head panels
    # Without the heatmap the main panel shows the grey image: R = G = B in its centre.
    centre = plain[200:300, 200:300]
    assert np.abs(centre[..., 0] - centre[..., 2]).max() <= 2
    # With it, colour appears there.
    assert np.abs(heat[200:300, 200:300, 0] - heat[200:300, 200:300, 2]).mean() > 20


def test_attention_command_without_cls_token(tmp_path, capsys):
    model = torchcvt.create_model("cvt-tiny", cls_token=(False, False, False))
    torchcvt.save_pretrained(model, tmp_path / "ckpt")
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 40), "white").save(image)
    rc = cli.main(["attention", "--weights", str(tmp_path / "ckpt"), str(image), "--output", str(tmp_path / "a.png")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: attention maps need a cls token") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "a.png").exists()
