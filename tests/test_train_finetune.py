"""Fine-tuning and small-data controls of ``cvt train``: --layer-decay, --freeze-backbone, --early-stop,
--balance-classes, the recipe line, --tensorboard, the run's model card and top-5 only with more than
5 classes. The parts against hand computations first, then two short runs on a 3-class image folder."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

from torchcvt import cli
from torchcvt.evaluate import EvalResult
from torchcvt.optimization import build_optimizer, freeze_backbone, lr_at, param_groups, set_train_mode
from torchcvt.pretrained import create_model
from torchcvt.reproducibility import class_balanced_weights, epoch_batches
from torchcvt.run_control import early_stop
from torchcvt.train import resolve_config
from torchcvt.train_config import recipe_line
from torchcvt.train_state import Progress, epoch_line

from conftest import image_folder, read_metrics


# In-process runs set torch's thread count (--threads) and seed its global RNG: restore both after each test.
pytestmark = pytest.mark.usefixtures("torch_state")


def _depth_by_hand(name: str, depths: tuple[int, ...]) -> int:
    """How many layers lie between a parameter and the head, counted from the config's depths: per stage
    its convolutional embedding (with the cls token), then its blocks; the final norm and head on top."""
    top = sum(depths) + len(depths)
    if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.", name):
        s, b = int(m[1]), int(m[2])
        return top - (sum(depths[:s]) + s + 1 + b)
    if m := re.match(r"stages\.(\d+)\.", name):
        s = int(m[1])
        return top - (sum(depths[:s]) + s)
    return 0


# ------------------------------------------------------------------------------------ the parts
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before `optimizer.step\\(\\)`")
def test_layer_decay_gives_each_parameter_the_base_rate_times_decay_to_its_depth():
    model = create_model("cvt-tiny", num_classes=10)
    depths = tuple(model.config.depth)
    lr, decay = 1e-3, 0.6
    optimizer, scheduler = build_optimizer(model, lr=lr, weight_decay=0.05, warmup_lr=0.0, min_lr=1e-6, warmup_steps=0,
                                           total_steps=100, device=torch.device("cpu"), layer_decay=decay)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = Counter(names[id(p)] for g in optimizer.param_groups for p in g["params"])
    assert set(seen) == set(names.values()) and set(seen.values()) == {1}  # every parameter in exactly one group
    plain = param_groups(model, 0.05)
    no_decay = {names[id(p)] for p in plain[1]["params"]}
    for step in (0, 37):
        for group in optimizer.param_groups:
            for p in group["params"]:
                name = names[id(p)]
                expected = lr_at(step, lr=lr, warmup_lr=0.0, min_lr=1e-6, warmup_steps=0, total_steps=100) * decay ** _depth_by_hand(name, depths)
                assert group["lr"] == pytest.approx(expected, rel=1e-12), (name, step)
                assert group["weight_decay"] == (0.0 if name in no_decay else 0.05), name
        for _ in range(37 - step):
            scheduler.step()
    # The head learns at the full rate, the first embedding decay**9 slower (cvt-tiny: 3 stage embeddings + 6 blocks).
    assert _depth_by_hand("stages.0.patch_embed.proj.weight", depths) == sum(depths) + len(depths) == 9
    # Without --layer-decay: the two groups of the official recipe, counted by hand (matrices and kernels
    # decay; biases, norms and the cls token do not).
    decaying = [n for n, p in model.named_parameters() if p.ndim > 1 and "cls_token" not in n]
    assert [len(g["params"]) for g in plain] == [len(decaying), len(list(model.parameters())) - len(decaying)]


def test_freeze_backbone_trains_the_head_only_and_keeps_batchnorm_statistics():
    torch.manual_seed(0)
    model = create_model("cvt-tiny", num_classes=4, drop_path_rate=0.1)
    freeze_backbone(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer, _ = build_optimizer(model, lr=1e-2, weight_decay=0.05, warmup_lr=1e-2, min_lr=1e-2, warmup_steps=0,
                                   total_steps=10, device=torch.device("cpu"))
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.head.parameters()}
    set_train_mode(model, frozen_backbone=True)
    assert model.training and model.head.training and not model.stages.training and not model.norm.training
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed == {"head.weight", "head.bias"}  # BatchNorm running statistics and counts included
    # The features the head learnt on are the evaluation features: a frozen backbone in train mode computes what eval mode does.
    with torch.no_grad():
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        model.eval()
        torch.testing.assert_close(features, model.forward_head(model.forward_features(x), pre_logits=True), rtol=0, atol=0)


def test_early_stop_after_patience_epochs_without_a_better_top1():
    top1 = [0.50, 0.70, 0.70, 0.65, 0.80, 0.79, 0.80, 0.78]
    history = [{"epoch": e + 1, "val_top1": v} for e, v in enumerate(top1)]

    def by_hand(patience: int) -> int | None:
        best, best_epoch = -1.0, 0
        for epoch, value in enumerate(top1, start=1):
            if value > best:
                best, best_epoch = value, epoch
            if epoch - best_epoch >= patience:
                return epoch
        return None

    for patience in (1, 2, 3, 4):
        stops = [e for e in range(1, len(top1) + 1) if early_stop(history[:e], patience)]
        assert (stops[0] if stops else None) == by_hand(patience), patience
    assert by_hand(2) == 4 and by_hand(3) == 8 and by_hand(4) is None
    assert "since epoch 5 (80.00 %" in early_stop(history, 3) and early_stop(history, 0) is None


def test_class_balanced_draws_are_equal_per_class_and_keep_the_sampler_properties():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    weights = class_balanced_weights(labels)
    assert weights.tolist() == pytest.approx([1 / 90] * 90 + [1 / 9] * 9 + [1.0])
    draws = Counter()
    for epoch in range(200):
        for batch in epoch_batches(100, 10, seed=1, epoch=epoch, sample_weights=weights):
            draws.update(labels[i] for _, i, _ in batch)
    total = sum(draws.values())
    assert total == 200 * 100
    for c in range(3):  # 1/3 each; the binomial standard deviation of these frequencies is 0.0033
        assert draws[c] / total == pytest.approx(1 / 3, abs=0.015), draws
    # Shards of 2 processes x 2 accumulation steps rebuild the 1-process batches, and a resume
    # (start_step) gets the tail of the same epoch; every draw has its own augmentation key.
    one = epoch_batches(100, 20, seed=4, epoch=3, sample_weights=weights)
    shards = [epoch_batches(100, 20, seed=4, epoch=3, rank=r, world_size=2, accum_steps=2, sample_weights=weights) for r in range(2)]
    for step in range(5):
        assert [k for r in range(2) for m in range(2) for k in shards[r][step * 2 + m]] == one[step]
    assert epoch_batches(100, 20, seed=4, epoch=3, start_step=2, sample_weights=weights) == one[2:]
    keys = [k for batch in one for k in batch]
    assert len(set(keys)) == len(keys) == 100 and {k[2] for k in keys} == set(range(100))
    assert len({i for _, i, _ in keys}) < 100  # with replacement: the rare classes are drawn again


def test_top5_only_with_more_than_5_classes():
    confusion = torch.tensor([[3, 1, 0], [0, 2, 0], [1, 0, 3]])
    val = EvalResult(count=10, loss=0.5, top1=0.8, top5=1.0, k=3, confusion=confusion)
    row = Progress().end_epoch({"loss_sum": 2.0, "correct": 3, "seen": 4, "seconds": 1.0}, val, lr=1e-3)
    assert "val_top5" not in row and "top-3" not in epoch_line(row, 5, val.k)
    ten = EvalResult(count=10, loss=0.5, top1=0.8, top5=0.9, k=5, confusion=torch.eye(10, dtype=torch.int64))
    row = Progress().end_epoch({"loss_sum": 2.0, "correct": 3, "seen": 4, "seconds": 1.0}, ten, lr=1e-3)
    assert row["val_top5"] == 0.9 and "top-5 90.00 %" in epoch_line(row, 5, ten.k)


def test_the_recipe_line_says_which_recipe_and_why():
    assert recipe_line(resolve_config(), 1437) == "recipe: digits (the digits demo)"
    scratch = recipe_line(resolve_config(data="./pets", batch_size=64), 3680)
    assert scratch.startswith("recipe: paper (no --weights: from scratch") and "3680 training images" in scratch \
        and "--weights cvt-13" in scratch
    assert "overfits" not in recipe_line(resolve_config(data="./imagenet"), 1_281_167)
    tuned = recipe_line(resolve_config(data="./pets", weights="./cvt-13", image_size=224), 3680)
    assert tuned.startswith("recipe: finetune (--weights given") and "--freeze-backbone" in tuned
    assert recipe_line(resolve_config(data="./pets", recipe="finetune", model="cvt-13"), 50_000) == "recipe: finetune (--recipe given)"


# ------------------------------------------------------------------------------------ whole runs
def test_card_of_the_digits_run_renders_its_metrics(digits_run):
    card = (digits_run / "README.md").read_text()
    last = read_metrics(digits_run)[-1]
    assert card.startswith("---\n") and "library_name: torchcvt" in card and "pipeline_tag: image-classification" in card
    assert f"value: {round(100 * last['val_top1'], 2)}" in card  # the hub's model-index
    assert f"| top-1 accuracy (`val_top1`) | {100 * last['val_top1']:.2f} % |" in card
    assert f"| top-5 accuracy (`val_top5`) | {100 * last['val_top5']:.2f} % |" in card
    assert f"| epochs trained | {last['epoch']} |" in card and "| train images | 1437 |" in card


def test_early_stop_tensorboard_and_a_linear_probe_on_three_classes(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    data = image_folder(tmp_path / "shapes", {"a": 14, "b": 8, "c": 6}, size=32)
    common = ["--data", str(data), "--image-size", "32", "--batch-size", "8", "--workers", "0", "--threads", "1"]
    first = tmp_path / "scratch"
    # A rate of 1e-9 leaves the predictions as they were: val top-1 stops improving after epoch 1.
    rc = cli.main(["train", *common, "--model", "cvt-tiny", "--epochs", "5", "--lr", "1e-9", "--warmup-lr", "0",
                   "--min-lr", "0", "--early-stop", "1", "--tensorboard", "--balance-classes", "--output", str(first)])
    out = capsys.readouterr().out
    rows = read_metrics(first)
    best = max(range(len(rows)), key=lambda i: rows[i]["val_top1"])
    assert rc == 0 and len(rows) == best + 2 < 5, rows  # stopped one epoch after the best
    assert f"early stop after epoch {len(rows)}" in out and "class-balanced sampling" in out
    assert torch.load(first / "best.pt", weights_only=True)["epoch"] == rows[best]["epoch"]
    assert all("val_top5" not in r for r in rows) and "top-5" not in out  # 3 classes
    events = EventAccumulator(str(first / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in rows]
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx([r["train_loss"] for r in rows], rel=1e-6)
    assert [e.value for e in events.Scalars("val/top1")] == pytest.approx([r["val_top1"] for r in rows], rel=1e-6)
    assert "val/top5" not in events.Tags()["scalars"] and events.Tags()["images"] == ["train/augmented_images"]
    assert "| top-1 accuracy (`val_top1`) |" in (first / "README.md").read_text()

    # A linear probe from that model: only the head's weights move.
    probe = tmp_path / "probe"
    rc = cli.main(["train", *common, "--weights", str(first), "--freeze-backbone", "--epochs", "1", "--lr", "1e-2",
                   "--output", str(probe)])
    assert rc == 0 and "frozen backbone (linear probe)" in capsys.readouterr().out
    start, tuned = load_file(first / "model.safetensors"), load_file(probe / "model.safetensors")
    moved = {k for k in start if not torch.equal(start[k], tuned[k])}
    assert moved == {"classifier.weight", "classifier.bias"}, moved
    assert json.loads((probe / "train_config.json").read_text())["freeze_backbone"] is True


def test_a_class_balanced_run_with_layer_decay_stopped_mid_epoch_resumes_byte_identical(tmp_path, capsys, monkeypatch):
    """SIGINT inside step 4 (the second epoch: 3 steps each), then --resume: the same final model and
    metrics as the run never stopped (the draws with replacement and their augmentation included)."""
    import os
    import signal

    from torchcvt.train_state import EpochMeter

    data = image_folder(tmp_path / "shapes", {"a": 14, "b": 8, "c": 6}, size=32)
    options = ["train", "--data", str(data), "--model", "cvt-tiny", "--image-size", "32", "--batch-size", "8", "--epochs", "2",
               "--workers", "0", "--deterministic", "--balance-classes", "--layer-decay", "0.7", "--hflip", "0.5"]
    assert cli.main([*options, "--output", str(tmp_path / "whole")]) == 0
    calls, real_add = 0, EpochMeter.add

    def add(self, *args):
        nonlocal calls
        calls += 1
        if calls == 4:
            os.kill(os.getpid(), signal.SIGINT)
        real_add(self, *args)

    monkeypatch.setattr(EpochMeter, "add", add)
    assert cli.main([*options, "--output", str(tmp_path / "stopped")]) == 130
    assert torch.load(tmp_path / "stopped" / "last.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(EpochMeter, "add", real_add)
    assert cli.main(["train", "--resume", "--output", str(tmp_path / "stopped")]) == 0
    capsys.readouterr()
    whole, stopped = tmp_path / "whole", tmp_path / "stopped"
    assert (whole / "model.safetensors").read_bytes() == (stopped / "model.safetensors").read_bytes()
    timing = ("images_per_sec", "epoch_seconds")
    assert [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(whole)] == \
           [{k: v for k, v in r.items() if k not in timing} for r in read_metrics(stopped)]
    assert len(read_metrics(whole)) == 2 and read_metrics(whole)[-1]["step"] == 6
    # The logged lr is the head's (the scheduler's highest), not the first embedding's 0.7**9 of it.
    rates = torch.load(whole / "last.pt", weights_only=True)["scheduler"]["_last_lr"]
    assert read_metrics(whole)[-1]["lr"] == pytest.approx(max(rates), rel=1e-6) and min(rates) < 0.1 * max(rates)


def test_tensorboard_missing_is_one_line_before_the_run_folder_is_made(tmp_path, monkeypatch, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    assert cli.main(["train", "--epochs", "1", "--tensorboard", "--output", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == ("error: --tensorboard needs the tensorboard package: "
                                               "pip install 'torchcvt[tensorboard]' (or pip install tensorboard)")
    assert not (tmp_path / "run").exists()
