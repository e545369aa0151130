"""Training data sources: digits, image folders, Oxford-IIIT Pet layout, CSV; validation and bad files."""

from __future__ import annotations

import io
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from torchcvt.datasets import (
    DataSplits,
    build_datasets,
    describe,
    stratified_split,
    verify_images,
)
from torchcvt.errors import DataError, ImageError
from torchcvt.inference import collect_images
from torchcvt.images import load_image
from torchcvt.transforms import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig

DIGIT_COUNTS = {0: 178, 1: 182, 2: 177, 3: 183, 4: 181, 5: 182, 6: 181, 7: 179, 8: 174, 9: 180}


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (20, 16)) -> Path:
    """A small noisy RGB image; the format follows the suffix, as Pillow maps it (PNG, JPEG, ...)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format=Image.registered_extensions()[path.suffix.lower()])
    return path


def make_folder(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / name / f"{name}_{i:03d}{suffix}", seed=100 * c + i)
    return root


def labels_of(dataset) -> Counter:
    return Counter(dataset.targets)


# ------------------------------------------------------------------------------------------ digits
@pytest.fixture(scope="module")
def digits() -> DataSplits:
    return build_datasets("digits")


def test_digits_split_sizes_and_stratification(digits):
    assert (len(digits.train), len(digits.val)) == (1437, 360)
    assert digits.id2label == {i: str(i) for i in range(10)}
    val, train = labels_of(digits.val), labels_of(digits.train)
    assert val + train == Counter(DIGIT_COUNTS)
    # 20 % of every class, within one image (largest-remainder rounding).
    assert all(abs(val[c] - 0.2 * n) < 1 for c, n in DIGIT_COUNTS.items())
    assert describe(digits) == "digits: 1437 train / 360 val images, 10 classes"
    assert (digits.mean, digits.std) == (IMAGENET_MEAN, IMAGENET_STD)


def test_digits_train_and_val_partition_the_set(digits):
    from sklearn.datasets import load_digits

    # Train + val, as a multiset (the set has a few duplicate images), is exactly the upsampled
    # originals: every image is in exactly one split.
    everything = torch.cat([digits.train.images, digits.val.images])
    assert everything.shape == (1797, 1, 32, 32)
    full = torch.nn.functional.interpolate(
        torch.from_numpy(load_digits().images / 16.0).float().unsqueeze(1), size=(32, 32),
        mode="bicubic", align_corners=False,
    ).clamp(0, 1)
    key = lambda t: sorted(img.numpy().tobytes() for img in t)  # noqa: E731
    assert key(everything) == key(full)


def test_digits_split_is_fixed(digits):
    again = build_datasets("digits", seed=1234, val_fraction=0.5)  # neither changes the digits split
    assert torch.equal(again.val.images, digits.val.images)
    assert torch.equal(again.train.labels, digits.train.labels)


def test_digits_items(digits):
    x, y = digits.val[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    background = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    assert torch.allclose(x.amin(dim=(1, 2)), background, atol=1e-5)  # ink 0 normalised
    assert torch.equal(digits.val[0][0], x)  # evaluation items are not augmented
    torch.manual_seed(0)
    a = digits.train[5][0]
    torch.manual_seed(0)
    assert torch.equal(a, digits.train[5][0])  # augmentation follows the torch seed
    assert not torch.equal(a, digits.train[5][0])
    big = build_datasets("digits", image_size=48)
    assert big.train[0][0].shape == (3, 48, 48)


def test_stratified_split_counts_and_determinism():
    labels = [0] * 50 + [1] * 30 + [2] * 20
    state = random.getstate()
    train, val = stratified_split(labels, 0.1, seed=0)
    assert random.getstate() == state  # a private RNG: the training RNGs are untouched
    assert Counter(labels[i] for i in val) == {0: 5, 1: 3, 2: 2}
    assert sorted(train + val) == list(range(100))
    assert stratified_split(labels, 0.1, seed=0) == (train, val)
    assert stratified_split(labels, 0.1, seed=1)[1] != val
    # Tiny classes: one held out from each class of two, never the only image of a class.
    train, val = stratified_split([0, 0, 1, 1, 2], 0.1, seed=0)
    assert sorted([0, 0, 1, 1, 2][i] for i in val) == [0, 1] and 4 in train


# ----------------------------------------------------------------------------------- image folders
def test_image_folder_held_out_split(tmp_path):
    root = make_folder(tmp_path / "animals", {"cat": 10, "dog": 10, "fish": 5})
    write_image(root / "cat" / "nested" / "deep.JPG", seed=7)  # sub-folders and upper-case suffixes count
    write_image(root / "dog" / "extra.JpEg", seed=8)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / ".hidden.png").write_bytes(b"macOS resource fork")

    splits = build_datasets(str(root), image_size=32, val_fraction=0.2)
    assert splits.id2label == {0: "cat", 1: "dog", 2: "fish"}
    # 27 images, ceil(5.4) = 6 held out: cat 2.2, dog 2.2, fish 1.0 -> 2, 2, 1, + 1 to the first
    # largest remainder (cat).
    assert (len(splits.train), len(splits.val)) == (21, 6)
    assert labels_of(splits.val) == {0: 3, 1: 2, 2: 1}
    assert labels_of(splits.train) == {0: 8, 1: 9, 2: 4}
    assert not {p for p, _ in splits.train.samples} & {p for p, _ in splits.val.samples}
    for path, label in splits.train.samples + splits.val.samples:
        assert Path(path).relative_to(root).parts[0] == splits.id2label[label]
    assert describe(splits) == f"{root}: 21 train / 6 val images, 3 classes"

    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    assert splits.val[0][0].shape == (3, 32, 32)
    batch, labels = next(iter(torch.utils.data.DataLoader(splits.val, batch_size=4)))
    assert batch.shape == (4, 3, 32, 32) and labels.dtype == torch.int64

    again = build_datasets(str(root), image_size=32, val_fraction=0.2)
    assert again.val.samples == splits.val.samples
    other = build_datasets(str(root), image_size=32, val_fraction=0.2, seed=1)
    assert other.val.samples != splits.val.samples and len(other.val) == 6


def test_training_and_predict_take_the_same_image_files(tmp_path):
    # One rule for `cvt train` and `cvt predict`: every suffix Pillow reads, in any case, not only a
    # fixed list of common ones (.jfif, .ppm and .tga were missing from it); hidden and non-image
    # files are skipped by both.
    suffixes = [".webp", ".TIF", ".jfif", ".ppm", ".tga"]
    assert all(Image.registered_extensions()[s.lower()] in Image.OPEN for s in suffixes)  # Pillow reads them
    root = tmp_path / "data"
    for c, name in enumerate(("cat", "dog")):
        for i, suffix in enumerate(suffixes):
            write_image(root / name / f"{name}{i}{suffix}", seed=10 * c + i)
    write_image(root / "cat" / ".hidden.png")
    (root / "dog" / "notes.txt").write_text("not an image")
    splits = build_datasets(str(root), val_fraction=0.2)
    taken = sorted(path for path, _ in splits.train.samples + splits.val.samples)
    assert len(taken) == 10 and {Path(p).suffix for p in taken} == set(suffixes)
    files, problems = collect_images([str(root)])
    assert problems == [] and sorted(map(str, files)) == taken
    assert all(load_image(path).size == (20, 16) for path in taken)  # and every one of them decodes


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_image_folder_with_train_and_val(tmp_path, val_name):
    make_folder(tmp_path / "train", {"b_class": 4, "a_class": 3})
    make_folder(tmp_path / val_name, {"a_class": 2}, suffix=".jpg")  # a class may lack val images
    splits = build_datasets(str(tmp_path), image_size=24)
    assert splits.id2label == {0: "a_class", 1: "b_class"}
    assert labels_of(splits.train) == {0: 3, 1: 4} and labels_of(splits.val) == {0: 2}
    assert all(Path(p).parent.parent.name == val_name for p, _ in splits.val.samples)


def test_validation_class_missing_from_train(tmp_path):
    make_folder(tmp_path / "train", {"a": 2, "b": 2})
    make_folder(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(DataError, match=r"zebra.*has no folder in .*train"):
        build_datasets(str(tmp_path), image_size=24)


def test_oxford_pet_layout(tmp_path):
    names = ["Abyssinian_1", "Abyssinian_2", "Abyssinian_3", "american_bulldog_10", "american_bulldog_11",
             "Bengal_5", "Bengal_6"]
    for i, name in enumerate(names):
        write_image(tmp_path / "images" / f"{name}.jpg", seed=i)
    ids = {"Abyssinian": 1, "american_bulldog": 2, "Bengal": 3}
    line = lambda n: f"{n} {ids[n.rsplit('_', 1)[0]]} 1 1"  # noqa: E731
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "trainval.txt").write_text("\n".join(line(n) for n in names[0::2]) + "\n")
    (tmp_path / "annotations" / "test.txt").write_text("# comment\n" + "\n".join(line(n) for n in names[1::2]))

    splits = build_datasets(str(tmp_path), image_size=32)
    assert splits.id2label == {0: "Abyssinian", 1: "american_bulldog", 2: "Bengal"}
    assert labels_of(splits.train) == {0: 2, 1: 1, 2: 1}  # Abyssinian_1, _3, american_bulldog_11, Bengal_6
    assert labels_of(splits.val) == {0: 1, 1: 1, 2: 1}
    assert splits.val.samples[0] == (str(tmp_path / "images" / "Abyssinian_2.jpg"), 0)
    assert splits.train[0][0].shape == (3, 32, 32)

    (tmp_path / "annotations" / "test.txt").write_text("Abyssinian_2 1 1 1\nBengal_5 three 1 1\n")
    with pytest.raises(DataError, match=r"test\.txt line 2"):
        build_datasets(str(tmp_path), image_size=32)
    (tmp_path / "annotations" / "test.txt").write_text("Abyssinian_99 1 1 1\n")
    with pytest.raises(DataError, match=r"test\.txt line 1: image not found: .*Abyssinian_99\.jpg"):
        build_datasets(str(tmp_path), image_size=32)


def test_csv_source(tmp_path):
    rows = []
    for i in range(6):
        rows.append(f"imgs/cat{i}.png,cat")
        write_image(tmp_path / "imgs" / f"cat{i}.png", seed=i)
    for i in range(4):
        path = write_image(tmp_path / "elsewhere" / f"dog{i}.jpg", seed=10 + i)
        rows.append(f"{path},dog")  # absolute path
    csv_path = tmp_path / "list.csv"
    csv_path.write_text("path,label,comment\n" + "\n".join(r + "," for r in rows) + "\n")

    splits = build_datasets(str(csv_path), image_size=24, val_fraction=0.2)
    assert splits.id2label == {0: "cat", 1: "dog"}
    assert labels_of(splits.train) == {0: 5, 1: 3} and labels_of(splits.val) == {0: 1, 1: 1}
    assert splits.train[0][0].shape == (3, 24, 24)

    (tmp_path / "bad.csv").write_text("file,label\nimgs/cat0.png,cat\n")
    with pytest.raises(DataError, match=r"bad\.csv line 1: header must have columns 'path' and 'label'"):
        build_datasets(str(tmp_path / "bad.csv"), image_size=24)
    (tmp_path / "missing.csv").write_text("path,label\nimgs/cat0.png,cat\nimgs/nope.png,dog\n")
    with pytest.raises(DataError, match=r"missing\.csv line 3: image not found: .*nope\.png"):
        build_datasets(str(tmp_path / "missing.csv"), image_size=24)
    (tmp_path / "empty.csv").write_text("path,label\n")
    with pytest.raises(DataError, match=r"empty\.csv: no images"):
        build_datasets(str(tmp_path / "empty.csv"), image_size=24)


def test_transform_hooks_and_saved_normalisation(tmp_path):
    root = make_folder(tmp_path, {"a": 3, "b": 3})
    cfg = PreprocessConfig(image_size=16, crop_pct=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    splits = build_datasets(str(root), image_size=16, train_transform=lambda img: img.size, eval_transform=cfg)
    assert splits.train[0][0] == (20, 16)  # the hook gets the decoded PIL image
    assert (splits.mean, splits.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    path = splits.val.samples[0][0]
    assert torch.equal(splits.val[0][0], cfg(path))


# ------------------------------------------------------------------------------------------ errors
def test_missing_and_malformed_sources(tmp_path):
    with pytest.raises(DataError, match=r"data not found: .*no_such_dir"):
        build_datasets(str(tmp_path / "no_such_dir"), image_size=32)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DataError, match=r"file\.txt: expected 'digits', an image folder or a \.csv file"):
        build_datasets(str(tmp_path / "file.txt"), image_size=32)
    (tmp_path / "flat").mkdir()
    write_image(tmp_path / "flat" / "x.png")
    with pytest.raises(DataError, match=r"flat: no class sub-folders"):
        build_datasets(str(tmp_path / "flat"), image_size=32)
    with pytest.raises(DataError, match="val_fraction"):
        build_datasets("digits", image_size=32, val_fraction=1.0)


def test_empty_class_folder_and_single_class(tmp_path):
    root = make_folder(tmp_path / "data", {"a": 2, "b": 2})
    (root / "empty_one").mkdir()
    (root / "empty_one" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match=r"empty_one: class folder has no images"):
        build_datasets(str(root), image_size=32)
    single = make_folder(tmp_path / "single", {"only": 3})
    with pytest.raises(DataError, match=r"single: found 1 class \(only\); .*needs at least 2 classes"):
        build_datasets(str(single), image_size=32)


def test_corrupt_image_stops_or_is_skipped(tmp_path):
    root = make_folder(tmp_path, {"a": 5, "b": 5})
    bad = root / "b" / "b_002.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    assert verify_images([root / "a" / "a_000.png", bad]) == [str(bad)]

    with pytest.raises(ImageError, match=r"b_002\.png: unreadable image .*1 unreadable file"):
        build_datasets(str(root), image_size=24)

    splits = build_datasets(str(root), image_size=24, val_fraction=0.2, skip_bad_images=True)
    assert splits.skipped == [str(bad)]
    assert len(splits.train) + len(splits.val) == 9
    assert str(bad) not in {p for p, _ in splits.train.samples + splits.val.samples}
    assert describe(splits) == f"{root}: 7 train / 2 val images, 2 classes, 1 unreadable image(s) skipped"


def test_truncated_image_fails_at_decode_naming_the_file(tmp_path):
    root = make_folder(tmp_path, {"a": 2, "b": 2}, suffix=".jpg")
    truncated = root / "a" / "a_001.jpg"
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    assert verify_images([truncated]) == []  # the header is intact: the cheap check passes it

    splits = build_datasets(str(root), image_size=24, val_fraction=0.5)
    dataset = splits.train if any(p == str(truncated) for p, _ in splits.train.samples) else splits.val
    index = [p for p, _ in dataset.samples].index(str(truncated))
    with pytest.raises(ImageError, match=r"a_001\.jpg"):
        dataset[index]
