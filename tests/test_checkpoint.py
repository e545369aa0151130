"""Checkpoint formats in and out: transformers directories and files, official .pth, our own;
strict loading with useful errors; safe unpickling; the hub path offline."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import torchcvt
from torchcvt import CheckpointError, create_model, load_model
from torchcvt.checkpoint import read_checkpoint, save_official

from conftest import build_reference


def logits(model, x):
    with torch.no_grad():
        return model.eval()(x)


def test_save_pretrained_loads_in_transformers_unchanged(reference, tmp_path):
    from transformers import CvtForImageClassification

    hf_model, directory = reference("tiny")
    model = create_model(weights=str(directory))
    assert torchcvt.save_pretrained(model, tmp_path / "out") == tmp_path / "out"
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"config.json", "model.safetensors"}
    loaded, info = CvtForImageClassification.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert info["missing_keys"] == [] or set(info["missing_keys"]) == set()
    assert list(info["unexpected_keys"]) == [] and list(info["mismatched_keys"]) == []
    x = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        assert (loaded.eval()(x).logits - hf_model(x).logits).abs().max() < 1e-5
    # and back into torchcvt, numbers and config unchanged
    again = create_model(weights=str(tmp_path / "out"))
    assert again.config == model.config
    assert torch.equal(logits(again, x), logits(model, x))


def test_save_pretrained_cvt13_keys_and_bin(tmp_path):
    from transformers import CvtForImageClassification

    torch.manual_seed(0)
    model = create_model("cvt-13", num_classes=4, hidden_act="gelu")
    torchcvt.save_pretrained(model, tmp_path, safe_serialization=False)
    assert (tmp_path / "pytorch_model.bin").is_file() and not (tmp_path / "model.safetensors").exists()
    hf, info = CvtForImageClassification.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert (hf.eval()(x).logits - logits(model, x)).abs().max() < 1e-4


def test_bin_only_repository_and_files_alone(tmp_path):
    hf_model = build_reference("tiny", tmp_path / "bin", safe=False)  # like microsoft/cvt-13-384
    assert (tmp_path / "bin" / "pytorch_model.bin").is_file()
    x = torch.randn(1, 3, 64, 64)
    for source in (tmp_path / "bin", tmp_path / "bin" / "pytorch_model.bin"):
        model = load_model(str(source))
        with torch.no_grad():
            assert (logits(model, x) - hf_model(x).logits).abs().max() < 1e-4


def test_hidden_act_from_config_json(reference, tmp_path):
    _, directory = reference("tiny")
    assert create_model(weights=str(directory)).config.hidden_act == "gelu"
    shutil.copytree(directory, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    del config["hidden_act"]
    (tmp_path / "plain" / "config.json").write_text(json.dumps(config))
    assert create_model(weights=str(tmp_path / "plain")).config.hidden_act == "quick_gelu"
    # an explicit override wins over the file
    assert create_model(weights=str(directory), hidden_act="quick_gelu").config.hidden_act == "quick_gelu"
    layout = torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=7)
    assert create_model(layout, weights=str(directory)).config.hidden_act == "gelu"
    assert create_model(layout, weights=str(directory), hidden_act="quick_gelu").config.hidden_act == "quick_gelu"


def test_cvt21_into_cvt13_names_mismatched_keys(reference):
    _, directory = reference("cvt-21")
    with pytest.raises(CheckpointError) as err:
        create_model("cvt-13", weights=str(directory))
    message = str(err.value)
    assert "\n" not in message
    assert "depth (1, 4, 16) vs (1, 2, 10)" in message
    assert "unexpected key(s): stages.1.blocks.2." in message
    assert "does not fit the cvt-13 model" in message


def test_preset_plus_matching_weights(reference):
    hf_model, directory = reference("cvt-13")
    model = create_model("cvt-13", weights=str(directory))
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert (logits(model, x) - hf_model(x).logits).abs().max() < 1e-4


def test_new_head_only_when_asked(reference, caplog):
    hf_model, directory = reference("tiny")  # 7 classes
    with pytest.raises(CheckpointError, match=r"head\.weight checkpoint 7x48 vs model 3x48.*pass num_classes=3"):
        load_model(str(directory), config=torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=3))
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        model = create_model(weights=str(directory), num_classes=3)
    assert "new 3-class head" in caplog.text and "checkpoint has 7 classes" in caplog.text
    assert model.config.num_classes == 3 and model.head.out_features == 3
    # the backbone is the checkpoint's: features equal transformers' hidden states
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        ours = model.eval().forward_intermediates(x, intermediates_only=True)[-1]
        theirs = hf_model(x, output_hidden_states=True).hidden_states[-1]
    assert (ours - theirs).abs().max() < 1e-4
    same = create_model(weights=str(directory), num_classes=7)  # same count: the head is kept
    with torch.no_grad():
        assert (logits(same, x) - hf_model(x).logits).abs().max() < 1e-4


def test_own_and_official_round_trips(tmp_path):
    torch.manual_seed(0)
    config = torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), num_classes=3,
                                id2label={0: "a", 1: "b", 2: "c"}, image_size=64)
    model = create_model(config)  # with the fast path, as load_model returns it: the round trip is bit-exact
    x = torch.randn(2, 3, 64, 64)
    # a training-style checkpoint: our names plus the config
    torch.save({"model": model.state_dict(), "config": config.to_dict(), "epoch": 3}, tmp_path / "last.pt")
    loaded = load_model(str(tmp_path / "last.pt"))
    assert loaded.config == config and torch.equal(logits(loaded, x), logits(model, x))
    ckpt = read_checkpoint(str(tmp_path / "last.pt"))
    assert ckpt.format == "torchcvt"
    # official layout: keys stage{i}.*, no config; the layout is given since heads leave no trace
    save_official(model, tmp_path / "CvT-t-64x64.pth")
    assert read_checkpoint(str(tmp_path / "CvT-t-64x64.pth")).format == "official"
    official = load_model(str(tmp_path / "CvT-t-64x64.pth"), config=config)
    assert torch.equal(logits(official, x), logits(model, x))


def test_official_cvt13_layout_is_inferred(tmp_path):
    torch.manual_seed(0)
    model = create_model("cvt-13-384")
    save_official(model, tmp_path / "CvT-13-384x384-IN-1k.pth")
    loaded = load_model(str(tmp_path / "CvT-13-384x384-IN-1k.pth"))
    assert loaded.config.image_size == 384  # from the file name, as the official files are named
    assert loaded.config.depth == (1, 2, 10) and loaded.config.num_heads == (1, 3, 6)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(logits(loaded, x), logits(model, x))


class Evil:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_pickles_are_never_executed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"model": {"stages.0.x": torch.zeros(1)}, "payload": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="could run arbitrary code") as err:
        load_model(str(tmp_path / "evil.pth"))
    assert not (tmp_path / "PWNED").exists()
    assert "weights_only" not in str(err.value)  # torch's advice to unpickle anyway is never passed on


def test_bad_files(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00garbage" * 10)
    (tmp_path / "junk.pth").write_bytes(b"not a zip")
    (tmp_path / "nodir").mkdir()
    torch.save({"linear.weight": torch.zeros(2, 2)}, tmp_path / "other.pth")
    cases = {
        "empty.safetensors": "empty file",
        "junk.safetensors": "not a safetensors file",
        "junk.pth": "not a checkpoint: a text file",
        "nodir": "expected model.safetensors or pytorch_model.bin",
        "other.pth": "not a CvT state dict",
        "missing.pth": "no such file or directory",
    }
    for name, fragment in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_model(str(tmp_path / name))
        assert fragment in str(err.value) and name in str(err.value) and "\n" not in str(err.value)


def test_hub_offline_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as err:
        create_model(weights="microsoft/cvt-13")
    message = str(err.value)
    assert "microsoft/cvt-13" in message and "local directory" in message and "\n" not in message
