"""Model cards (modelcard.py) and publishing (hub.py: push_to_hub, ``cvt push``).

References: huggingface_hub's own parser of model cards (``ModelCard``), transformers running the
usage snippet of a card, and the bytes of the files on disk. The hub itself is never reached:
``HfApi.create_repo`` / ``create_commit`` are replaced by recorders, or the hub is offline.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from PIL import Image
from torch.utils.data import DataLoader

import torchcvt
from torchcvt import cli
from torchcvt.checkpoint import save_official
from torchcvt.datasets import build_datasets
from torchcvt.errors import ConfigError, HubError
from torchcvt.evaluate import evaluate
from torchcvt.modelcard import MARKER, PLACEHOLDER_REPO, write_model_card

RUN_FILES = {"last.pt": b"training state", "best.pt": b"best state", "metrics.csv": b"epoch\n1\n", "learning_curves.png": b"png"}


def tiny_model(**changes) -> torchcvt.CvT:
    torch.manual_seed(0)
    return torchcvt.create_model("cvt-tiny", id2label={i: f"digit {i}" for i in range(10)}, **changes)


# ------------------------------------------------------------------------------------ model cards
def test_save_pretrained_writes_a_hub_model_card(tmp_path):
    model = torchcvt.create_model("cvt-13-384")
    torchcvt.save_pretrained(model, tmp_path)
    card = ModelCard.load(tmp_path / "README.md")  # huggingface_hub's parser: what the hub reads
    data = card.data.to_dict()
    assert data["library_name"] == "torchcvt" and data["pipeline_tag"] == "image-classification"
    assert data["license"] == "apache-2.0" and data["datasets"] == ["imagenet-1k"] and data["metrics"] == ["accuracy"]
    assert {"image-classification", "cvt", "torchcvt"} <= set(data["tags"])
    text = card.text
    for section in ("Architecture", "Data", "Training recipe", "Metrics", "Evaluation preprocessing",
                    "Usage with torchcvt", "Usage with transformers", "Citation"):
        assert f"\n## {section}\n" in text
    assert "| widths (embed_dim) | 64, 192, 384 |" in text and "| parameters | 19,997,480 |" in text
    assert "resize to 384x384 (bicubic, aspect ratio not kept)" in text  # the preprocessor_config.json written beside it
    assert "QuickGELU" in text and "hard-codes GELU" in text and MARKER in text


def test_card_of_a_digits_model_renders_its_metrics(tmp_path):
    # A digits classifier: cvt-tiny with a ridge-regression head on its features (as test_evaluate.py).
    from sklearn.linear_model import RidgeClassifier

    model = tiny_model().eval()
    splits = build_datasets("digits", image_size=32, train_transform=lambda x: x)
    x = torch.stack([splits.train[i][0] for i in range(len(splits.train))])
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    head = RidgeClassifier().fit(features, [splits.train[i][1] for i in range(len(splits.train))])
    model.head.weight.data, model.head.bias.data = torch.tensor(head.coef_).float(), torch.tensor(head.intercept_).float()
    result = evaluate(model, DataLoader(splits.val, batch_size=64))
    metrics = {"top1": result.top1, "top5": result.top5, "loss": result.loss}
    torchcvt.save_pretrained(model, tmp_path)
    path = write_model_card(tmp_path, model.config, pretrained_cfg=model.pretrained_cfg, metrics=metrics,
                            data={"name": "digits", "train images": len(splits.train), "val images": len(splits.val)},
                            recipe={"epochs": 0, "head": "ridge regression"}, num_params=570_058)
    card = ModelCard.load(path)
    results = {r.metric_name: r.metric_value for r in card.data.eval_results}
    assert results == {"top-1 accuracy": round(100 * result.top1, 2), "top-5 accuracy": round(100 * result.top5, 2)}
    assert all(r.dataset_name == "digits" and r.task_type == "image-classification" for r in card.data.eval_results)
    assert card.data.datasets == ["digits"]
    assert f"| top-1 accuracy (`top1`) | {100 * result.top1:.2f} % |" in card.text
    assert f"| loss | {result.loss:.6g} |" in card.text and "| val images | 360 |" in card.text
    assert "| head | ridge regression |" in card.text and "digit 0, digit 1" in card.text


def test_a_readme_the_user_wrote_is_kept(tmp_path, caplog):
    model = tiny_model()
    (tmp_path / "README.md").write_text("# my notes\n")
    with caplog.at_level(logging.WARNING, logger="torchcvt"):
        torchcvt.save_pretrained(model, tmp_path)
    assert (tmp_path / "README.md").read_text() == "# my notes\n"
    assert "kept" in caplog.text and "README.md" in caplog.text
    (tmp_path / "README.md").unlink()
    torchcvt.save_pretrained(model, tmp_path)
    first = (tmp_path / "README.md").read_text()
    torchcvt.save_pretrained(tiny_model(hidden_act="gelu"), tmp_path)  # its own card: replaced
    assert (tmp_path / "README.md").read_text() != first and "| MLP activation | gelu |" in (tmp_path / "README.md").read_text()
    assert torchcvt.save_pretrained(model, tmp_path / "bare", model_card=False) and not (tmp_path / "bare" / "README.md").exists()


def transformers_snippet(card_text: str, repo: str) -> str:
    """The Python block of the card's transformers section, for ``repo``."""
    section = card_text.split("## Usage with transformers")[1]
    return re.search(r"```python\n(.*?)```", section, re.S)[1].replace(PLACEHOLDER_REPO, repo)


