"""Evaluation preprocessing and ImageNet labels, checked against transformers.

The reference is what transformers' image-classification pipeline does: ``load_image`` (EXIF
orientation, then ``convert("RGB")``) followed by ConvNextImageProcessor's PIL backend. Where
transformers has no usable answer (16-bit and 0..1 float images, which Pillow's convert saturates
or truncates to black), we compare against transformers fed the 8-bit image our documented rule
gives, so the resize path is still checked against it.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from torchcvt.errors import ConfigError, ImageError
from torchcvt.labels import imagenet_id2label, imagenet_labels
from torchcvt.images import is_image_file, load_image
from torchcvt.transforms import (
    RESAMPLE_FILTERS,
    PreprocessConfig,
    denormalize,
    normalize,
    preprocess,
    preprocess_batch,
    read_preprocessor_config,
    write_preprocessor_config,
)

transformers = pytest.importorskip("transformers")
from transformers import AutoImageProcessor  # noqa: E402
from transformers.image_utils import load_image as hf_load_image  # noqa: E402

try:  # transformers 5: ConvNextImageProcessor is the torchvision backend, the PIL one has its own name
    from transformers import ConvNextImageProcessorPil as HFConvNextProcessor
except ImportError:  # transformers 4: ConvNextImageProcessor is PIL-based
    from transformers import ConvNextImageProcessor as HFConvNextProcessor

TOL = 1e-4
SHAPES = [(300, 217), (217, 300), (333, 199)]  # (width, height): landscape, portrait, odd sizes
MODES = ["RGB", "L", "RGBA", "LA", "P", "CMYK", "YCbCr", "1"]


def random_rgb(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_image(mode: str, width: int, height: int) -> Image.Image:
    rgb = random_rgb(width, height)
    alpha = np.random.default_rng(1).integers(0, 256, (height, width, 1), dtype=np.uint8)
    if mode == "RGBA":
        return Image.fromarray(np.concatenate([rgb, alpha], axis=2))
    if mode == "LA":
        return Image.fromarray(np.concatenate([rgb, alpha], axis=2)).convert("LA")
    if mode == "P":
        return Image.fromarray(rgb).quantize(colors=64)
    return Image.fromarray(rgb).convert(mode)


def hf_preprocess(image, cfg: PreprocessConfig) -> torch.Tensor:
    """transformers' pipeline preprocessing for ``cfg``, built from its fields (not from our to_dict)."""
    processor = HFConvNextProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_pct=cfg.crop_pct if cfg.crop_pct is not None else 0.875,  # ignored from 384 up
        resample=RESAMPLE_FILTERS[cfg.resample],
        image_mean=list(cfg.mean),
        image_std=list(cfg.std),
    )
    return processor(hf_load_image(image), return_tensors="pt")["pixel_values"][0]


