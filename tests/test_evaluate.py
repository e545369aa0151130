"""Evaluation metrics against scikit-learn, and the ``cvt eval`` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import accuracy_score, confusion_matrix, log_loss, recall_score, top_k_accuracy_score
from torch.utils.data import DataLoader, TensorDataset

import torchcvt
from torchcvt import cli
from torchcvt.datasets import build_datasets
from torchcvt.evaluate import evaluate


def _sklearn_metrics(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict:
    labels = list(range(num_classes))
    probs = logits.double().softmax(-1).numpy()
    y = y.numpy()
    pred = logits.argmax(-1).numpy()
    return {
        "top1": accuracy_score(y, pred),
        "top5": top_k_accuracy_score(y, logits.numpy(), k=min(5, num_classes), labels=labels),
        "loss": log_loss(y, probs, labels=labels),
        "confusion": confusion_matrix(y, pred, labels=labels),
        "recall": recall_score(y, pred, labels=labels, average=None, zero_division=0),
    }


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")  # sklearn, for 3 classes
@pytest.mark.parametrize("num_classes", [7, 3])
def test_metrics_match_sklearn(num_classes):
    torch.manual_seed(0)
    # evaluate() takes any logits model; a linear one on noise gives varied predictions and losses.
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, num_classes))
    x = torch.randn(45, 3, 4, 4)
    y = torch.randint(0, num_classes, (45,))
    y[:num_classes] = torch.arange(num_classes)  # every class present, so every recall is defined
    with torch.no_grad():
        logits = model(x)
    ref = _sklearn_metrics(logits, y, num_classes)
    assert 0 < ref["top1"] < 1 and len(set(logits.argmax(-1).tolist())) == num_classes
    for batch_size in (45, 8):  # one batch and several, with a ragged last one
        result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=batch_size), num_classes=num_classes)
        assert result.count == 45 and result.k == min(5, num_classes)
        assert result.top1 == pytest.approx(ref["top1"], abs=1e-12)
        assert result.top5 == pytest.approx(ref["top5"], abs=1e-12)
        assert result.loss == pytest.approx(ref["loss"], rel=1e-6)
        np.testing.assert_array_equal(result.confusion.numpy(), ref["confusion"])
        np.testing.assert_allclose(result.per_class_accuracy, ref["recall"])
    assert model.training  # evaluate restores the training flag
    if num_classes < 5:
        assert result.top5 == 1.0  # top-k over every class always hits


def test_class_without_images_has_no_accuracy():
    model = torchcvt.create_model("cvt-tiny", num_classes=4)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 1, 2, 2, 2])
    result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4))
    assert result.per_class_accuracy[3] is None
    assert result.confusion.sum(dim=1).tolist() == [1, 2, 3, 0]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """A cvt-tiny digits classifier saved as a training run saves it: a random backbone and a head
    fitted by ridge regression on its features (in a second, instead of a training run), so that
    predictions are varied and mostly right (97 % on the held-out digits)."""
    from sklearn.linear_model import RidgeClassifier

    from torchcvt.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

    torch.manual_seed(1)
    model = torchcvt.create_model("cvt-tiny", num_classes=10, id2label={i: str(i) for i in range(10)}).eval()
    train = build_datasets("digits", image_size=32, train_transform=lambda x: x).train
    x = torch.stack([train[i][0] for i in range(len(train))])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    head = RidgeClassifier(alpha=1.0).fit(features, [train[i][1] for i in range(len(train))])
    model.head.weight.data = torch.tensor(head.coef_, dtype=torch.float32)
    model.head.bias.data = torch.tensor(head.intercept_, dtype=torch.float32)
    directory = tmp_path_factory.mktemp("digits-model")
    torchcvt.save_pretrained(model, directory, preprocess=PreprocessConfig(32, None, mean=IMAGENET_MEAN, std=IMAGENET_STD))
    return model.eval(), directory


def test_eval_command_json_matches_sklearn(digits_checkpoint, tmp_path, capsys):
    model, directory = digits_checkpoint
    png = tmp_path / "cm.png"
    rc = cli.main(["eval", "--weights", str(directory), "--data", "digits", "--format", "json", "--output", str(png)])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0
    val = build_datasets("digits", image_size=32).val  # the held-out split, computed independently
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        ref = _sklearn_metrics(model(x), y, 10)
    assert out["images"] == 360
    assert out["top1"] == pytest.approx(ref["top1"], abs=1e-12)
    assert out["top5"] == pytest.approx(ref["top5"], abs=1e-12)
    assert out["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert list(out["per_class_accuracy"].values()) == pytest.approx(list(ref["recall"]))
    assert out["confusion_matrix_png"] == str(png)
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) > 300


def test_eval_command_text_and_images_for_predict(digits_checkpoint, tmp_path, capsys):
    from torchcvt.inference import Classifier

    model, directory = digits_checkpoint
    rc = cli.main(["eval", "--weights", str(directory), "--data", "digits", "--output", str(tmp_path / "cm.png"),
                   "--save-images", "6"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "top-1" in out and "top-5" in out and "per-class accuracy" in out and f"confusion matrix: {tmp_path / 'cm.png'}" in out
    assert (tmp_path / "cm.png").is_file()
    # The saved images are the first held-out digits as the model saw them: the classifier that
    # `cvt predict` uses, reading the PNGs, predicts what the model predicts on the dataset tensors.
    files = sorted((tmp_path / "images").glob("*.png"))
    val = build_datasets("digits", image_size=32).val
    assert [f.name for f in files] == [f"{i:04d}_{val[i][1]}.png" for i in range(6)]
    with torch.no_grad():
        expected = model(torch.stack([val[i][0] for i in range(6)])).argmax(-1).tolist()
    predicted = [int(top[0][0]) for top in Classifier(str(directory), device="cpu")([str(f) for f in files], top_k=1)]
    assert predicted == expected


def test_eval_errors_are_one_line(digits_checkpoint, tmp_path, capsys):
    _, directory = digits_checkpoint
    rc = cli.main(["eval", "--weights", str(directory), "--data", str(tmp_path / "missing")])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith("error: data not found") and str(tmp_path / "missing") in err and err.count("\n") == 1

    three = torchcvt.create_model("cvt-tiny", num_classes=3)
    torchcvt.save_pretrained(three, tmp_path / "three")
    rc = cli.main(["eval", "--weights", str(tmp_path / "three"), "--data", "digits"])
    err = capsys.readouterr().err
    assert rc == 1 and err == "error: digits has 10 classes but the model has 3; evaluate on data with the model's classes\n"


def test_per_class_precision_recall_f1_match_sklearn():
    from sklearn.metrics import precision_recall_fscore_support

    torch.manual_seed(0)
    logits = torch.randn(60, 6)
    logits[:, 5] -= 100  # class 5: present, never predicted (precision undefined, F1 0)
    logits[:, 4] -= 100  # class 4: neither present nor predicted (F1 undefined)
    y = torch.randint(0, 4, (60,))
    y[:3] = 5
    # A model whose logits are its input: evaluate() sees exactly these predictions.
    model = torch.nn.Linear(6, 6)
    with torch.no_grad():
        model.weight.copy_(torch.eye(6))
        model.bias.zero_()
    result = evaluate(model, DataLoader(TensorDataset(logits, y), batch_size=16), num_classes=6)
    precision, recall, f1, _ = precision_recall_fscore_support(
        y.numpy(), logits.argmax(-1).numpy(), labels=list(range(6)), zero_division=np.nan)
    for ours, theirs in ((result.per_class_precision, precision), (result.per_class_recall, recall), (result.per_class_f1, f1)):
        np.testing.assert_allclose([np.nan if v is None else v for v in ours], theirs, rtol=1e-12)
    assert result.per_class_precision[5] is None and result.per_class_f1[5] == 0 and result.per_class_f1[4] is None
    out = result.to_dict()
    assert out["top5"] == result.top5 and out["per_class_f1"]["5"] == 0.0  # six classes: top-5 is reported
    assert result.predictions is None  # kept only when asked


@pytest.mark.filterwarnings("ignore:'k' .* greater than or equal to 'n_classes'")
def test_keep_topk_predictions_in_loader_order():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    x, y = torch.randn(10, 3, 2, 2), torch.randint(0, 3, (10,))
    result = evaluate(model, DataLoader(TensorDataset(x, y), batch_size=4), num_classes=3, keep_topk=5)
    with torch.no_grad():
        probs = model(x).softmax(-1)
    top = probs.topk(3, dim=-1)
    torch.testing.assert_close(result.predictions.scores, top.values)
    assert torch.equal(result.predictions.indices, top.indices) and torch.equal(result.predictions.targets, y)
    torch.testing.assert_close(result.predictions.target_scores, probs[torch.arange(10), y])
    assert "top5" not in result.to_dict() and "top5_k" not in result.to_dict()  # 3 classes: top-k would always hit


def test_eval_errors_csv_lists_the_misclassified_digits(digits_checkpoint, tmp_path, capsys):
    import csv

    model, directory = digits_checkpoint
    errors = tmp_path / "wrong.csv"
    rc = cli.main(["eval", "--weights", str(directory), "--data", "digits", "--output", str(tmp_path / "cm.png"),
                   "--errors", str(errors), "--format", "json"])
    out = json.loads(capsys.readouterr().out)
    val = build_datasets("digits", image_size=32).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    y = torch.tensor([val[i][1] for i in range(len(val))])
    with torch.no_grad():
        probs = model(x).softmax(-1)
    wrong = (probs.argmax(-1) != y).nonzero()[:, 0].tolist()
    with open(errors, newline="") as f:
        rows = list(csv.DictReader(f))
    assert rc == 0 and out["misclassified"] == len(wrong) == len(rows) > 0 and out["errors_csv"] == str(errors)
    # cvt eval runs the fused copy of the weights (probabilities within 1e-5 of the model's), written to 6 places.
    for i, row in zip(wrong, rows):
        top = probs[i].topk(5)
        assert row["path"] == f"digits:val:{i}" and int(row["true_index"]) == y[i] and row["true_label"] == str(int(y[i]))
        assert float(row["true_score"]) == pytest.approx(probs[i, y[i]].item(), abs=1e-5)
        assert [int(row[f"pred_{r}_index"]) for r in range(1, 6)] == top.indices.tolist()
        assert [float(row[f"pred_{r}_score"]) for r in range(1, 6)] == pytest.approx(top.values.tolist(), abs=1e-5)
    # The per-class F1 printed equals scikit-learn's on the same predictions.
    from sklearn.metrics import f1_score

    ref = f1_score(y.numpy(), probs.argmax(-1).numpy(), average=None, labels=list(range(10)))
    assert list(out["per_class_f1"].values()) == pytest.approx(list(ref))


def test_eval_with_few_classes_shows_no_top5_and_lists_files(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in ("cat", "dog", "owl"):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray((rng.random((20, 20, 3)) * 255).astype(np.uint8)).save(tmp_path / "data" / name / f"{i}.png")
    torch.manual_seed(0)
    torchcvt.save_pretrained(torchcvt.create_model("cvt-tiny", num_classes=3), tmp_path / "model")
    argv = ["eval", "--weights", str(tmp_path / "model"), "--data", str(tmp_path / "data"), "--split", "train",
            "--output", str(tmp_path / "cm.png"), "--errors", str(tmp_path / "wrong.csv"), "--workers", "0"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-3" not in out and "top-5" not in out and "precision" in out
    text = (tmp_path / "wrong.csv").read_text().splitlines()
    assert text[0] == ("path,true_index,true_label,true_score,pred_1_index,pred_1_label,pred_1_score,"
                       "pred_2_index,pred_2_label,pred_2_score,pred_3_index,pred_3_label,pred_3_score")
    assert all(Path(line.split(",")[0]).is_file() for line in text[1:])
    assert cli.main([*argv, "--format", "json"]) == 0
    assert "top5" not in json.loads(capsys.readouterr().out)
