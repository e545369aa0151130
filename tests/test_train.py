"""Training: the recipe's parts against hand computations and PyTorch references, then whole runs of
``cvt train`` (as subprocesses, or through ``cli.main`` in this process when they are short): resume
2-process torchrun, fine-tuning a transformers checkpoint, NaN loss, bad input. Faults (kills, signals,
protected run folders, a full disk) are in test_train_faults.py."""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file
from sklearn.metrics import accuracy_score

import torchcvt
from torchcvt import cli, train
from torchcvt.datasets import build_datasets
from torchcvt.distributed import CrossRankBatchNorm2d
from torchcvt.optimization import lr_at, param_groups
from torchcvt.reproducibility import epoch_batches, stream_seed
from torchcvt.train import RECIPES, TrainConfig, resolve_config
from torchcvt.train_state import EMA

from conftest import cvt_train, image_folder, read_metrics


# In-process runs set torch's thread count (--threads) and seed its global RNG: restore both after each test.
pytestmark = pytest.mark.usefixtures("torch_state")


# ------------------------------------------------------------------------------------ the parts
def test_lr_schedule_by_hand():
    s = dict(lr=1.0, warmup_lr=0.1, min_lr=0.0, warmup_steps=10, total_steps=110)
    assert lr_at(0, **s) == pytest.approx(0.1)
    assert lr_at(5, **s) == pytest.approx(0.55)  # halfway up the linear warm-up
    assert lr_at(10, **s) == pytest.approx(1.0)
    assert lr_at(60, **s) == pytest.approx(0.5)  # cosine midpoint
    assert lr_at(85, **s) == pytest.approx(0.5 * (1 - math.sqrt(0.5)))  # cos(3 pi / 4) = -sqrt(1/2)
    assert lr_at(110, **s) == pytest.approx(0.0)
    assert lr_at(500, **s) == pytest.approx(0.0)  # past the end: stays at min_lr


def test_no_weight_decay_on_norms_biases_and_cls_token():
    model = torchcvt.create_model("cvt-13", num_classes=10)
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    # By name, as the official WITHOUT_WD_LIST ['bn', 'bias', 'ln'] plus the cls token.
    expected = {n for n in names.values()
                if n.endswith(".bias") or ".norm" in n or n.startswith("norm.") or ".bn." in n or n.endswith("cls_token")}
    assert {names[id(p)] for p in no_decay["params"]} == expected
    assert {names[id(p)] for p in decay["params"]} == set(names.values()) - expected
    assert "stages.2.cls_token" in expected and "head.weight" not in expected


def test_shards_of_the_global_batch_rebuild_the_one_process_order():
    one = epoch_batches(103, 8, seed=3, epoch=1)
    assert len(one) == 12 and all(len(b) == 8 for b in one)  # 103 // 8 batches, the rest dropped
    indices = [i for b in one for _, i in b]
    assert len(set(indices)) == 96 and set(indices) <= set(range(103))
    assert {e for b in one for e, _ in b} == {1}
    for world, accum in ((2, 1), (4, 1), (2, 2)):
        shards = [epoch_batches(103, 8, seed=3, epoch=1, rank=r, world_size=world, accum_steps=accum) for r in range(world)]
        for step in range(12):
            micro = [shards[r][step * accum + m] for r in range(world) for m in range(accum)]
            assert all(len(b) == 8 // world // accum for b in micro)
            assert [x for b in micro for x in b] == one[step]
    assert epoch_batches(103, 8, seed=3, epoch=1, start_step=5) == one[5:]  # resume mid-epoch
    assert epoch_batches(103, 8, seed=3, epoch=2) != one and epoch_batches(103, 8, seed=4, epoch=1) != one


def test_stream_seeds_are_distinct_and_stable():
    seeds = {stream_seed(1, 0, epoch, i) for epoch in range(3) for i in range(1000)}
    assert len(seeds) == 3000 and all(0 <= s < 2**63 for s in seeds)
    assert stream_seed(1, 2, 3) == stream_seed(1, 2, 3) != stream_seed(1, 3, 2)


def test_ema_by_hand():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2))
    start = model[0].weight.detach().clone()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[1].num_batches_tracked.fill_(7)
    ema.update(model)
    ema.update(model)
    # Two updates towards 1: 0.81 * start + (0.09 + 0.1) * 1.
    torch.testing.assert_close(ema.module[0].weight, 0.81 * start + 0.19)
    assert ema.module[1].num_batches_tracked == 7 and not ema.module[0].weight.requires_grad


