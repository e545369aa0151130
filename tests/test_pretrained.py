"""The registry: one name means one layout, one image size, one crop and one set of weights in
``create_model``, ``Classifier``, ``cvt summary``, ``cvt predict`` and ``cvt export``.

The public weights are played by random transformers checkpoints planted in an offline Hugging
Face cache, laid out as ``snapshot_download`` leaves it, so the real hub-id code path runs. The
reference for what a name means: the registry entry, and transformers' own reading of the same
files (its image processor on the hub's ``preprocessor_config.json``, its model on the weights).
The entries' numbers themselves are checked against the model zoos in test_inference.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchcvt
from torchcvt import cli
from torchcvt.checkpoint import download_from_hub
from torchcvt.errors import CheckpointError, ConfigError
from torchcvt.inference import Classifier
from torchcvt.pretrained import REGISTRY, create_model, list_models, preprocess_config_of, resolve
from torchcvt.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

from conftest import build_reference, plant_hub_repo

SRC = Path(torchcvt.__file__).parent
PUBLIC = list_models(pretrained=True)
LAYOUT_ONLY = [name for name in list_models() if name not in PUBLIC]
ARCHITECTURE = ("embed_dim", "depth", "num_heads", "patch_sizes", "patch_stride", "cls_token", "qkv_projection_method", "image_size")


QUICK = ("cvt-13", "cvt-13-384", "cvt-tiny")


def heavy(names: list[str]) -> list:
    """Building, loading and running CvT-21 (32M parameters) and CvT-W24 (277M) takes 1-2 minutes a name
    on 2 cores: they belong to the slow step. The quick one keeps a name at each resolution."""
    return [n if n in QUICK else pytest.param(n, marks=pytest.mark.slow) for n in names]


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def architecture(config: torchcvt.CvTConfig) -> dict:
    return {k: getattr(config, k) for k in ARCHITECTURE}


@pytest.fixture
def local_hub(reference, offline_hub, tmp_path):
    """``plant(name) -> (snapshot folder, transformers model)``: the name's hub repository in the
    offline cache, holding random transformers weights of its layout (hidden_act gelu, see conftest)."""

    def plant(name: str):
        entry = REGISTRY[name]
        if entry.layout == "cvt-w24":  # not kept in the session cache: 1.1 GB
            directory = tmp_path / "w24"
            hf_model = build_reference("cvt-w24", directory)
        else:
            hf_model, directory = reference(entry.layout)
        return plant_hub_repo(offline_hub, entry.hub_id, directory, entry.image_size), hf_model

    return plant


def record_export(monkeypatch) -> dict:
    """Replace the graph capture of ``cvt export`` (~30 s for CvT-13 here) by a recorder of what it is
    given; the real exports of every name run in test_every_name_exports_for_real (slow)."""
    seen: dict = {}

    def write_checked(model, path, fmt, *, image_size, dynamic, **checks):
        seen.update(config=model.config, image_size=image_size)
        Path(path).write_bytes(b"recorded")
        return 0.0

    monkeypatch.setattr("torchcvt.export.write_checked", write_checked)
    return seen


def sidecar_preprocess(path: Path) -> PreprocessConfig:
    p = json.loads(Path(f"{path}.json").read_text())["preprocess"]
    return PreprocessConfig(p["image_size"], p["crop_pct"], p["resample"], p["mean"], p["std"])


# ------------------------------------------------------------------------------ every name agrees
@pytest.mark.parametrize("name", list_models())
def test_every_name_means_one_layout(name, capsys):
    entry = REGISTRY[name]
    with torch.device("meta"):  # the layout alone; CvT-W24 would take 1.1 GB
        model = create_model(name)
    assert model.config == entry.config() and model.config.image_size == entry.image_size
    assert preprocess_config_of(model) == entry.preprocess_config()
    assert sum(p.numel() for p in model.parameters()) == entry.params
    rc, out, err = run_cli(capsys, "summary", name)
    assert rc == 0, err
    s, c = entry.image_size, entry.config()
    assert out.startswith(f"{name}: {c.num_stages} stages, depth {list(c.depth)}, widths {list(c.embed_dim)}")
    assert f"input {s}x{s}\n" in out and f"trainable parameters: {entry.params:,}" in out
    grids = [line.split()[1] for line in out.splitlines() if line.startswith("stage") and line.split()[0] != "stage"]
    assert grids == [f"{h}x{w}" for h, w in c.feature_sizes(s, s)]


@pytest.mark.parametrize("name", heavy(PUBLIC))
def test_every_public_name_loads_one_way(name, local_hub, monkeypatch, tmp_path, capsys):
    from transformers import AutoImageProcessor

    entry = REGISTRY[name]
    snapshot, hf_model = local_hub(name)
    # snapshot_download reads the planted copy offline, under the hub id and under the name.
    assert download_from_hub(entry.hub_id) == snapshot
    image = tmp_path / "wide.png"
    Image.fromarray((np.random.default_rng(0).random((12, 16, 3)) * 255).astype(np.uint8)).resize((301, 220)).save(image)

    model = create_model(name, pretrained=True)
    assert architecture(model.config) == architecture(entry.config())
    assert model.pretrained_cfg == entry.to_dict()
    # The local copy as a plain folder: the image size comes from its preprocessor_config.json.
    assert architecture(create_model(weights=str(snapshot)).config) == architecture(entry.config())
    by_name, by_folder = Classifier(name, device="cpu"), Classifier(snapshot, device="cpu")
    assert by_name.source == entry.hub_id
    assert by_name.preprocess_config == by_folder.preprocess_config == entry.preprocess_config()
    assert by_name.model.config.image_size == by_folder.model.config.image_size == entry.image_size

    # transformers' reading of the same files: its processor's pixels, its model's probabilities.
    processor = AutoImageProcessor.from_pretrained(snapshot)
    pixels = processor(Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, entry.image_size, entry.image_size)
    torch.testing.assert_close(by_name.preprocess(image)[None], pixels, atol=1e-6, rtol=0)
    with torch.no_grad():
        expected = hf_model(pixels).logits.softmax(-1)[0].topk(3)
    rc, out, err = run_cli(capsys, "predict", "--weights", name, "--format", "json", "--top-k", "3", image)
    assert rc == 0, err
    top = json.loads(out)["top_k"]
    assert [e["index"] for e in top] == expected.indices.tolist()
    np.testing.assert_allclose([e["score"] for e in top], expected.values.tolist(), atol=1e-4)

    seen = record_export(monkeypatch)
    rc, out, err = run_cli(capsys, "export", "--weights", name, "--format", "pt2", "--output", tmp_path / "m.pt2")
    assert rc == 0, err
    assert architecture(seen["config"]) == architecture(entry.config()) and seen["image_size"] == entry.image_size
    assert sidecar_preprocess(tmp_path / "m.pt2") == entry.preprocess_config()


@pytest.mark.parametrize("name", heavy(LAYOUT_ONLY))
def test_layout_only_names_build_random_weights_and_refuse_to_predict(name, monkeypatch, tmp_path, capsys):
    entry = REGISTRY[name]
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30), "white").save(image)
    for call in (lambda: create_model(name, pretrained=True), lambda: Classifier(name), lambda: torchcvt.load_model(name)):
        with pytest.raises(ConfigError) as err:
            call()
        message = str(err.value)
        assert "\n" not in message and message.startswith(f"{name} is a layout without public weights")
        assert message.endswith("names with weights: " + ", ".join(PUBLIC))
    rc, out, err = run_cli(capsys, "predict", "--weights", name, image)
    assert rc == 1 and out == "" and err.count("\n") == 1 and f"cvt export --model {name}" in err

    seen = record_export(monkeypatch)
    rc, out, err = run_cli(capsys, "export", "--model", name, "--format", "pt2", "--output", tmp_path / "m.pt2")
    assert rc == 0, err
    assert seen["config"] == entry.config() and seen["image_size"] == entry.image_size
    assert sidecar_preprocess(tmp_path / "m.pt2") == entry.preprocess_config()


@pytest.mark.slow
@pytest.mark.parametrize("name", list_models())
def test_every_name_exports_for_real(name, local_hub, tmp_path, capsys):
    entry = REGISTRY[name]
    if entry.hub_id is not None:
        local_hub(name)
    source = ["--weights", name] if entry.hub_id is not None else ["--model", name]
    rc, out, err = run_cli(capsys, "export", *source, "--format", "pt2", "--output", tmp_path / "m.pt2")
    assert rc == 0, err
    s = entry.image_size
    assert f"on inputs 1x3x{s}x{s}" in out
    assert sidecar_preprocess(tmp_path / "m.pt2") == entry.preprocess_config()
    program = torch.export.load(str(tmp_path / "m.pt2")).module()
    assert program(torch.zeros(1, 3, s, s)).shape == (1, entry.num_classes)


# ------------------------------------------------------------------------------ names and errors
def test_name_spellings_and_hub_ids():
    for name, entry in REGISTRY.items():
        for spelling in (name, name.upper(), name.replace("-", "_"), f" {name.title()} "):
            assert resolve(spelling) is entry
        if entry.hub_id is not None:
            assert resolve(entry.hub_id) is entry and resolve(entry.hub_id.upper()) is entry
    # Paths and other owners' repositories are checkpoints, not names.
    for other in ("./cvt-13", "someone/cvt-13", "cvt-13.pth", Path("cvt-13"), "cvt-99"):
        assert resolve(other) is None
    assert create_model("CvT_21_384").config == REGISTRY["cvt-21-384"].config()
    with torch.device("meta"):
        assert create_model("MICROSOFT/cvt-w24-384-22k").config == REGISTRY["cvt-w24-384-22k"].config()
    assert torchcvt.preset_config("cvt_13_384_22k") == REGISTRY["cvt-13-384-22k"].config()
    with pytest.raises(ConfigError, match=r"^unknown model 'cvt-99'; registry names: cvt-13, "):
        create_model("cvt-99")
    with pytest.raises(ConfigError, match="unknown CvTConfig field"):
        create_model("cvt-13", depths=(1, 1, 1))


def test_pretrained_offline_without_a_copy_is_one_line(offline_hub):
    with pytest.raises(CheckpointError) as err:
        create_model("cvt_21", pretrained=True)
    message = str(err.value)
    assert "\n" not in message and message.startswith("cannot download 'microsoft/cvt-21' from the Hugging Face Hub")
    with pytest.raises(ConfigError, match="takes a registry name"):
        create_model(torchcvt.CvTConfig(), pretrained=True)


def test_pretrained_cfg_of_names_configs_and_folders(tmp_path):
    # The published facts of microsoft/cvt-13-384: 384 squash, bicubic, ImageNet statistics, Apache-2.0,
    # trained on ImageNet-1k to 83.0 % top-1 (microsoft/CvT README); timm's names for the first
    # convolution and the classifier.
    assert create_model("cvt-13-384").pretrained_cfg == {
        "input_size": (3, 384, 384), "crop_pct": None, "crop_mode": "squash", "interpolation": "bicubic",
        "mean": IMAGENET_MEAN, "std": IMAGENET_STD, "first_conv": "stages.0.patch_embed.proj", "classifier": "head",
        "name": "cvt-13-384", "hub_id": "microsoft/cvt-13-384", "num_classes": 1000,
        "labels": "imagenet-1k", "license": "apache-2.0", "pretrained_on": "ImageNet-1k", "top1": 83.0,
    }
    # Another size than the entry's: the official recipe for that size, the entry still named.
    resized = create_model("cvt-13-384", image_size=224).pretrained_cfg
    assert resized["input_size"] == (3, 224, 224) and resized["crop_pct"] == 0.875 and resized["name"] == "cvt-13-384"
    plain = create_model(torchcvt.CvTConfig(image_size=160, num_classes=3)).pretrained_cfg
    assert plain["input_size"] == (3, 160, 160) and plain["crop_pct"] == 0.875 and plain["hub_id"] is None
    # A folder: what its preprocessor_config.json says, and Classifier(model) follows it.
    model = create_model("cvt-tiny")
    pre = PreprocessConfig(32, None, "bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    assert torchcvt.save_pretrained(model, tmp_path / "run", preprocess=pre) == tmp_path / "run"
    loaded = create_model(weights=str(tmp_path / "run"))
    assert loaded.pretrained_cfg["input_size"] == (3, 32, 32) and loaded.pretrained_cfg["hub_id"] is None
    assert preprocess_config_of(loaded) == pre and Classifier(loaded).preprocess_config == pre
    assert torchcvt.load_pretrained(tmp_path / "run")[1:] == (pre, str(tmp_path / "run"))


def test_transformers_folder_takes_its_image_size_from_the_preprocessor_config(reference, tmp_path):
    from conftest import HUB_PREPROCESSOR

    _, directory = reference("tiny")  # transformers' config.json: no image_size
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).symlink_to(directory / name)
    assert create_model(weights=str(tmp_path)).config.image_size == 224  # nothing says: CvTConfig's default
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**HUB_PREPROCESSOR, "size": 384}))
    model = create_model(weights=str(tmp_path))
    assert model.config.image_size == 384 and preprocess_config_of(model) == PreprocessConfig.for_resolution(384)
    layout = torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=7)
    assert create_model(layout, weights=str(tmp_path)).config.image_size == 384  # a given layout keeps the stated size
