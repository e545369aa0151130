"""Training augmentation: RandAugment, the train/fine-tune pipelines, random erasing, mixup/cutmix."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from torchcvt.augment import (
    INCREASING_OPS,
    ORIGINAL_OPS,
    Mixup,
    RandAugment,
    RandomAffineTensor,
    RandomErasing,
    RandomResizedCrop,
    finetune_transform,
    mixup_target,
    train_transform,
)
from torchcvt.transforms import IMAGENET_MEAN, IMAGENET_STD


def photo(width: int = 120, height: int = 90, seed: int = 0) -> Image.Image:
    """A smooth gradient plus noise: every op (equalize, solarize, shear...) visibly changes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([xx * 255 / width, yy * 255 / height, (xx + yy) * 127 / (width + height)], axis=-1)
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def seeded(fn, seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    return fn()


# ------------------------------------------------------------------------------------- RandAugment
def test_randaugment_spec_parsing():
    ra = RandAugment.from_spec("rand-m9-mstd0.5-inc1")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.increasing) == (2, 9.0, 0.5, True)
    assert [name for name, *_ in ra.ops] == [
        "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
        "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
        "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
    ]
    ra = RandAugment.from_spec("rand-m7-n3-mstd0-inc0-p0.7")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.increasing, ra.prob) == (3, 7.0, 0.0, False, 0.7)
    assert {name for name, *_ in ra.ops} == set(ORIGINAL_OPS)
    # Left-out fields mean what they mean in timm: m10, n2, mstd0, original op set, p0.5.
    ra = RandAugment.from_spec("rand")
    assert (ra.num_ops, ra.magnitude, ra.magnitude_std, ra.increasing, ra.prob) == (2, 10.0, 0.0, False, 0.5)
    for bad in ("auto-m9", "rand-x9", "rand-mfoo"):
        with pytest.raises(ValueError, match="rand"):
            RandAugment.from_spec(bad)


def test_increasing_levels_match_timm_at_magnitude_9():
    # timm's inc1 arguments at m=9: posterize keeps 4 - int(3.6) = 1 bit, solarize threshold
    # 256 - int(230.4) = 26, solarize-add 99, shear 0.27, translate 0.405 of the side, rotate 27 deg.
    random.seed(0)
    assert INCREASING_OPS["PosterizeIncreasing"][1](9.0, 0.45) == (1,)
    assert INCREASING_OPS["SolarizeIncreasing"][1](9.0, 0.45) == (26,)
    assert INCREASING_OPS["SolarizeAdd"][1](9.0, 0.45) == (99,)
    assert abs(INCREASING_OPS["ShearX"][1](9.0, 0.45)[0]) == pytest.approx(0.27)
    assert abs(INCREASING_OPS["TranslateXRel"][1](9.0, 0.45)[0]) == pytest.approx(0.405)
    assert abs(INCREASING_OPS["Rotate"][1](9.0, 0.45)[0]) == pytest.approx(27.0)
    factors = {round(INCREASING_OPS["ContrastIncreasing"][1](9.0, 0.45)[0], 6) for _ in range(50)}
    assert factors == {1.81, 0.19}  # 1 +- 0.81, either direction
    assert INCREASING_OPS["ContrastIncreasing"][1](10.0, 0.45)[0] in (pytest.approx(1.9), 0.1)  # floor 0.1
    # The original (inc0) mapping: posterize keeps int(3.6) = 3 bits, enhance factor 1.72 (no sign).
    assert ORIGINAL_OPS["Posterize"][1](9.0, 0.45) == (3,)
    assert ORIGINAL_OPS["Color"][1](9.0, 0.45) == (pytest.approx(1.72),)


def test_every_op_keeps_size_and_mode():
    img = photo()
    for table in (INCREASING_OPS, ORIGINAL_OPS):
        for name, (op, level_args) in table.items():
            out = op(img, *level_args(9.0, 0.45), (124, 116, 104), Image.Resampling.BICUBIC)
            assert (out.size, out.mode) == (img.size, "RGB"), name
    # Geometric ops fill uncovered pixels with the given colour.
    shifted = INCREASING_OPS["TranslateXRel"][0](img, 0.5, (124, 116, 104), Image.Resampling.BICUBIC)
    assert np.asarray(shifted)[:, -1].tolist() == [[124, 116, 104]] * img.size[1]


def test_randaugment_seeded_and_clipped():
    ra = RandAugment(num_ops=2, magnitude=9, magnitude_std=0.5)
    img = photo()
    a, b = seeded(lambda: ra(img), 3), seeded(lambda: ra(img), 3)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    outputs = {np.asarray(seeded(lambda: ra(img), s)).tobytes() for s in range(8)}
    assert len(outputs) > 4
    # Magnitude 10 with a large std: draws above 10 are clipped, so arguments never exceed the maximum.
    ra = RandAugment(num_ops=1, magnitude=10, magnitude_std=5, prob=1.0)
    seen = []
    ra.ops = [("Shear", lambda im, f, *_: seen.append(f) or im, INCREASING_OPS["ShearX"][1])]
    random.seed(0)
    for _ in range(200):
        ra(img)
    assert max(abs(f) for f in seen) == pytest.approx(0.3) and min(abs(f) for f in seen) < 0.3