def test_the_cards_transformers_snippet_gives_torchcvts_logits(tmp_path):
    # QuickGELU, as the official weights; a layout transformers can build (depth 1 in stage 1 it cannot).
    torch.manual_seed(0)
    model = torchcvt.create_model(torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3),
                                                     num_classes=7, image_size=64)).eval()
    assert "use torchcvt" not in torchcvt.modelcard.model_card(model.config)
    assert "use torchcvt" in torchcvt.modelcard.model_card(model.config.replace(depth=(1, 1, 2)))  # IndexError there
    torchcvt.save_pretrained(model, tmp_path)
    code = transformers_snippet((tmp_path / "README.md").read_text(), str(tmp_path))
    image = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype(np.uint8))
    scope = {"image": image}
    exec(code, scope)
    with torch.no_grad():
        ours = model(torchcvt.Classifier(model).preprocess(image)[None])
        theirs = scope["logits"]
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)
        # Without the QuickGELU loop transformers computes GELU: other numbers (what the note says).
        exec(code.split("for module in")[0] + "logits = model(**processor(images=image, return_tensors='pt')).logits", scope)
        assert (scope["logits"] - ours).abs().max() > 1e-3


# --------------------------------------------------------------------------------------- push
@pytest.fixture
def hub_calls(monkeypatch):
    """HfApi's create_repo and create_commit, recorded instead of sent; the uploaded bytes kept."""
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["repo"] = (repo_id, kwargs)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["commit"] = (repo_id, kwargs)
        calls["files"] = {op.path_in_repo: (op.path_or_fileobj if isinstance(op.path_or_fileobj, bytes)
                                            else Path(op.path_or_fileobj).read_bytes()) for op in operations}
        return type("CommitInfo", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc", "pr_url": None})()

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def run_folder(path: Path) -> Path:
    torchcvt.save_pretrained(tiny_model(), path)
    for name, content in RUN_FILES.items():
        (path / name).write_bytes(content)
    return path


def test_push_uploads_the_model_files_only(tmp_path, hub_calls, capsys):
    folder = run_folder(tmp_path / "run")
    rc = cli.main(["push", str(folder), "me/cvt-digits", "--private"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("uploaded config.json, model.safetensors, preprocessor_config.json, README.md to me/cvt-digits")
    assert hub_calls["repo"] == ("me/cvt-digits", {"private": True, "exist_ok": True})
    assert hub_calls["commit"][1]["revision"] is None and hub_calls["commit"][1]["create_pr"] is False
    files = hub_calls["files"]
    assert set(files) == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"}
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        assert files[name] == (folder / name).read_bytes()
    card = files["README.md"].decode()
    assert card == (folder / "README.md").read_text().replace(PLACEHOLDER_REPO, "me/cvt-digits")
    assert 'Classifier("me/cvt-digits")' in card and PLACEHOLDER_REPO not in card

    torchcvt.push_to_hub(folder, "me/cvt-digits", include_checkpoints=True, create_pr=True)
    assert set(hub_calls["files"]) == {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "last.pt", "best.pt"}
    assert hub_calls["files"]["last.pt"] == RUN_FILES["last.pt"] and hub_calls["commit"][1]["create_pr"] is True


def test_push_a_model_or_an_official_file(tmp_path, hub_calls):
    model = tiny_model().eval()
    pushed = torchcvt.push_to_hub(model, "me/m")
    assert pushed.url == "https://huggingface.co/me/m/commit/abc"
    config = json.loads(hub_calls["files"]["config.json"])
    assert torchcvt.CvTConfig.from_dict(config) == model.config
    # An official .pth is converted to transformers' layout first: the uploaded weights read back equal.
    save_official(model, tmp_path / "CvT-tiny-32x32.pth")
    torchcvt.push_to_hub(tmp_path / "CvT-tiny-32x32.pth", "me/official")
    out = tmp_path / "downloaded"
    out.mkdir()
    for name, content in hub_calls["files"].items():
        (out / name).write_bytes(content)
    loaded = torchcvt.create_model(weights=str(out)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), atol=0, rtol=0)


def test_push_keeps_a_users_readme_and_writes_a_missing_one(tmp_path, hub_calls):
    folder = run_folder(tmp_path / "run")
    (folder / "README.md").write_text("# mine\n")
    torchcvt.push_to_hub(folder, "me/a")
    assert hub_calls["files"]["README.md"] == b"# mine\n"
    (folder / "README.md").unlink()
    torchcvt.push_to_hub(folder, "me/a")
    card = ModelCard(hub_calls["files"]["README.md"].decode())
    assert card.data.library_name == "torchcvt" and 'create_model(weights="me/a")' in card.text
    assert not (folder / "README.md").exists()  # written for the upload, not into the user's folder


def test_push_errors_are_one_line(tmp_path, offline_hub, monkeypatch, capsys):
    folder = run_folder(tmp_path / "run")
    rc = cli.main(["push", str(folder), "me/x"])  # offline_hub: HF_HUB_OFFLINE=1
    err = capsys.readouterr().err
    assert rc == 1 and err == "error: cannot upload to me/x: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1); unset it to upload\n"
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id, **kwargs):
        raise ConnectionError("Failed to establish a new connection: [Errno -3] Temporary failure in name resolution\nmore")

    monkeypatch.setattr(HfApi, "create_repo", unreachable)
    rc = cli.main(["push", str(folder), "me/x"])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("error: cannot upload to me/x on the Hugging Face Hub: Failed to establish a new connection")

    class Refused(Exception):
        response = type("Response", (), {"status_code": 401})()

    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: (_ for _ in ()).throw(Refused("401 Unauthorized")))
    with pytest.raises(HubError, match=r"^not allowed to write to me/x .*HTTP 401.*hf auth login"):
        torchcvt.push_to_hub(folder, "me/x")
    with pytest.raises(ConfigError, match="owner/name"):
        torchcvt.push_to_hub(folder, "not a repo id")
    with pytest.raises(ConfigError, match="no such file or folder"):
        torchcvt.push_to_hub(tmp_path / "missing", "me/x")
    with pytest.raises(ConfigError, match="got FeatureListNet"):
        torchcvt.push_to_hub(torchcvt.create_model("cvt-tiny", features_only=True), "me/x")