def _cross_rank_bn_worker(rank: int, store: str, x: np.ndarray, grad_out: np.ndarray, queue) -> None:
    import torch.distributed as dist

    x, grad_out = torch.from_numpy(x), torch.from_numpy(grad_out)
    # A file rendezvous: no TCP port to pick, so no race with other tests' processes.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    bn = CrossRankBatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        bn.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    part = slice(3 * rank, 3 * rank + 3)  # rank 0: samples 0-2, rank 1: samples 3-5
    xs = x[part].clone().requires_grad_()
    out = bn(xs)
    (out * grad_out[part]).sum().backward()
    # As numpy arrays, pickled by value: a tensor would travel as a file descriptor that this process
    # must still serve when the test reads it, and it may have exited by then.
    tensors = (out.detach(), xs.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var)
    queue.put((rank, *(t.numpy().copy() for t in tensors)))
    dist.destroy_process_group()


def test_cross_rank_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    """2 gloo processes with half a batch each vs nn.BatchNorm2d on the whole batch: outputs, input
    gradients, summed weight gradients and running statistics agree."""
    ctx = torch.multiprocessing.get_context("spawn")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, 5, 5, generator=g) * 3 + 1
    grad_out = torch.randn(6, 4, 5, 5, generator=g)
    queue = ctx.Queue()
    # Only plain arrays cross the process boundary, both ways: torch.multiprocessing shares a tensor by
    # file descriptor, served by the sending process, which may have exited by the time it is read.
    procs = [ctx.Process(target=_cross_rank_bn_worker, args=(r, str(tmp_path / "store"), x.numpy(), grad_out.numpy(), queue))
             for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = {item[0]: [torch.from_numpy(a) for a in item[1:]] for item in (queue.get(timeout=600) for _ in procs)}
    finally:
        for p in procs:
            p.join(timeout=600)
    assert [p.exitcode for p in procs] == [0, 0]

    ref = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        ref.weight.copy_(torch.tensor([1.0, 2.0, 0.5, -1.0]))
        ref.bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    xr = x.clone().requires_grad_()
    out = ref(xr)
    (out * grad_out).sum().backward()
    torch.testing.assert_close(torch.cat([results[0][0], results[1][0]]), out.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.cat([results[0][1], results[1][1]]), xr.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][2] + results[1][2], ref.weight.grad, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(results[0][3] + results[1][3], ref.bias.grad, atol=1e-4, rtol=1e-5)
    for r in range(2):
        torch.testing.assert_close(results[r][4], ref.running_mean)
        torch.testing.assert_close(results[r][5], ref.running_var)


def test_defaults_are_the_digits_recipe():
    assert resolve_config() == TrainConfig()
    pets = resolve_config(data="./pets", weights="./cvt-13", image_size=224, batch_size=128, drop_path="0,0,0.2")
    assert (pets.recipe, pets.model, pets.epochs, pets.mixup, pets.randaugment, pets.crop_scale) == \
        ("finetune", None, 10, 0.0, None, 0.35)
    assert pets.lr == pytest.approx(2e-4 * 128 / 256) and pets.drop_path == (0.0, 0.0, 0.2)
    scratch = resolve_config(data="./imagenet", model="cvt-21", batch_size=2048)
    assert (scratch.recipe, scratch.weight_decay, scratch.epochs, scratch.warmup_epochs) == ("paper", 0.1, 300, 5.0)
    assert scratch.lr == pytest.approx(2.5e-4 * 8) and scratch.image_size == 224
    with pytest.raises(torchcvt.ConfigError, match="unknown training option"):
        resolve_config(learning_rate=1.0)


def test_cross_entropy_on_probabilities_is_the_soft_target_cross_entropy():
    """Under mixup/cutmix the loop uses nn.CrossEntropyLoss on probability targets (label_smoothing 0:
    the mixed targets carry the smoothing): the mean over the batch of -sum(t * log_softmax(logits)),
    in value and gradient, on smoothed and mixed one-hots as Mixup makes them."""
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(16, 10, generator=g) * 3).requires_grad_()
    y = torch.randint(0, 10, (16,), generator=g)
    smooth = lambda labels: F.one_hot(labels, 10).float() * (1 - 0.1) + 0.1 / 10  # noqa: E731
    for target in (smooth(y), 0.3 * smooth(y) + 0.7 * smooth(y.flip(0)), torch.softmax(torch.randn(16, 10, generator=g), -1)):
        ours = torch.nn.CrossEntropyLoss()(logits, target)
        (grad,) = torch.autograd.grad(ours, logits)
        reference = -(target * torch.log_softmax(logits.double(), dim=-1)).sum(-1).mean()
        (reference_grad,) = torch.autograd.grad(reference, logits)
        torch.testing.assert_close(ours.double(), reference)
        torch.testing.assert_close(grad, reference_grad.float())