# -------------------------------------------------------------------------- per-image pipelines
def test_train_transform_shape_and_determinism():
    tt = train_transform(48)
    img = photo(500 // 4, 375 // 4)
    out = seeded(lambda: tt(img), 0)
    assert out.shape == (3, 48, 48) and out.dtype == torch.float32
    assert torch.equal(out, seeded(lambda: tt(img), 0))
    assert not torch.equal(out, seeded(lambda: tt(img), 1))


def test_train_transform_draws_only_python_random_and_torch():
    # The RNGs a trainer checkpoints: numpy's state must not matter; torch's only through erasing.
    tt = train_transform(40, random_erasing=0.0)
    img = photo()
    random.seed(5)
    torch.manual_seed(5)
    np.random.seed(5)
    a = tt(img)
    random.seed(5)
    torch.manual_seed(99)
    np.random.seed(99)
    assert torch.equal(a, tt(img))


def test_normalisation_of_an_unaugmented_pipeline():
    # Full-image crop, no flip, no RandAugment: a constant colour normalises to (c/255 - mean)/std.
    tt = train_transform(16, scale=(1, 1), ratio=(1, 1), hflip=0, randaugment=None, random_erasing=0)
    out = tt(Image.new("RGB", (64, 64), (200, 100, 50)))
    expected = [(c / 255 - m) / s for c, m, s in zip((200, 100, 50), IMAGENET_MEAN, IMAGENET_STD)]
    assert torch.allclose(out, torch.tensor(expected).view(3, 1, 1).expand(3, 16, 16), atol=1e-5)


def test_finetune_transform_is_lighter():
    ft = finetune_transform(32)
    names = [type(t).__name__ for t in ft.transforms]
    assert names == ["RandomResizedCrop", "RandomHorizontalFlip", "ToNormalizedTensor"]
    assert ft.transforms[0].scale == (0.35, 1.0)
    assert seeded(lambda: ft(photo()), 0).shape == (3, 32, 32)
    assert "RandAugment" in [type(t).__name__ for t in finetune_transform(32, randaugment="rand-m5").transforms]


def test_random_resized_crop_boxes():
    crop = RandomResizedCrop(224, scale=(0.08, 1.0))
    random.seed(0)
    for _ in range(200):
        left, top, w, h = crop.get_params(500, 375)
        assert 0 <= left and left + w <= 500 and 0 <= top and top + h <= 375
        assert 0.07 * 500 * 375 <= w * h <= 500 * 375
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
    # Impossible scale -> centred fallback, clamped to the allowed aspect ratios.
    assert RandomResizedCrop(8, scale=(2, 3)).get_params(500, 375) == (0, 0, 500, 375)
    assert RandomResizedCrop(8, scale=(2, 3)).get_params(1000, 100) == (433, 0, 133, 100)


# -------------------------------------------------------------------------------- random erasing
def test_random_erasing_probability_and_region():
    x = torch.zeros(3, 32, 32)
    erased = seeded(lambda: RandomErasing(probability=1.0)(x), 0)
    assert torch.count_nonzero(x) == 0  # the input is left unchanged
    changed = (erased != 0).any(0)
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert changed.sum() == box  # one solid rectangle of noise
    assert 0.02 * 32 * 32 * 0.8 <= box <= 32 * 32 / 3 * 1.2
    assert torch.equal(RandomErasing(probability=0.0)(x), x)


def test_random_erasing_batch_and_modes():
    x = torch.zeros(6, 3, 24, 24)
    out = seeded(lambda: RandomErasing(probability=1.0, mode="pixel")(x), 1)
    assert all(torch.count_nonzero(img) > 0 for img in out)
    rand = seeded(lambda: RandomErasing(probability=1.0, mode="rand")(torch.zeros(3, 24, 24)), 1)
    per_channel = [set(rand[c][rand[c] != 0].tolist()) for c in range(3)]
    assert all(len(values) == 1 for values in per_channel)  # one colour per channel
    const = seeded(lambda: RandomErasing(probability=1.0, mode="const")(torch.ones(3, 24, 24)), 1)
    assert 0 < (const == 0).sum() < 3 * 24 * 24
    # About a quarter of the images are erased at the paper's probability.
    out = seeded(lambda: RandomErasing(probability=0.25)(torch.zeros(400, 1, 16, 16)), 2)
    assert 70 <= sum(bool(torch.count_nonzero(img)) for img in out) <= 130


def test_random_affine_tensor():
    x = torch.randn(4, 3, 20, 28)
    identity = RandomAffineTensor(degrees=0, translate=0, scale=(1, 1))
    assert torch.allclose(identity(x), x, atol=1e-5)
    fill = (-2.0, 0.5, 1.0)
    flat = torch.tensor(fill).view(1, 3, 1, 1).expand(4, 3, 20, 28)
    # An image that is all background stays all background, whatever moves in from outside.
    assert torch.allclose(seeded(lambda: RandomAffineTensor(30, 0.3, fill=fill)(flat), 0), flat, atol=1e-5)
    moved = seeded(lambda: RandomAffineTensor()(x[0]), 0)
    assert moved.shape == (3, 20, 28) and torch.equal(moved, seeded(lambda: RandomAffineTensor()(x[0]), 0))
    assert not torch.allclose(moved, x[0])


# ------------------------------------------------------------------------------------------ mixup
def two_images(height: int = 32, width: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch [zeros (class 0), ones (class 1)]: the fraction of ones in sample 0 is 1 - lambda."""
    return torch.stack([torch.zeros(3, height, width), torch.ones(3, height, width)]), torch.tensor([0, 1])


def test_mixup_targets_are_distributions():
    mixup = Mixup(num_classes=10)
    x, y = torch.randn(8, 3, 16, 16), torch.tensor([0, 1, 2, 3, 4, 5, 6, 9])
    original = x.clone()
    for seed in range(20):
        random.seed(seed)
        mixed, soft = mixup(x, y)
        assert mixed.shape == x.shape and soft.shape == (8, 10)
        assert torch.allclose(soft.sum(1), torch.ones(8), atol=1e-6)
        assert soft.min() >= 0.01 - 1e-7  # smoothing 0.1 over 10 classes
    assert torch.equal(x, original)  # the input batch is not mixed in place


def test_no_mixing_gives_exactly_smoothed_one_hot():
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 3, 3, 9])
    for mixup in (Mixup(0.0, 0.0, label_smoothing=0.1, num_classes=10), Mixup(prob=0.0, num_classes=10)):
        mixed, soft = mixup(x, y)
        expected = torch.full((4, 10), 0.01)
        expected[torch.arange(4), y] = 0.91
        assert torch.equal(mixed, x)
        assert torch.allclose(soft, expected, atol=1e-7)


def test_mixup_blend_matches_lambda():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=0.0, label_smoothing=0.0, num_classes=2)
    x, y = two_images()
    lams = []
    for seed in range(30):
        random.seed(seed)
        mixed, soft = mixup(x, y)
        lam = soft[0, 0].item()
        assert 0.0 <= lam <= 1.0
        assert torch.allclose(mixed[0], torch.full_like(mixed[0], 1 - lam), atol=1e-6)
        assert torch.allclose(mixed[1], torch.full_like(mixed[1], lam), atol=1e-6)
        lams.append(lam)
    assert len(set(lams)) == 30 and min(lams) < 0.3 and max(lams) > 0.7  # Beta(0.8, 0.8) is U-shaped


def test_cutmix_area_matches_lambda():
    mixup = Mixup(mixup_alpha=0.0, cutmix_alpha=1.0, label_smoothing=0.0, num_classes=2)
    x, y = two_images(32, 24)
    clipped = 0
    for seed in range(40):
        random.seed(seed)
        mixed, soft = mixup(x, y)
        pasted = mixed[0, 0]
        area = pasted.sum().item() / pasted.numel()
        # The target weight of the pasted class is exactly the pasted fraction (lambda corrected).
        assert soft[0, 1].item() == pytest.approx(area, abs=1e-6)
        assert soft[1, 0].item() == pytest.approx(area, abs=1e-6)
        if area > 0:
            rows, cols = pasted.any(1).nonzero().flatten(), pasted.any(0).nonzero().flatten()
            assert pasted.sum() == (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)  # a rectangle
            clipped += rows.min() == 0 or cols.min() == 0 or rows.max() == 31 or cols.max() == 23
    assert clipped > 0  # the border case, where correction matters, was exercised


def test_switch_between_mixup_and_cutmix():
    mixup = Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5, label_smoothing=0.0, num_classes=2)
    x, y = two_images()
    kinds = []
    for seed in range(40):
        random.seed(seed)
        mixed, _ = mixup(x, y)
        values = mixed[0].unique()
        kinds.append("cutmix" if set(values.tolist()) <= {0.0, 1.0} else "mixup")
    assert 10 <= kinds.count("cutmix") <= 30


def test_cross_entropy_on_mixup_targets_is_the_soft_target_loss():
    # Training uses nn.CrossEntropyLoss() on Mixup's probability targets: it must be timm's
    # SoftTargetCrossEntropy, the batch mean of -sum(target * log_softmax(logits)).
    mixup = Mixup(num_classes=7)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 6, 2, 2, 4, 1])
    logits = torch.randn(6, 7)
    loss = nn.CrossEntropyLoss()
    for seed in range(5):
        random.seed(seed)
        _, soft = mixup(x, y)
        expected = -(soft * F.log_softmax(logits, dim=-1)).sum(-1).mean()
        assert torch.allclose(loss(logits, soft), expected, atol=1e-6)
    # Unmixed targets: hard labels, and smoothing with torch's own label_smoothing convention.
    logits, y = torch.randn(5, 7), torch.tensor([0, 6, 2, 2, 4])
    assert torch.allclose(loss(logits, mixup_target(y, 7)), F.cross_entropy(logits, y), atol=1e-6)
    smoothed = mixup_target(y, 7, smoothing=0.1)
    assert torch.allclose(loss(logits, smoothed), F.cross_entropy(logits, y, label_smoothing=0.1), atol=1e-6)
