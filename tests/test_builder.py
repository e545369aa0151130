"""timm's builder conventions: create_model's arguments, features_only, feature_info, global_pool,
in_chans, drop_path_rate, gradient checkpointing, and the torch.hub entry points (hubconf.py).

References: transformers' CvtForImageClassification on the same weights (its hidden_states are the
stage maps, its logits the classifier), and computations written out here from the model's parts.
"""

from __future__ import annotations

import copy
import importlib.util
import inspect
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import torchcvt
from torchcvt import CvT, CvTConfig, create_model
from torchcvt.errors import ConfigError
from torchcvt.pretrained import REGISTRY

from conftest import plant_hub_repo

ROOT = Path(__file__).resolve().parents[1]
TINY = CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), num_classes=5, image_size=64)


def test_create_model_takes_timms_arguments():
    params = inspect.signature(create_model).parameters
    assert list(params)[:8] == ["model_name", "pretrained", "num_classes", "in_chans", "global_pool", "features_only",
                                "out_indices", "drop_path_rate"]
    model = create_model("cvt_13", num_classes=10, in_chans=1, global_pool="avg", drop_path_rate=0.2)
    c = model.config
    assert (c.num_classes, c.num_channels, c.global_pool, c.drop_path_rate) == (10, 1, "avg", (0.0, 0.0, 0.2))
    assert create_model("cvt-13", drop_path_rate=(0.0, 0.1, 0.2)).config.drop_path_rate == (0.0, 0.1, 0.2)
    assert CvT(160, 1, 10).config.num_channels == 1  # CvT(image_size, in_chans, num_classes)
    assert inspect.signature(CvT).parameters["in_chans"].default is None
    with pytest.raises(ConfigError, match="in_chans"):
        create_model("cvt-13", num_channels=1)  # one name per level: in_chans in the builder
    with pytest.raises(ConfigError, match="features_only"):
        create_model("cvt-13", out_indices=(1, 2))


def test_pretrained_cfg_names_real_modules():
    model = create_model("cvt_21_384_22k")
    cfg = model.pretrained_cfg
    assert isinstance(model.get_submodule(cfg["first_conv"]), torch.nn.Conv2d)
    assert model.get_submodule(cfg["classifier"]) is model.head
    assert cfg["hub_id"] == REGISTRY["cvt-21-384-22k"].hub_id and cfg["license"] == "apache-2.0"
    assert (cfg["input_size"], cfg["crop_mode"], cfg["pretrained_on"]) == ((3, 384, 384), "squash", "ImageNet-22k")
    assert create_model("cvt-13", in_chans=1).pretrained_cfg["input_size"] == (1, 224, 224)


# ------------------------------------------------------------------------------------ features
def test_features_only_cvt13_gives_three_contiguous_maps():
    model = create_model("cvt_13", features_only=True).eval()
    assert isinstance(model, torchcvt.FeatureListNet)
    with torch.no_grad():
        maps = model(torch.randn(2, 3, 224, 224))
    assert [m.shape for m in maps] == [(2, 64, 56, 56), (2, 192, 28, 28), (2, 384, 14, 14)]
    assert all(m.is_contiguous() for m in maps)
    info = model.feature_info
    assert info.channels() == [64, 192, 384] and info.reduction() == [4, 8, 16]
    assert info.module_name() == ["stages.0", "stages.1", "stages.2"]
    assert [224 // r for r in info.reduction()] == [m.shape[-1] for m in maps]


def test_features_only_equals_transformers_hidden_states(reference):
    hf_model, directory = reference("tiny")
    x = torch.randn(2, 3, 96, 80)
    with torch.no_grad():
        expected = hf_model(x, output_hidden_states=True).hidden_states
        every = create_model(weights=str(directory), features_only=True).eval()(x)
        last_two = create_model(weights=str(directory), features_only=True, out_indices=(-2, -1)).eval()
        first = create_model(weights=str(directory), features_only=True, out_indices=(0,)).eval()
        maps = last_two(x)
    for ours, theirs in zip(every, expected):
        torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)
    torch.testing.assert_close(maps, list(expected[1:]), atol=1e-4, rtol=0)
    assert last_two.feature_info.channels() == [32, 48] and last_two.feature_info.reduction() == [8, 16]
    # Only the stages up to the last one asked for; their parameter names are the classifier's.
    assert len(first.stages) == 1 and len(first(x)) == 1
    classifier_keys = set(create_model(weights=str(directory)).state_dict())
    assert set(first.state_dict()) < classifier_keys and all(k.startswith("stages.0.") for k in first.state_dict())


def test_forward_intermediates_maps_are_contiguous():
    model = CvT(config=TINY).eval()
    with torch.no_grad():
        maps = model.forward_intermediates(torch.randn(2, 3, 64, 64), intermediates_only=True)
    assert all(m.is_contiguous() for m in maps)  # stage 2's used to be a strided view past its cls token


def test_feature_info_is_timms_and_still_a_list():
    model = CvT(config=TINY)
    info = model.feature_info
    assert info.channels() == [16, 32, 48] and info.reduction() == [4, 8, 16] and info.channels(1) == 32
    assert [model.get_submodule(name) for name in info.module_name()] == list(model.stages)
    assert len(info) == 3 and info[2] == {"num_chs": 48, "reduction": 16, "module": "stages.2"}
    assert [i["reduction"] for i in info] == [4, 8, 16]