def test_every_option_comes_from_a_field_with_help_and_the_recipes_defaults():
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    text = " ".join(parser.format_help().split())
    given = vars(parser.parse_args([]))
    assert set(given) == {f.name for f in dataclasses.fields(TrainConfig)} | {"resume", "overwrite"}
    assert all(v in (None, False) for v in given.values())  # not given: resolve_config and the recipe decide
    assert all(a.help for a in parser._actions)
    # Each recipe's value, as resolve_config picks it.
    for name in ("epochs", "batch_size", "warmup_lr", "mixup", "crop_scale"):
        values = {recipe: getattr(resolve_config(data="./x", model="cvt-13", recipe=recipe), name) for recipe in RECIPES}
        shown = ", ".join(f"{recipe}: {value:g}" for recipe, value in values.items())
        assert f"(default: the recipe's ({shown}))" in text, name
    assert "--epochs N epochs; the cosine schedule spans them (default: the recipe's (digits: 15, paper: 300, finetune: 10))" in text
    assert "--image-size N input side (default: the model's)" in text


@pytest.mark.parametrize("option, value, message", [
    ("epochs", 0, "--epochs must be positive, got 0"),
    ("crop_scale", 0.0, "--crop-scale must lie in (0, 1], got 0.0"),
    ("hflip", 1.5, "--hflip must be a probability in [0, 1], got 1.5"),
    ("ema_decay", 1.0, "--ema-decay must lie in [0, 1), got 1.0"),
    ("workers", -1, "--workers must be >= 0, got -1"),
    ("amp", "fp8", "--amp must be one of none, bf16, fp16, got 'fp8'"),
    ("drop_path", "0,x", "--drop-path must be comma-separated per-stage rates such as 0,0,0.1, got '0,x'"),
])
def test_an_option_out_of_range_is_a_one_line_error_naming_it(option, value, message):
    with pytest.raises(torchcvt.ConfigError) as error:
        resolve_config(**{option: value})
    assert str(error.value) == message


# ------------------------------------------------------------------------------------ whole runs
# digits_run (conftest): two uninterrupted epochs on the digits (22 steps each), checkpointing every 5 steps.
def test_run_folder_metrics_and_plots(digits_run):
    run = digits_run
    for name in ("config.json", "model.safetensors", "preprocessor_config.json", "train_config.json", "last.pt",
                 "best.pt", "metrics.jsonl", "metrics.csv", "learning_curves.png"):
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2] and [r["step"] for r in rows] == [22, 44]
    # The LR after each epoch, by hand: warm-up ends at step 22 at the peak 3e-3; the cosine reaches 1e-5 at 44.
    assert [r["lr"] for r in rows] == pytest.approx([3e-3, 1e-5])
    with open(run / "metrics.csv") as f:
        lines = f.read().splitlines()
    assert lines[0].split(",")[:6] == ["epoch", "step", "train_loss", "train_top1", "val_loss", "val_top1"]
    assert [float(v) for v in lines[2].split(",")[:7]] == pytest.approx([rows[1][k] for k in list(rows[1])[:7]])
    with Image.open(run / "learning_curves.png") as png:
        assert png.format == "PNG" and png.size == (1000, 400)

    # The saved model is the one validated last: sklearn's accuracy of its predictions on the
    # held-out digits is the logged val top-1.
    model = torchcvt.load_model(run).eval()
    val = build_datasets("digits", image_size=32).val
    x = torch.stack([val[i][0] for i in range(len(val))])
    with torch.no_grad():
        pred = model(x).argmax(-1).numpy()
    assert rows[-1]["val_top1"] == pytest.approx(accuracy_score([val[i][1] for i in range(len(val))], pred))
    assert rows[-1]["val_top1"] > 0.8  # two epochs already learn the digits
    assert model.config.id2label == {i: str(i) for i in range(10)}
    train_config = json.loads((run / "train_config.json").read_text())
    assert train_config["recipe"] == "digits" and train_config["epochs"] == 2 and train_config["deterministic"]
    ckpt = torch.load(run / "last.pt", weights_only=True)
    assert ckpt["train_config"] == train_config and ckpt["epoch"] == 2 and ckpt["step"] == 44


