"""CvTConfig: validation, presets, and a JSON form that is transformers' config.json."""

from __future__ import annotations

import json

import pytest

from torchcvt import ConfigError, CvTConfig, list_models, preset_config


def test_defaults_are_cvt13():
    c = CvTConfig()
    assert (c.embed_dim, c.num_heads, c.depth) == ((64, 192, 384), (1, 3, 6), (1, 2, 10))
    assert c.hidden_act == "quick_gelu" and c.layer_norm_eps == 1e-5 and c.cls_token == (False, False, True)
    assert c == preset_config("cvt-13")


def test_lists_become_tuples_and_config_is_frozen():
    c = CvTConfig(embed_dim=[64, 192, 384], mlp_ratio=[4, 4, 4])
    assert c.embed_dim == (64, 192, 384) and c.mlp_ratio == (4.0, 4.0, 4.0)
    with pytest.raises(Exception):
        c.num_classes = 3  # frozen


@pytest.mark.parametrize(
    "changes, fragment",
    [
        (dict(depth=(1, 2)), "must all have 2 entries"),
        (dict(num_heads=(1, 5, 6)), "num_heads=5 does not divide embed_dim=192"),
        (dict(qkv_projection_method=("dw_bn", "conv", "dw_bn")), "unknown ['conv']"),
        (dict(embed_dim=(64, 0, 384)), "embed_dim entries must be positive"),
        (dict(hidden_act="relu"), "hidden_act must be one of"),
        (dict(drop_path_rate=(0, 0, 1.5)), "drop_path_rate entries must be in [0, 1)"),
        (dict(num_classes=-1), "num_classes must be >= 0"),
        (dict(image_size=2), "too small"),
        (dict(num_classes=2, id2label={0: "a"}), "id2label must name classes 0..1"),
        (dict(embed_dim=64), "must be a list with one entry per stage"),
        (dict(depth=(1, 2.5, 10)), "depth entries must be int"),
    ],
)
def test_validation_messages(changes, fragment):
    with pytest.raises(ConfigError) as err:
        CvTConfig(**changes)
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


def test_any_number_of_stages():
    c = CvTConfig(
        patch_sizes=(7, 3), patch_stride=(4, 2), patch_padding=(2, 1), embed_dim=(32, 64), num_heads=(1, 2),
        depth=(1, 1), mlp_ratio=(4, 4), attention_drop_rate=(0, 0), drop_rate=(0, 0), drop_path_rate=(0, 0.1),
        qkv_bias=(True, True), cls_token=(False, True), qkv_projection_method=("dw_bn", "avg"),
        kernel_qkv=(3, 3), padding_kv=(1, 1), stride_kv=(2, 2), padding_q=(1, 1), stride_q=(1, 1),
    )
    assert c.num_stages == 2 and c.reductions() == [4, 8]


def test_presets():
    assert {"cvt-13", "cvt-13-384", "cvt-21", "cvt-21-384", "cvt-w24", "cvt-w24-384"} <= set(list_models())
    assert preset_config("cvt-21").depth == (1, 4, 16)
    assert preset_config("cvt-w24-384").embed_dim == (192, 768, 1024) and preset_config("cvt-w24-384").image_size == 384
    with pytest.raises(ConfigError, match="unknown model 'cvt-99'"):
        preset_config("cvt-99")


def test_feature_sizes_and_minimum_input():
    c = CvTConfig()
    assert c.feature_sizes(224, 224) == [(56, 56), (28, 28), (14, 14)]
    assert c.feature_sizes(200, 264) == [(50, 66), (25, 33), (13, 17)]
    assert c.min_input_size() == 3  # 3 -> 1 -> 1 -> 1 tokens; padding 1 lets a 3x3 kernel see a 1x1 grid


def test_json_round_trip(tmp_path):
    c = CvTConfig(num_classes=3, id2label={0: "cat", 1: "dog", 2: "owl"}, hidden_act="gelu", image_size=384)
    assert CvTConfig.from_json(c.to_json()) == c
    c.save(tmp_path / "config.json")
    assert CvTConfig.load(tmp_path) == c
    d = json.loads(c.to_json())
    assert d["model_type"] == "cvt" and d["architectures"] == ["CvtForImageClassification"]
    assert d["label2id"] == {"cat": 0, "dog": 1, "owl": 2}
    assert all(isinstance(v, float) for v in d["mlp_ratio"] + d["drop_path_rate"])


def test_transformers_reads_our_json_and_we_read_theirs(tmp_path):
    from transformers import CvtConfig as HFConfig

    ours = CvTConfig(depth=(1, 4, 16), num_classes=5, id2label={i: f"c{i}" for i in range(5)})
    ours.save(tmp_path / "config.json")
    theirs = HFConfig.from_pretrained(tmp_path)
    assert list(theirs.depth) == [1, 4, 16] and theirs.num_labels == 5 and theirs.id2label[3] == "c3"

    HFConfig(depth=[1, 4, 16], num_labels=4).save_pretrained(tmp_path / "hf")
    back = CvTConfig.load(tmp_path / "hf")
    assert back.depth == (1, 4, 16) and back.num_classes == 4
    assert back.id2label is None  # transformers' placeholder names LABEL_i are not real labels
    assert back.layer_norm_eps == 1e-5  # transformers' unused 1e-12 is not taken over
    assert back.hidden_act == "quick_gelu"  # absent from their file: our default applies


def test_load_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        CvTConfig.load(tmp_path / "nothing.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        CvTConfig.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit"}))
    with pytest.raises(ConfigError, match="model_type 'vit'"):
        CvTConfig.load(tmp_path)
