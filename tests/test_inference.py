"""Inference: ``Classifier``, ``cvt predict`` and ``cvt models``.

References: transformers' image-classification pipeline on the same checkpoint and image (scores
to 1e-4), the microsoft/CvT model zoo (parameter counts, by hand formula), and the files we plant.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import torchcvt
from torchcvt import cli
from torchcvt.errors import CheckpointError, ConfigError
from torchcvt.inference import Classifier, collect_images
from torchcvt.pretrained import REGISTRY
from torchcvt.transforms import PreprocessConfig, write_preprocessor_config

from conftest import plant_hub_repo

LABELS = ["cat", "dog", "fox", "owl", "eel", "yak", "emu"]  # the tiny reference has 7 classes


def save_image(path: Path, size: tuple[int, int], seed: int, mode: str = "RGB") -> Path:
    """A smooth random image (noise upsampled), so that resizing matters but stays tame."""
    rng = np.random.default_rng(seed)
    small = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    img = Image.fromarray(small).resize(size, Image.Resampling.BILINEAR).convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


@pytest.fixture(scope="module")
def labelled_checkpoint(reference, tmp_path_factory):
    """The tiny transformers reference with named classes, a sharper head (scores far from ties, so
    top-5 orders are stable), hidden_act gelu and a 224 ConvNext preprocessor_config.json."""
    hf_model, directory = reference("tiny")
    model = copy.deepcopy(hf_model)
    with torch.no_grad():
        model.classifier.weight.mul_(40)
    model.config.id2label = dict(enumerate(LABELS))
    model.config.label2id = {name: i for i, name in enumerate(LABELS)}
    out = tmp_path_factory.mktemp("labelled")
    model.save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    config["hidden_act"] = "gelu"  # what transformers computes (see conftest)
    (out / "config.json").write_text(json.dumps(config))
    write_preprocessor_config(PreprocessConfig.for_resolution(224), out)
    return out


@pytest.fixture(scope="module")
def small_checkpoint(reference, tmp_path_factory):
    """The tiny reference as is (7 unnamed classes) but preprocessing at 64 pixels, for fast folder runs."""
    _, directory = reference("tiny")
    out = tmp_path_factory.mktemp("small")
    for name in ("config.json", "model.safetensors"):
        (out / name).write_bytes((directory / name).read_bytes())
    write_preprocessor_config(PreprocessConfig.for_resolution(64), out)
    return out


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# ------------------------------------------------------------------------ against transformers
def test_predict_json_matches_transformers_pipeline(labelled_checkpoint, tmp_path, capsys):
    from transformers import ConvNextImageProcessorPil, pipeline

    images = [
        save_image(tmp_path / "wide.png", (400, 300), 0),
        save_image(tmp_path / "tall.jpg", (190, 257), 1),
        save_image(tmp_path / "grey.png", (230, 230), 2, mode="L"),
    ]
    rc, out, err = run_cli(capsys, "predict", "--weights", labelled_checkpoint, "--format", "json", "--top-k", "5", *images)
    assert rc == 0, err
    ours = [json.loads(line) for line in out.splitlines()]
    assert [r["path"] for r in ours] == [str(p) for p in images]

    # The same preprocessor_config.json, read by transformers' PIL image processor.
    processor = ConvNextImageProcessorPil.from_pretrained(labelled_checkpoint)
    assert processor.size == {"shortest_edge": 224} and processor.crop_pct == 0.875
    classify = pipeline("image-classification", model=str(labelled_checkpoint), image_processor=processor, top_k=5)
    classifier = Classifier(labelled_checkpoint)
    for path, row in zip(images, ours):
        theirs = classify(str(path))
        assert [e["label"] for e in row["top_k"]] == [t["label"] for t in theirs]
        assert [e["index"] for e in row["top_k"]] == [LABELS.index(t["label"]) for t in theirs]
        np.testing.assert_allclose([e["score"] for e in row["top_k"]], [t["score"] for t in theirs], atol=1e-4)
        # The one-line Python call gives the same answer.
        python = classifier(path)
        assert [label for label, _ in python] == [t["label"] for t in theirs]
        np.testing.assert_allclose([s for _, s in python], [t["score"] for t in theirs], atol=1e-4)
        # ... and preprocess() is the tensor transformers feeds its model.
        expected = processor(Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"][0]
        torch.testing.assert_close(classifier.preprocess(path), expected, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------- folders and errors
def test_folder_of_200_with_3_corrupt_files_skips_and_names_them(small_checkpoint, tmp_path, capsys):
    root = tmp_path / "photos"
    good = [save_image(root / f"set{i % 3}" / f"img{i:03d}.png", (40, 30), i) for i in range(197)]
    valid = (root / "set0" / "img000.png").read_bytes()
    bad = [root / "set1" / "empty.png", root / "set2" / "truncated.png", root / "notes.jpg"]
    bad[0].write_bytes(b"")
    bad[1].write_bytes(valid[: len(valid) // 2])
    bad[2].write_text("not an image\n")
    (root / "readme.txt").write_text("ignored: not an image suffix\n")
    (root / ".hidden.png").write_bytes(b"ignored: hidden")

    rc, out, err = run_cli(capsys, "predict", "--weights", small_checkpoint, "--format", "csv", "--top-k", "3",
                           "--batch-size", "32", "--workers", "1", "--on-error", "skip", root)
    assert rc == 0, err
    rows = list(csv.DictReader(io.StringIO(out)))
    assert list(rows[0]) == ["path", "rank", "index", "label", "score"]
    assert len(rows) == 3 * 197
    assert {r["path"] for r in rows} == {str(p) for p in good}
    assert {r["rank"] for r in rows} == {"1", "2", "3"}
    assert all(r["label"] == f"class_{r['index']}" for r in rows)  # the checkpoint has no names
    for path in bad:
        assert sum(str(path) in line for line in err.splitlines()) == 1, err
    assert "readme.txt" not in err and ".hidden" not in err
    assert "skipped 3" in err
    assert "Traceback" not in err


def test_on_error_stop_reports_the_file_and_keeps_earlier_results(small_checkpoint, tmp_path, capsys):
    folder = tmp_path / "imgs"
    for i in range(5):
        save_image(folder / f"{i}.png", (40, 30), i)
    (folder / "2b.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # sorts between 2.png and 3.png
    output = tmp_path / "out.jsonl"
    rc, out, err = run_cli(capsys, "predict", "--weights", small_checkpoint, "--format", "json", "--output", output,
                           "--workers", "0", folder)
    assert rc == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "2b.png" in lines[0], err
    written = [json.loads(line)["path"] for line in output.read_text().splitlines()]
    assert written == [str(folder / f"{i}.png") for i in range(3)]


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--weights", "cvt-99", "{img}"], "unknown weights 'cvt-99'"),
        (["--weights", "{ckpt}", "{tmp}/missing.png"], "missing.png: no such file or directory"),
        (["--weights", "{ckpt}", "{tmp}/*.webp"], "no file matches"),
        (["--weights", "{ckpt}", "--dtype", "float16", "--device", "cpu", "{img}"], "float16 needs a CUDA device"),
        (["--weights", "{tmp}", "{img}"], "expected model.safetensors"),
    ],
)
def test_bad_input_gives_one_line(small_checkpoint, tmp_path, capsys, argv, expected):
    img = save_image(tmp_path / "ok.png", (40, 30), 0)
    fill = {"img": str(img), "ckpt": str(small_checkpoint), "tmp": str(tmp_path)}
    rc, out, err = run_cli(capsys, "predict", *[a.format(**fill) for a in argv])
    assert rc == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and expected in err, err


def test_collect_images(tmp_path):
    a = save_image(tmp_path / "a" / "x.png", (8, 8), 0)
    b = save_image(tmp_path / "a" / "deep" / "y.JPG", (8, 8), 1)
    txt = tmp_path / "a" / "z.txt"
    txt.write_text("no")
    save_image(tmp_path / "a" / ".git" / "hidden.png", (8, 8), 2)
    files, problems = collect_images([str(tmp_path / "a"), str(txt), str(tmp_path / "**" / "*.png"), str(tmp_path / "nope")])
    # folder: sorted walk, image suffixes only, hidden skipped; explicit file kept; glob deduplicated
    assert files == [a, b, txt]
    assert problems == [f"{tmp_path / 'nope'}: no such file or directory"]


def test_predict_as_a_real_command(small_checkpoint, tmp_path):
    img = save_image(tmp_path / "one.png", (40, 30), 0)
    proc = subprocess.run([sys.executable, "-m", "torchcvt", "predict", "--weights", str(small_checkpoint),
                           "--format", "csv", "--top-k", "2", str(img)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == "path,rank,index,label,score" and len(lines) == 3
    scores = [float(line.split(",")[-1]) for line in lines[1:]]
    assert 0 < scores[1] <= scores[0] <= 1


# --------------------------------------------------------------------------------- Python API
def test_classifier_labels_batches_and_dtypes(small_checkpoint):
    imgs = [np.full((30, 40, 3), v, dtype=np.uint8) for v in (0, 90, 180, 255)]
    clf = Classifier(small_checkpoint, device="cpu", batch_size=3)
    assert clf.labels == [f"class_{i}" for i in range(7)]
    assert clf.preprocess(imgs[0]).shape == (3, 64, 64)
    batched = clf(imgs, top_k=10)  # capped at 7 classes, two forward passes (3 + 1)
    assert len(batched) == 4 and all(len(r) == 7 for r in batched)
    for img, result in zip(imgs, batched):
        with torch.no_grad():
            probs = clf.model(clf.preprocess(img)[None]).softmax(-1)[0]
        assert [label for label, _ in result] == [f"class_{i}" for i in probs.argsort(descending=True).tolist()]
        assert sum(score for _, score in result) == pytest.approx(1.0, abs=1e-5)
    single = clf(imgs[1], top_k=2)  # one image: one list
    assert [label for label, _ in single] == [label for label, _ in batched[1][:2]]
    np.testing.assert_allclose([s for _, s in single], [s for _, s in batched[1][:2]], atol=1e-6)

    bf16 = Classifier(small_checkpoint, device="cpu", dtype="bfloat16")
    assert bf16.model.norm.weight.dtype == torch.bfloat16
    low = bf16(imgs[:2], top_k=7)
    for a, b in zip(low, batched[:2]):
        np.testing.assert_allclose([dict(a)[k] for k, _ in b], [s for _, s in b], atol=0.03)
    with pytest.raises(ConfigError, match="float16 needs a CUDA device"):
        Classifier(small_checkpoint, device="cpu", dtype="float16")
    with pytest.raises(ConfigError, match="dtype must be one of"):
        Classifier(small_checkpoint, dtype="int8")


def test_classifier_runs_a_fused_copy_of_loaded_weights_and_a_given_model_as_is(small_checkpoint):
    from torchcvt.fused import FusedBlock

    loaded = Classifier(small_checkpoint, device="cpu")
    assert loaded.runner is not loaded.model and loaded.backend == "eager"
    assert isinstance(loaded.runner.stages[-1].blocks[0], FusedBlock)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = loaded.model(x).softmax(-1)  # the plain model the copy was made from
    assert (loaded.probabilities(x) - reference).abs().max() < 1e-5
    # A model handed over may still be trained by its owner: it runs as is, so changes show.
    model = torchcvt.create_model("cvt-tiny", num_classes=3)
    given = Classifier(model)
    assert given.runner is model
    with torch.no_grad():
        model.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    assert given(np.zeros((32, 32, 3), dtype=np.uint8), top_k=1)[0][0] == "class_2"
    # bfloat16 has no fused copy: the model itself.
    assert Classifier(small_checkpoint, device="cpu", dtype="bfloat16").runner.norm.weight.dtype == torch.bfloat16


def test_classifier_of_a_model_uses_imagenet_names_for_1000_classes():
    model = torchcvt.create_model("cvt-tiny", num_classes=1000)
    clf = Classifier(model)
    assert clf.model is model and not model.training
    assert clf.preprocess_config == PreprocessConfig(image_size=32, crop_pct=0.875)
    # The names of the microsoft/cvt-* config.json (WordNet lemmas), in class order.
    assert len(clf.labels) == 1000
    assert (clf.labels[0], clf.labels[281]) == ("tench, Tinca tinca", "tabby, tabby cat")
    unnamed = Classifier(torchcvt.create_model("cvt-tiny", num_classes=3))
    assert unnamed.labels == ["class_0", "class_1", "class_2"]
    with pytest.raises(ConfigError, match="no classification head"):
        Classifier(torchcvt.create_model("cvt-tiny", num_classes=0))


def test_hub_ids_use_the_registry_recipe(reference, offline_hub, tmp_path):
    # Offline stand-ins in the Hugging Face cache: random CvT-13 and CvT-21 weights as the hub repos,
    # the 13 with a 64-pixel preprocessor_config.json that the registry must override.
    snapshot = plant_hub_repo(offline_hub, "microsoft/cvt-13-384-22k", reference("cvt-13")[1], 384)
    write_preprocessor_config(PreprocessConfig.for_resolution(64), snapshot)
    plant_hub_repo(offline_hub, "microsoft/cvt-21", reference("cvt-21")[1], 224)
    clf = Classifier("cvt-13-384-22k")
    assert clf.source == "microsoft/cvt-13-384-22k"
    # The registry wins over the folder's 64-pixel file: the 384 recipe squashes, no crop.
    assert clf.preprocess_config == PreprocessConfig(image_size=384, crop_pct=None)
    assert clf.model.config.image_size == 384
    assert Classifier("microsoft/cvt-21").preprocess_config == PreprocessConfig(image_size=224, crop_pct=0.875)
    with pytest.raises(CheckpointError, match="unknown weights 'cvt-13-22k'.*cvt-13-384-22k"):
        Classifier("cvt-13-22k")


# ------------------------------------------------------------------------------------ registry
def count_params(c) -> int:
    """Trainable parameters of a CvT layout, by hand (dw_bn projections, as all published models)."""
    total, cin = 0, c.num_channels
    for i in range(c.num_stages):
        d, k, kq = c.embed_dim[i], c.patch_sizes[i], c.kernel_qkv[i]
        hidden = int(d * c.mlp_ratio[i])
        total += cin * d * k * k + d + 2 * d + (d if c.cls_token[i] else 0)  # embedding conv + LayerNorm, cls
        block = (
            2 * d  # norm1
            + 3 * (d * kq * kq + 2 * d)  # q/k/v depthwise conv (no bias) + BatchNorm affine
            + 3 * (d * d + d) + (d * d + d)  # proj_q/k/v, proj
            + 2 * d  # norm2
            + (d * hidden + hidden) + (hidden * d + d)  # mlp
        )
        total += c.depth[i] * block
        cin = d
    return total + 2 * cin + cin * c.num_classes + c.num_classes  # final norm, head


def test_registry_matches_the_model_zoo():
    public = [e for e in REGISTRY.values() if e.hub_id is not None]
    # The seven transformers repositories of CvT, in the registry's order.
    assert [e.hub_id for e in public] == [
        "microsoft/cvt-13", "microsoft/cvt-13-384", "microsoft/cvt-13-384-22k", "microsoft/cvt-21",
        "microsoft/cvt-21-384", "microsoft/cvt-21-384-22k", "microsoft/cvt-w24-384-22k"]
    tiny = REGISTRY["cvt-tiny"].config()
    assert count_params(tiny) == sum(p.numel() for p in torchcvt.create_model("cvt-tiny").parameters())
    # Model zoos: 20.0M and 31.6M (PASSL), 277M (microsoft/CvT README; PASSL's 277.3M counts more).
    zoo = {"cvt-13": (20.0, 1), "cvt-21": (31.6, 1), "cvt-w24": (277, 0)}
    for w in REGISTRY.values():
        c = w.config()
        assert w.params == count_params(c)
        if w.layout in zoo:
            value, digits = zoo[w.layout]
            assert round(w.params / 1e6, digits) == value
        assert w.image_size == c.image_size and w.name.startswith(w.layout)
        assert w.hub_id in (None, f"microsoft/{w.name}")
        # Official evaluation: 87.5% centre crop at 224, plain resize at 384.
        assert w.preprocess_config() == PreprocessConfig.for_resolution(w.image_size)
        assert w.crop_pct == (0.875 if w.image_size < 384 else None)
        assert ("22k" in w.name) == (w.pretrained_on == "ImageNet-22k")
    assert [REGISTRY[n].top1_ported for n in ("cvt-13", "cvt-13-384-22k", "cvt-21", "cvt-21-384-22k", "cvt-w24-384-22k")] == [
        81.59, 82.90, 82.46, 84.63, 87.39]


def test_models_command_lists_weights_and_presets(capsys):
    rc, out, _ = run_cli(capsys, "models")
    assert rc == 0
    for w in REGISTRY.values():
        line = next(line for line in out.splitlines() if line.split()[:1] == [w.name])
        assert f"{w.params / 1e6:.1f}M" in line
        assert (f"{w.top1:.1f}" in line and w.hub_id in line) if w.hub_id else line.split()[-1] == "-"
    assert "cvt-tiny" in out