def test_eval_reads_the_best_checkpoint_of_a_run(digits_run, tmp_path, capsys):
    rc = cli.main(["eval", "--weights", str(digits_run / "best.pt"), "--data", "digits", "--format", "json",
                   "--output", str(tmp_path / "cm.png")])
    result = json.loads(capsys.readouterr().out)
    assert rc == 0 and result["top1"] == max(r["val_top1"] for r in read_metrics(digits_run))


def test_torchrun_two_processes_match_one(tmp_path):
    """The same 8 steps (global batch 64) in 1 process and in 2 gloo processes of 32 images each."""
    common = ("--epochs", "1", "--max-steps", "8")
    cvt_train(*common, "--output", "one", cwd=tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "torchcvt", "train", *common, "--output", "two"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "= 2 process(es) x 32 x 1 accumulation" in proc.stdout
    assert proc.stdout.count("epoch 1/1") == 1  # rank 0 alone logs
    one, two = load_file(tmp_path / "one" / "model.safetensors"), load_file(tmp_path / "two" / "model.safetensors")
    assert one.keys() == two.keys()
    # Float rounding differs (reduction order across ranks); measured max |diff| 1.8e-5, the largest
    # on parameters whose true gradient is 0 (the key bias: softmax ignores it), where AdamW
    # normalises rounding noise into steps.
    worst = max((one[k] - two[k]).abs().max().item() for k in one if one[k].is_floating_point())
    assert worst < 1e-4
    m1, m2 = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert m2["train_loss"] == pytest.approx(m1["train_loss"], rel=1e-5)
    assert m2["val_loss"] == pytest.approx(m1["val_loss"], rel=1e-4)
    assert abs(m2["val_top1"] - m1["val_top1"]) <= 1 / 360


def test_finetune_transformers_checkpoint_with_a_new_head(reference, tmp_path, caplog):
    from transformers import CvtForImageClassification

    _, hf_dir = reference("tiny")  # 7 classes
    data = image_folder(tmp_path / "pets", {"cat": 4, "dog": 4, "fox": 4})
    out = tmp_path / "ft"
    rc = cli.main(["train", "--data", str(data), "--weights", str(hf_dir), "--epochs", "1", "--batch-size", "3",
                   "--image-size", "64", "--val-fraction", "0.25", "--workers", "0", "--output", str(out)])
    assert rc == 0
    assert "new 3-class head, randomly initialised (the checkpoint has 7 classes)" in caplog.text
    config = json.loads((out / "config.json").read_text())
    assert config["num_classes"] == 3 and config["id2label"] == {"0": "cat", "1": "dog", "2": "fox"}
    assert json.loads((out / "train_config.json").read_text())["recipe"] == "finetune"
    # transformers reads the fine-tuned model and computes what torchcvt computes.
    hf = CvtForImageClassification.from_pretrained(out).eval()
    ours = torchcvt.load_model(out).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-4, rtol=1e-4)
    assert hf.config.id2label == {0: "cat", 1: "dog", 2: "fox"}


def test_transformers_loads_the_run_folder_of_the_default_model(digits_run):
    """`cvt train`'s default model, cvt-tiny (depths 1, 2, 3: transformers cannot build a stage i of depth
    <= i), loads in transformers from the run folder with every weight, and computes what torchcvt
    computes with transformers' activation (GELU where the official models use QuickGELU)."""
    from transformers import CvtForImageClassification

    assert json.loads((digits_run / "train_config.json").read_text())["model"] == TrainConfig().model == "cvt-tiny"
    hf, info = CvtForImageClassification.from_pretrained(digits_run, output_loading_info=True)
    assert not any(info.values()), info
    ours = torchcvt.load_model(digits_run, hidden_act="gelu").eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf.eval()(x).logits, atol=1e-4, rtol=1e-4)
    assert hf.config.id2label == {i: str(i) for i in range(10)}


