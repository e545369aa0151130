"""Numbers against the reference: transformers' CvtForImageClassification with the same weights.

With ``hidden_act="gelu"`` (what transformers computes) logits and per-stage features must agree
to 1e-4 in fp32, for the transformers key layout and for the official microsoft/CvT key layout.
"""

from __future__ import annotations

import re

import pytest
import torch

import torchcvt

from conftest import REFERENCE_LAYOUTS

SHAPES = [(2, 3, 224, 224), (1, 3, 224, 224), (1, 3, 200, 264), (3, 3, 97, 131)]
TOL = 1e-4


def compare(hf_model, model, shape, seed=0):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = hf_model(x, output_hidden_states=True)
        logits = model(x)
        final, feats = model.forward_intermediates(x)
    assert logits.shape == ref.logits.shape
    assert (logits - ref.logits).abs().max().item() < TOL
    assert len(feats) == len(ref.hidden_states)
    for ours, theirs in zip(feats, ref.hidden_states):
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max().item() < TOL
    assert (model.forward_head(final) - ref.logits).abs().max().item() < TOL


@pytest.mark.parametrize("name", ["tiny", "cvt-13", "cvt-21"])
def test_matches_transformers(reference, name):
    hf_model, directory = reference(name)
    model = torchcvt.create_model(weights=str(directory)).eval()
    assert model.config.hidden_act == "gelu"
    shapes = SHAPES if name == "tiny" else SHAPES[:3]
    for i, shape in enumerate(shapes):
        compare(hf_model, model, shape, seed=i)


def test_quick_gelu_is_default_and_differs_from_gelu(reference):
    hf_model, directory = reference("tiny")
    model = torchcvt.create_model(weights=str(directory), hidden_act="quick_gelu").eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (model(x) - hf_model(x).logits).abs().max().item()
    assert diff > 1e-3  # the activation matters: a silent GELU/QuickGELU mix-up would show


# ---- the official microsoft/CvT layout, renamed the way transformers' conversion script does
def official_name(hf_key: str) -> str:
    """transformers key -> microsoft/CvT key, following convert_cvt_original_pytorch_checkpoint_to_pytorch.py."""
    k = re.sub(r"^cvt\.encoder\.stages\.(\d+)\.", r"stage\1.", hf_key)
    k = k.replace("embedding.convolution_embeddings.projection", "patch_embed.proj")
    k = k.replace("embedding.convolution_embeddings.normalization", "patch_embed.norm")
    k = re.sub(r"\.layers\.(\d+)\.", r".blocks.\1.", k)
    for theirs, ours in (("query", "q"), ("key", "k"), ("value", "v")):
        k = k.replace(f"attention.attention.convolution_projection_{theirs}.convolution_projection.convolution", f"attn.conv_proj_{ours}.conv")
        k = k.replace(f"attention.attention.convolution_projection_{theirs}.convolution_projection.normalization", f"attn.conv_proj_{ours}.bn")
        k = k.replace(f"attention.attention.projection_{theirs}", f"attn.proj_{ours}")
    k = k.replace("attention.output.dense", "attn.proj")
    k = k.replace("intermediate.dense", "mlp.fc1").replace("output.dense", "mlp.fc2")
    k = k.replace("layernorm_before", "norm1").replace("layernorm_after", "norm2")
    k = re.sub(r"^layernorm\.", "norm.", k)
    return re.sub(r"^classifier\.", "head.", k)


def read_key_list(name):
    from pathlib import Path

    rows = (Path(__file__).parent / "data" / name).read_text().splitlines()
    return {line.split("\t")[0]: line.split("\t")[1] for line in rows if line}


def test_official_key_layout_matches_reference_lists():
    """Our official names for CvT-13 are exactly the reference list, shapes included."""
    official = read_key_list("official_cvt13_keys.tsv")
    hf = read_key_list("hf_cvt13_keys.tsv")
    assert {official_name(k): v for k, v in hf.items()} == official
    model = torchcvt.CvT(224, 3, 1000)
    ours = {torchcvt.checkpoint.ours_to_official_key(k): str(list(v.shape)) for k, v in model.state_dict().items()}
    assert ours == official


@pytest.mark.parametrize("name", ["tiny", "cvt-13"])
def test_official_pth_gives_same_numbers(reference, tmp_path, name):
    hf_model, _ = reference(name)
    state = {official_name(k): v for k, v in hf_model.state_dict().items()}
    path = tmp_path / "CvT-x-224x224-IN-1k.pth"
    torch.save(state, path)
    if name == "tiny":  # heads leave no trace in the tensors: the layout must be given
        layout = {k: v for k, v in REFERENCE_LAYOUTS["tiny"].items() if k != "num_labels"}
        config = torchcvt.CvTConfig(**layout, num_classes=7)
    else:  # a published layout is recognised from its widths and depths
        config = None
    model = torchcvt.load_model(str(path), config=config, hidden_act="gelu").eval()
    assert model.config.image_size == 224
    compare(hf_model, model, (1, 3, 224, 224))
    compare(hf_model, model, (2, 3, 200, 264))
