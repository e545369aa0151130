"""Small data: the table "Fine-tuning on small data" of docs/training.md.

The digits' training split (1437 images) is cut, per class, into 10 % (the small task, 144 images)
and the other 90 %. A cvt-tiny trained on the 90 % gets a new, random head; then on the 10 %:

* from scratch: random weights;
* fine-tuned: every weight from the 90 % model (--weights);
* linear probe: the 90 % model's backbone frozen, only the head trained (--weights --freeze-backbone);

each scored on the digits' held-out split (360 images, never trained on) by its final weights. The
images are written as 32x32 PNG folders, so every arm reads them through the same image-folder
pipeline, with the same options (``COMMON``) apart from the learning rate.

    python benchmarks/small_data.py --work /tmp/small-data       # ~15 minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from torchcvt import load_model, save_pretrained
from torchcvt.datasets import DIGITS_SPLIT_SEED, DIGITS_VAL_FRACTION, _digits_arrays, stratified_split

# The same for every run: the digits' model and input size, no augmentation (the digits recipe), 1 thread.
COMMON = ["--model", "cvt-tiny", "--image-size", "32", "--recipe", "digits", "--workers", "0", "--threads", "1",
          "--deterministic", "--seed", "0"]
ARMS = {  # name -> (run folder, from the 90 % model?, its own options)
    "from scratch": ("scratch", False, ["--lr", "3e-3"]),
    "fine-tuned (--weights)": ("finetuned", True, ["--lr", "1e-3"]),
    "fine-tuned, --layer-decay 0.75": ("layer-decay", True, ["--lr", "1e-3", "--layer-decay", "0.75"]),
    "linear probe (--weights --freeze-backbone)": ("linear-probe", True, ["--lr", "1e-2", "--freeze-backbone"]),
}


def write_folders(work: Path, small_fraction: float) -> tuple[Path, Path]:
    """``work/big`` (90 % of the training split) and ``work/small`` (10 %), each with train/ and the held-out val/."""
    images, targets = _digits_arrays()
    train_idx, val_idx = stratified_split(targets.tolist(), DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED)
    train_labels = [int(targets[i]) for i in train_idx]
    big_pos, small_pos = stratified_split(train_labels, small_fraction, seed=1)  # stratified: every class in both
    parts = {"big/train": [train_idx[i] for i in big_pos], "small/train": [train_idx[i] for i in small_pos],
             "big/val": val_idx, "small/val": val_idx}
    for part, indices in parts.items():
        for i in indices:
            folder = work / part / str(int(targets[i]))
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (images[i] * (255 / 16)).round().astype(np.uint8)  # 0..16 ink levels
            Image.fromarray(pixels).resize((32, 32), Image.Resampling.BICUBIC).convert("RGB").save(folder / f"{i}.png")
    return work / "big", work / "small"


def cvt_train(*args: str) -> list[dict]:
    output = args[args.index("--output") + 1]
    subprocess.run([sys.executable, "-m", "torchcvt", "train", *COMMON, *args, "--overwrite"], check=True)
    return [json.loads(line) for line in (Path(output) / "metrics.jsonl").read_text().splitlines()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("small-data"), help="folder for the images and runs")
    parser.add_argument("--small-fraction", type=float, default=0.1, help="the small task's share of the training split")
    parser.add_argument("--pretrain-epochs", type=int, default=15)
    parser.add_argument("--epochs", type=int, default=30, help="epochs of each run on the small task")
    args = parser.parse_args()
    big, small = write_folders(args.work, args.small_fraction)
    runs = args.work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    pre_rows = cvt_train("--data", str(big), "--epochs", str(args.pretrain_epochs), "--batch-size", "64", "--lr", "3e-3",
                         "--output", str(runs / "pretrained-90"))
    # The 90 % model with a new random head: the small task starts from its features only.
    model = load_model(runs / "pretrained-90")
    torch.manual_seed(0)
    model.reset_classifier(model.num_classes)
    save_pretrained(model, runs / "pretrained-90-new-head")

    n_small = sum(1 for _ in (small / "train").rglob("*.png"))
    results = {"the 90 % model itself (for reference)": pre_rows[-1]["val_top1"]}
    for name, (folder, pretrained, options) in ARMS.items():
        weights = ["--weights", str(runs / "pretrained-90-new-head")] if pretrained else []
        rows = cvt_train("--data", str(small), *weights, *options, "--epochs", str(args.epochs), "--batch-size", "16",
                         "--output", str(runs / folder))
        results[name] = rows[-1]["val_top1"]
    print(f"\nsmall task: {n_small} training images; held out: 360")
    print("| run | held-out top-1 |\n|---|---|")
    for name, top1 in results.items():
        print(f"| {name} | {100 * top1:.1f} % |")


if __name__ == "__main__":
    main()