def assert_close(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert ours.dtype == torch.float32
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() <= TOL


# ------------------------------------------------------------------------ parity with transformers


@pytest.mark.parametrize("image_size", [224, 384])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", MODES)
def test_matches_transformers(mode, shape, image_size):
    image = make_image(mode, *shape)
    cfg = PreprocessConfig.for_resolution(image_size)
    ours = preprocess(image, cfg)
    assert ours.shape == (3, image_size, image_size)
    assert_close(ours, hf_preprocess(image, cfg))


@pytest.mark.parametrize("image_size", [224, 384])
@pytest.mark.parametrize("shape", SHAPES[:2])
def test_16bit_and_float_modes(shape, image_size):
    width, height = shape
    rng = np.random.default_rng(2)
    cfg = PreprocessConfig.for_resolution(image_size)
    raw16 = rng.integers(0, 65536, (height, width), dtype=np.uint16)
    eight_bit = ((raw16.astype(np.int64) + 128) // 257).astype(np.uint8)
    # Pillow's convert saturates 16-bit data at 255: compare with transformers on the scaled image.
    assert_close(preprocess(Image.fromarray(raw16), cfg), hf_preprocess(Image.fromarray(eight_bit), cfg))
    # "I" (32-bit) is clipped to 0..65535, then scaled the same way.
    raw32 = raw16.astype(np.int32)
    raw32[0, :10] = [-7, -1, 65536, 70000, 10**9, 0, 1, 2, 3, 4]
    clipped = ((np.clip(raw32, 0, 65535).astype(np.int64) + 128) // 257).astype(np.uint8)
    assert_close(preprocess(Image.fromarray(raw32), cfg), hf_preprocess(Image.fromarray(clipped), cfg))
    # "F" holding 0..255 goes through Pillow exactly as transformers does...
    grey = rng.integers(0, 256, (height, width)).astype(np.float32)
    assert_close(preprocess(Image.fromarray(grey), cfg), hf_preprocess(Image.fromarray(grey), cfg))
    # ...and "F" holding 0..1 is scaled by 255 (Pillow would truncate it to black).
    unit = rng.random((height, width), dtype=np.float32)
    as_u8 = np.round(unit * 255).astype(np.uint8)
    assert_close(preprocess(Image.fromarray(unit), cfg), hf_preprocess(Image.fromarray(as_u8), cfg))


@pytest.mark.parametrize("mean, std", [((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5, 0.4, 0.3), (0.2, 0.3, 0.4))])
def test_every_8_bit_value_is_bit_identical_to_transformers(mean, std):
    # 384 px is not resized (squashed to its own size), so all 256 values of each channel reach the
    # normalisation as they are: our lookup table must give transformers' float64-then-float32 bits.
    values = np.arange(384 * 384 * 3) % 256
    rgb = np.random.default_rng(0).permutation(values).reshape(384, 384, 3).astype(np.uint8)
    cfg = PreprocessConfig(image_size=384, crop_pct=None, mean=mean, std=std)
    ours = preprocess(Image.fromarray(rgb), cfg)
    assert ours.is_contiguous() and torch.equal(ours, hf_preprocess(Image.fromarray(rgb), cfg))


def test_16bit_rounding_rule():
    raw = np.array([[0, 128, 129, 257, 385, 386, 65535]], dtype=np.uint16)
    assert np.asarray(load_image(Image.fromarray(raw)))[..., 0].tolist() == [[0, 0, 1, 1, 1, 2, 255]]


@pytest.mark.parametrize("resample", ["bilinear", "nearest", "lanczos"])
def test_resample_filters_match_transformers(resample):
    image = make_image("RGB", *SHAPES[0])
    cfg = PreprocessConfig(image_size=224, crop_pct=0.875, resample=resample)
    assert_close(preprocess(image, cfg), hf_preprocess(image, cfg))


def test_custom_crop_and_normalisation_match_transformers():
    image = make_image("RGB", *SHAPES[2])
    cfg = PreprocessConfig(image_size=160, crop_pct=0.95, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.4))
    assert_close(preprocess(image, cfg), hf_preprocess(image, cfg))


def test_for_resolution_follows_the_384_rule():
    assert PreprocessConfig.for_resolution(224).crop_pct == 0.875
    assert PreprocessConfig.for_resolution(383).crop_pct == 0.875
    assert PreprocessConfig.for_resolution(384).crop_pct is None
    assert PreprocessConfig.for_resolution(448).image_size == 448


# ------------------------------------------------------------------- preprocessor_config.json


ROUND_TRIP_CONFIGS = [
    PreprocessConfig.for_resolution(224),
    PreprocessConfig.for_resolution(384),
    PreprocessConfig(image_size=224, crop_pct=None),  # squash below 384: written as ViTImageProcessor
    PreprocessConfig(image_size=160, crop_pct=0.9, resample="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3),
]


@pytest.mark.parametrize("cfg", ROUND_TRIP_CONFIGS, ids=lambda c: f"{c.image_size}-{c.crop_pct}-{c.resample}")
def test_config_round_trip_and_transformers_loads_it(cfg, tmp_path):
    d = cfg.to_dict()
    assert PreprocessConfig.from_dict(json.loads(json.dumps(d))) == cfg
    write_preprocessor_config(cfg, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["preprocessor_config.json"]  # no temp file left
    assert read_preprocessor_config(tmp_path) == cfg
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    for shape in SHAPES[:2]:
        image = make_image("RGB", *shape)
        theirs = processor(hf_load_image(image), return_tensors="pt")["pixel_values"][0]
        assert_close(preprocess(image, cfg), theirs)


def test_reads_the_microsoft_cvt13_preprocessor_config(tmp_path):
    # The file as published with microsoft/cvt-13 (old feature-extractor spelling, int size).
    published = {
        "crop_pct": 0.875,
        "do_normalize": True,
        "do_resize": True,
        "feature_extractor_type": "ConvNextFeatureExtractor",
        "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225],
        "resample": 3,
        "size": 224,
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(published))
    cfg = read_preprocessor_config(tmp_path)
    assert cfg == PreprocessConfig.for_resolution(224)
    image = make_image("RGB", *SHAPES[0])
    theirs = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"][0]
    assert_close(cfg(image), theirs)


@pytest.mark.parametrize(
    "partial",
    [
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 224}},
        {"image_processor_type": "ConvNextImageProcessor", "size": {"shortest_edge": 384}, "crop_pct": 0.8},
        {"image_processor_type": "ViTImageProcessor", "size": 200, "resample": 3},
    ],
)
def test_missing_keys_take_transformers_defaults(partial, tmp_path):
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(partial))
    cfg = read_preprocessor_config(tmp_path)
    image = make_image("RGB", *SHAPES[1])
    theirs = AutoImageProcessor.from_pretrained(tmp_path)(image, return_tensors="pt")["pixel_values"][0]
    assert_close(preprocess(image, cfg), theirs)


def test_size_spellings():
    assert PreprocessConfig.from_dict({"size": {"height": 256, "width": 256}}).crop_pct is None
    assert PreprocessConfig.from_dict({"size": 224}).image_size == 224
    with pytest.raises(ConfigError, match="square"):
        PreprocessConfig.from_dict({"size": {"height": 256, "width": 200}})
    with pytest.raises(ConfigError, match="size"):
        PreprocessConfig.from_dict({"size": {"longest_edge": 256}})


def test_config_errors(tmp_path):
    assert read_preprocessor_config(tmp_path) is None
    (tmp_path / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="preprocessor_config.json"):
        read_preprocessor_config(tmp_path)
    with pytest.raises(ConfigError, match="squashes"):
        PreprocessConfig(image_size=384, crop_pct=0.875).to_dict()
    with pytest.raises(ConfigError, match="resample"):
        PreprocessConfig.from_dict({"resample": 4})
    with pytest.raises(ConfigError, match="do_rescale"):
        PreprocessConfig.from_dict({"do_rescale": False})
    with pytest.raises(ConfigError, match="not supported"):
        PreprocessConfig.from_dict({"image_processor_type": "CLIPImageProcessor"})
    for bad in [dict(crop_pct=0.0), dict(crop_pct=1.5), dict(resample="box"), dict(image_size=0), dict(std=(1, 0, 1))]:
        with pytest.raises(ConfigError):
            PreprocessConfig(**bad)


# ----------------------------------------------------------------------------- reading files


def jpeg_bytes(array: np.ndarray, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95, **save_kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content",
    [
        ("corrupt.jpg", bytes(np.random.default_rng(3).integers(0, 256, 4096, dtype=np.uint8))),
        ("truncated.jpg", jpeg_bytes(random_rgb(200, 150))[:3000]),
        ("empty.png", b""),
        ("notes.txt", b"these are not the pixels you are looking for\n"),
        ("missing.jpg", None),
        ("folder.jpg", "dir"),
    ],
)
def test_unreadable_files_raise_one_line_image_error(name, content, tmp_path):
    path = tmp_path / name
    if content == "dir":
        path.mkdir()
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ImageError) as info:
        load_image(path)
    message = str(info.value)
    assert name in message and "cannot read image" in message
    assert "\n" not in message