# ----------------------------------------------------------------------------------- pooling
def test_global_pool_choices_against_their_definitions():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    token = CvT(config=TINY).eval()
    assert token.global_pool == "token"  # the official choice with a cls token
    with torch.no_grad():
        maps = token.forward_intermediates(x, intermediates_only=True, return_cls_token=True)
        spatial, cls_token = maps[-1][0].flatten(2).transpose(1, 2), maps[-1][1]  # [2, 16, 48], [2, 1, 48]
        for pool, tokens, pooled in (
            ("token", token.norm(cls_token), token.norm(cls_token)[:, 0]),
            ("avg", token.norm(spatial), token.norm(spatial).mean(1)),
            ("", token.norm(torch.cat((cls_token, spatial), 1)), None),
        ):
            model = copy.deepcopy(token)
            model.reset_classifier(5, pool)
            model.load_state_dict(token.state_dict())
            assert model.config.global_pool == pool
            torch.testing.assert_close(model.forward_features(x), tokens)
            if pooled is None:  # no pooling: the head classifies every token
                assert model(x).shape == (2, 17, 5)
                torch.testing.assert_close(model(x), token.head(tokens))
            else:
                torch.testing.assert_close(model(x), token.head(pooled))
    no_cls = CvT(config=TINY.replace(cls_token=(False, False, False)))
    assert no_cls.global_pool == "avg"
    with pytest.raises(ConfigError, match="needs a cls token"):
        TINY.replace(cls_token=(False, False, False), global_pool="token")
    with pytest.raises(ConfigError, match="global_pool must be one of"):
        create_model("cvt-13", global_pool="max")


def test_global_pool_is_saved_with_the_model(tmp_path):
    model = create_model(TINY, global_pool="avg")
    torchcvt.save_pretrained(model, tmp_path)
    loaded = create_model(weights=str(tmp_path)).eval()
    assert loaded.global_pool == "avg"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
    assert "global_pool" not in CvTConfig().to_dict()  # the official choice writes nothing


# -------------------------------------------------------------------------------- input channels
def test_in_chans_adapts_pretrained_first_conv(tmp_path):
    rgb = create_model(TINY).eval()
    torchcvt.save_pretrained(rgb, tmp_path)
    grey = create_model(weights=str(tmp_path), in_chans=1).eval()
    four = create_model(weights=str(tmp_path), in_chans=4).eval()
    assert grey.config.num_channels == 1 and grey.stages[0].patch_embed.proj.weight.shape[1] == 1
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        # A grey image is an RGB image with three equal channels: the summed kernel sees the same.
        torch.testing.assert_close(grey(x), rgb(x.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
        # Four channels: RGB repeated (R, G, B, R) and scaled by 3/4, so (r, g, b, 0) input gives 3/4 of the RGB response.
        w, w4 = rgb.stages[0].patch_embed.proj.weight, four.stages[0].patch_embed.proj.weight
        torch.testing.assert_close(w4, torch.cat((w, w[:, :1]), 1) * 0.75)


# ---------------------------------------------------------------------- gradient checkpointing
def _training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Loss, gradients (left in .grad) and the bytes of activations autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    torch.manual_seed(1)  # the same drop-path draws in both models
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.detach(), sum(kept.values())


def test_grad_checkpointing_same_step_less_kept_for_backward():
    torch.manual_seed(0)
    plain = create_model("cvt-tiny", drop_path_rate=(0.0, 0.1, 0.2)).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.set_grad_checkpointing()
    x, y = torch.randn(4, 3, 64, 64), torch.tensor([0, 1, 2, 3])
    loss, plain_bytes = _training_step(plain, x, y)
    loss_ckpt, ckpt_bytes = _training_step(checkpointed, x, y)
    torch.testing.assert_close(loss_ckpt, loss)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)
    # BatchNorm statistics move once per step, as without checkpointing (the recomputation is undone).
    for name, buffer in plain.named_buffers():
        torch.testing.assert_close(checkpointed.get_buffer(name), buffer, atol=0, rtol=0, msg=name)
    assert ckpt_bytes < 0.3 * plain_bytes, (ckpt_bytes, plain_bytes)  # 0.22 for this model and input
    features = create_model("cvt-tiny", features_only=True)
    features.set_grad_checkpointing()
    assert all(stage.grad_checkpointing for stage in features.stages)
    checkpointed.set_grad_checkpointing(False)
    assert not any(stage.grad_checkpointing for stage in checkpointed.stages)


# ------------------------------------------------------------------------------------ torch.hub
def _hubconf():
    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hubconf_has_one_entry_per_registry_name():
    hubconf = _hubconf()
    # What torch.hub.list shows: the public callables of hubconf.
    entries = {name for name in dir(hubconf) if callable(getattr(hubconf, name)) and not name.startswith("_")}
    assert entries == {name.replace("-", "_") for name in REGISTRY}
    assert all(importlib.util.find_spec(dep) for dep in hubconf.dependencies)
    assert "microsoft" in hubconf.cvt_13.__doc__ and "no public weights" in hubconf.cvt_tiny.__doc__


def test_torch_hub_load_local(reference, offline_hub):
    model = torch.hub.load(str(ROOT), "cvt_13", source="local")
    assert isinstance(model, CvT) and model.config == REGISTRY["cvt-13"].config()
    backbone = torch.hub.load(str(ROOT), "cvt_tiny", source="local", features_only=True, out_indices=(2,))
    assert backbone.feature_info.channels() == [128]
    # pretrained=True: the public weights, here random transformers weights planted in an offline cache.
    hf_model, directory = reference("cvt-13")
    plant_hub_repo(offline_hub, REGISTRY["cvt-13"].hub_id, directory, 224)
    model = torch.hub.load(str(ROOT), "cvt_13", source="local", pretrained=True).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), hf_model(x).logits, atol=1e-4, rtol=0)