def test_bf16_ema_accumulation_and_clipping_run_and_the_saved_model_is_the_ema(tmp_path, capsys):
    from torchcvt.checkpoint import to_torchcvt_state_dict

    out = tmp_path / "run"
    rc = cli.main(["train", "--amp", "bf16", "--ema-decay", "0.9", "--accum-steps", "2", "--clip-grad", "1.0",
                   "--epochs", "1", "--max-steps", "3", "--output", str(out)])
    assert rc == 0 and "1 process(es) x 32 x 2 accumulation" in capsys.readouterr().out
    ckpt = torch.load(out / "last.pt", weights_only=True)
    saved, _ = to_torchcvt_state_dict(load_file(out / "model.safetensors"))
    assert ckpt["step"] == 3 and all(torch.equal(saved[k], ckpt["ema"][k]) for k in saved)
    assert not torch.equal(saved["head.weight"], ckpt["model"]["head.weight"])  # the EMA, not the last weights


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
    out = tmp_path / "nan"
    rc = cli.main(["train", "--lr", "1e30", "--epochs", "1", "--checkpoint-every-steps", "1", "--output", str(out)])
    err = capsys.readouterr().err
    assert rc == 1 and err.count("\n") == 1
    assert err.startswith("error: the loss became nan") and f"the last good checkpoint is {out / 'last.pt'}" in err
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert f"by step {ckpt['step'] + 1};" in err  # the checkpoint of the step before
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert not (out / "model.safetensors").exists()


@pytest.mark.parametrize("case", ["missing", "empty class", "one class", "batch too large", "corrupt image"])
def test_bad_input_is_a_one_line_error(case, tmp_path, capsys):
    data = tmp_path / "data"
    args = ["--model", "cvt-tiny", "--image-size", "32"]
    if case == "missing":
        expected = f"error: data not found: {data}"
    elif case == "empty class":
        image_folder(data, {"a": 2})
        (data / "b").mkdir()
        expected = f"error: {data / 'b'}: class folder has no images"
    elif case == "one class":
        image_folder(data, {"a": 3})
        expected = f"error: {data}: found 1 class (a); classification needs at least 2 classes"
    elif case == "batch too large":
        image_folder(data, {"a": 3, "b": 3})
        args += ["--batch-size", "8", "--val-fraction", "0.3"]
        expected = f"error: --batch-size 8 is larger than the training set (4 images in {data}); lower it"
    else:
        image_folder(data, {"a": 3, "b": 3})
        (data / "b" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
        expected = f"error: {data / 'b' / 'broken.png'}: unreadable image"
    rc = cli.main(["train", "--data", str(data), "--output", str(tmp_path / "run"), *args])
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(expected) and err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing written before the data is known to be good


def test_an_image_that_fails_to_decode_in_a_worker_stops_the_run_naming_it(tmp_path, capsys):
    """A truncated JPEG passes the header check before training and fails when a DataLoader worker
    decodes it: the worker's traceback is reduced to the one-line cause."""
    data = tmp_path / "data"
    for split, count in (("train", 4), ("val", 1)):
        image_folder(data / split, {"a": count, "b": count})
    bad = data / "train" / "a" / "truncated.jpg"
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(encoded, format="JPEG")
    bad.write_bytes(encoded.getvalue()[:-50])  # the end of the entropy-coded data is missing
    rc = cli.main(["train", "--data", str(data), "--model", "cvt-tiny", "--image-size", "32", "--epochs", "1",
                   "--batch-size", "3", "--workers", "1", "--output", str(tmp_path / "run")])  # 9 images: no batch dropped
    err = capsys.readouterr().err
    assert rc == 1 and err.startswith(f"error: {bad}: cannot read image: image file is truncated") and err.count("\n") == 1, err


def test_skip_bad_images_counts_them_and_trains_with_the_paper_recipe(tmp_path, capsys):
    data = image_folder(tmp_path / "data", {"a": 4, "b": 4})
    (data / "a" / "broken.png").write_bytes(b"garbage")
    rc = cli.main(["train", "--data", str(data), "--model", "cvt-tiny", "--image-size", "32", "--epochs", "1",
                   "--batch-size", "2", "--workers", "0", "--skip-bad-images", "--output", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0
    assert "1 unreadable image(s) skipped" in out and "recipe paper" in out
    config = json.loads((tmp_path / "run" / "train_config.json").read_text())
    # The paper's augmentation, as the official config: mixup 0.8, cutmix 1.0, RandAugment m9, erasing 0.25.
    assert (config["mixup"], config["cutmix"], config["randaugment"], config["random_erasing"]) == \
        (0.8, 1.0, "rand-m9-mstd0.5-inc1", 0.25)
    assert config["lr"] == pytest.approx(2.5e-4 * 2 / 256)  # scaled linearly with the global batch


@pytest.mark.slow
def test_digits_demo_reaches_98_percent(tmp_path):
    """`cvt train` with no arguments: the README's demo (its time is measured and documented, not asserted)."""
    cvt_train(cwd=tmp_path, timeout=600)
    rows = read_metrics(tmp_path / "runs" / "digits")
    assert len(rows) == 15 and rows[-1]["val_top1"] >= 0.98, rows[-1]