def test_decompression_bomb_guard_is_kept(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.fromarray(random_rgb(100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="big.png.*decompression bomb"):
        load_image(str(path))


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((32, 64, 3), dtype=np.uint8)
    pixels[:, :, 2] = 255  # blue
    pixels[:16, :16] = (255, 0, 0)  # red block in the top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned, display rotated 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    path.write_bytes(jpeg_bytes(pixels, exif=exif))

    image = load_image(path)
    assert image.mode == "RGB" and image.size == (32, 64)  # width and height swapped
    upright = np.asarray(image).astype(int)
    assert upright[4, 28, 0] > 200 and upright[4, 28, 2] < 60  # the red block is now top-right
    assert upright[4, 4, 2] > 200 and upright[4, 4, 0] < 60
    assert np.array_equal(upright, np.asarray(hf_load_image(str(path))))


@pytest.mark.parametrize("mode", ["P", "LA", "RGBA", "L"])
def test_files_load_like_transformers(mode, tmp_path):
    path = tmp_path / f"image-{mode}.png"
    make_image(mode, *SHAPES[0]).save(path)
    assert np.array_equal(np.asarray(load_image(path)), np.asarray(hf_load_image(str(path))))


# ------------------------------------------------------------------------ arrays and tensors


def test_arrays_and_tensors_equal_the_pil_image():
    rgb = random_rgb(*SHAPES[1])
    cfg = PreprocessConfig.for_resolution(224)
    expected = preprocess(Image.fromarray(rgb), cfg)
    chw = torch.from_numpy(rgb).permute(2, 0, 1)
    for source in (rgb, torch.from_numpy(rgb), chw, chw.float() / 255, chw.double() / 255):
        assert torch.equal(preprocess(source, cfg), expected)

    grey = rgb[..., 0]
    expected = preprocess(Image.fromarray(grey), cfg)
    for source in (grey, grey[..., None], torch.from_numpy(grey), torch.from_numpy(grey)[None]):
        assert torch.equal(preprocess(source, cfg), expected)

    rgba = np.concatenate([rgb, rgb[..., :1]], axis=2)
    assert torch.equal(preprocess(rgba, cfg), preprocess(Image.fromarray(rgba), cfg))


@pytest.mark.parametrize(
    "source, match",
    [
        (np.zeros((3, 50, 60), dtype=np.uint8), "HxWxC"),
        (np.zeros((1, 50, 60, 3), dtype=np.uint8), "HxWxC"),
        (np.zeros((50, 60, 3), dtype=np.int64), "uint8"),
        (np.zeros((50, 60), dtype=np.uint16), "uint8"),
        (np.full((50, 60, 3), 2.0), "0..1"),
        (np.zeros((0, 60, 3), dtype=np.uint8), "HxWxC"),
        (torch.zeros(2, 50, 60), "CxHxW"),
        (torch.zeros(1, 3, 50, 60), "CxHxW"),
        ([[0, 1], [2, 3]], "expected a path"),
    ],
)
def test_bad_arrays_raise_image_error(source, match):
    with pytest.raises(ImageError, match=match):
        preprocess(source, PreprocessConfig())


def test_batch_and_call():
    cfg = PreprocessConfig.for_resolution(224)
    images = [make_image("RGB", *shape) for shape in SHAPES]
    batch = preprocess_batch(images, cfg)
    assert batch.shape == (3, 3, 224, 224)
    assert torch.equal(batch[1], cfg(images[1]))
    assert preprocess_batch([], cfg).shape == (0, 3, 224, 224)


def test_input_image_is_not_modified():
    image = make_image("RGBA", *SHAPES[0])
    before = np.asarray(image).copy()
    preprocess(image, PreprocessConfig())
    assert image.mode == "RGBA" and np.array_equal(np.asarray(image), before)


# --------------------------------------------------------------------------------- pixel plumbing
def test_normalize_and_denormalize_against_numpy():
    rng = np.random.default_rng(0)
    pixels = rng.random((2, 3, 5, 4), dtype=np.float32)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    expected = (pixels - mean[:, None, None]) / std[:, None, None]
    x = normalize(torch.from_numpy(pixels), mean.tolist(), std.tolist())
    assert x.dtype == torch.float32
    np.testing.assert_allclose(x.numpy(), expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(denormalize(x, mean.tolist(), std.tolist()).numpy(), pixels, atol=1e-6)
    # Values outside the image range come back clamped to 0..1.
    far = torch.full((3, 2, 2), -9.0)
    far[:, 1] = 9.0
    assert torch.equal(denormalize(far, (0.5,) * 3, (0.5,) * 3), (far > 0).float())


def test_denormalize_gives_back_the_8_bit_image():
    # A squash to the image's own size leaves the pixels as they are: preprocess -> denormalize ->
    # load_image (round(v * 255)) must reproduce the original 8-bit RGB values exactly.
    rgb = np.random.default_rng(1).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    cfg = PreprocessConfig(image_size=24, crop_pct=None, mean=(0.3, 0.5, 0.7), std=(0.2, 0.3, 0.1))
    back = load_image(denormalize(preprocess(Image.fromarray(rgb), cfg), cfg.mean, cfg.std))
    assert np.array_equal(np.asarray(back), rgb)


def test_image_files_are_what_pillow_reads():
    for name in ("a.jpg", "B.JPG", "c.webp", "d.TIFF", "e.jfif", "f.ppm", "dir/g.png"):
        assert is_image_file(name), name
    for name in ("notes.txt", "archive.tar.gz", ".hidden.png", "._resource_fork.jpg", "noext"):
        assert not is_image_file(name), name


# ---------------------------------------------------------------------------------- labels


def test_imagenet_labels():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[0] == "tench, Tinca tinca"
    assert labels[1] == "goldfish, Carassius auratus"
    assert labels[207] == "golden retriever"
    assert labels[281] == "tabby, tabby cat"
    assert labels[409] == "analog clock"
    assert labels[999] == "toilet tissue, toilet paper, bathroom tissue"
    assert all(label and label == label.strip() for label in labels)
    assert imagenet_id2label() == dict(enumerate(labels))
    labels.append("mutated")
    assert len(imagenet_labels()) == 1000
