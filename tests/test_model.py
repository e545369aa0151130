"""The model: every preset, the timm-style API, input checks, and the official semantics that
transformers cannot check (avg/linear projections, drop path, initialisation)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import torchcvt
from torchcvt import CvT, CvTConfig, create_model, preset_config

# Trainable parameters with a 1000-class head: the numbers the CvT paper and model zoo report.
PARAMS = {
    "cvt-13": 19_997_480, "cvt-13-384": 19_997_480,
    "cvt-21": 31_622_696, "cvt-21-384": 31_622_696,
    "cvt-w24": 277_196_392, "cvt-w24-384": 277_196_392,
}


@pytest.mark.parametrize("name", list(PARAMS))
def test_preset_matrix(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == PARAMS[name]
    assert model.config.image_size == (384 if name.endswith("384") else 224)
    x = torch.randn(1, 3, 48, 40)  # batch 1, small, non-square: the forward path of every preset
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_intermediates(x, intermediates_only=True)
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()
    assert [f.shape[1] for f in feats] == list(model.config.embed_dim)
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16]


def test_tutorial_signature():
    model = CvT(224, 3, 1000)
    assert model.config == preset_config("cvt-13")
    assert sum(p.numel() for p in model.parameters()) == 19_997_480
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 1000)
    assert CvT(160, 1, 10).config.num_channels == 1


def tiny(**changes) -> CvTConfig:
    base = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), num_classes=5, image_size=64)
    return CvTConfig(**{**base, **changes})


def test_any_size_and_batch_one():
    model = CvT(config=tiny()).eval()
    for shape in [(1, 3, 64, 64), (2, 3, 37, 91), (1, 3, 17, 17)]:
        with torch.no_grad():
            assert model(torch.randn(shape)).shape == (shape[0], 5)
    # Batch 1 equals the same image inside a batch (the official squeeze bug would break this).
    x = torch.randn(3, 3, 50, 70)
    with torch.no_grad():
        assert torch.allclose(model(x[1:2]), model(x)[1:2], atol=1e-5)


@pytest.mark.parametrize(
    "x, message",
    [
        (torch.randn(1, 4, 64, 64), "expects 3 input channels"),
        (torch.randn(3, 64, 64), "4-D input"),
        (torch.randn(1, 3, 2, 64), "too small"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), "floating-point"),
    ],
)
def test_input_errors(x, message):
    model = CvT(config=tiny()).eval()
    with pytest.raises((ValueError, TypeError), match=message):
        model(x)


def test_timm_api():
    model = CvT(config=tiny()).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, 1, 48)  # the normed cls token
        assert torch.allclose(model.forward_head(tokens), model(x))
        assert model.forward_head(tokens, pre_logits=True).shape == (2, 48)
        final, maps = model.forward_intermediates(x, return_cls_token=True)
        assert [m.shape for m, _ in maps] == [(2, 16, 16, 16), (2, 32, 8, 8), (2, 48, 4, 4)]
        assert maps[0][1] is None and maps[2][1].shape == (2, 1, 48)
        assert torch.allclose(final, tokens)
        last = model.forward_intermediates(x, indices=1, intermediates_only=True)
        assert len(last) == 1 and last[0].shape == (2, 48, 4, 4)
        early = model.forward_intermediates(x, indices=[0], intermediates_only=True, stop_early=True)
        assert len(early) == 1 and torch.allclose(early[0], maps[0][0])
    assert model.no_weight_decay() == {"stages.2.cls_token"}
    assert model.get_classifier() is model.head

    model.reset_classifier(3, id2label={0: "a", 1: "b", 2: "c"})
    assert model.head.out_features == 3 and model.config.num_classes == 3 and model.config.id2label[2] == "c"
    model.reset_classifier(0)
    with torch.no_grad():
        assert model(x).shape == (2, 48)  # a backbone
    backbone = create_model(tiny(), num_classes=0)
    assert backbone.config.num_classes == 0 and isinstance(backbone.head, torch.nn.Identity)


def test_no_cls_token_means_mean_pooling():
    model = CvT(config=tiny(cls_token=(False, False, False))).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.forward_features(x)
        fmap = model.forward_intermediates(x, intermediates_only=True)[-1]
        expected = model.head(model.norm(fmap.flatten(2).transpose(1, 2)).mean(1))
    assert tokens.shape == (2, 16, 48)
    assert torch.allclose(model(x), expected, atol=1e-6)


def official_attention(attn, x, h, w, method):
    """microsoft/CvT Attention.forward, transcribed with einsum (the reference for avg/linear)."""
    if attn.with_cls_token:
        cls_token, x = torch.split(x, [1, h * w], 1)
    b, t, c = x.shape
    fmap = x.transpose(1, 2).reshape(b, c, h, w)

    def project(p, stride, is_q):
        if method == "linear" or (method == "avg" and is_q):
            return x
        if method == "avg":
            out = F.avg_pool2d(fmap, 3, stride, 1, ceil_mode=True)
        else:
            out = F.batch_norm(F.conv2d(fmap, p.conv.weight, None, stride, 1, groups=c), p.bn.running_mean,
                               p.bn.running_var, p.bn.weight, p.bn.bias, False, 0.0, p.bn.eps)
        return out.flatten(2).transpose(1, 2)

    q, k, v = project(attn.conv_proj_q, 1, True), project(attn.conv_proj_k, 2, False), project(attn.conv_proj_v, 2, False)
    if attn.with_cls_token:
        q, k, v = (torch.cat((cls_token, t_), 1) for t_ in (q, k, v))
    heads = attn.num_heads

    def split(t_):
        return t_.reshape(t_.shape[0], t_.shape[1], heads, -1).permute(0, 2, 1, 3)

    q, k, v = split(attn.proj_q(q)), split(attn.proj_k(k)), split(attn.proj_v(v))
    score = torch.einsum("bhlk,bhtk->bhlt", q, k) * c**-0.5
    out = torch.einsum("bhlt,bhtv->bhlv", score.softmax(-1), v)
    return attn.proj(out.permute(0, 2, 1, 3).reshape(b, -1, c))


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("with_cls", [False, True])
def test_attention_matches_official_formulation(method, with_cls):
    torch.manual_seed(1)
    config = tiny(qkv_projection_method=(method,) * 3, cls_token=(False, False, with_cls))
    model = CvT(config=config).eval()
    from conftest import randomize_norms

    randomize_norms(model)
    attn = model.stages[2].blocks[0].attn
    h, w = 5, 7
    x = torch.randn(2, h * w + int(with_cls), 48)
    with torch.no_grad():
        assert torch.allclose(attn(x, h, w), official_attention(attn, x, h, w, method), atol=1e-5)
        assert model(torch.randn(1, 3, 70, 52)).shape == (1, 5)


def test_drop_path_schedule_and_placement():
    config = tiny(depth=(1, 2, 5), drop_path_rate=(0.0, 0.2, 0.4))
    model = CvT(config=config)
    rates = [[getattr(b.drop_path, "drop_prob", 0.0) for b in s.blocks] for s in model.stages]
    assert rates[0] == [0.0]
    assert rates[1] == pytest.approx([0.0, 0.2])
    assert rates[2] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4])  # linspace(0, rate, depth) per stage

    # Drop path scales only the residual branch: with every branch dropped a block is the identity.
    block = model.stages[2].blocks[4]
    block.drop_path.drop_prob = 1 - 1e-12  # keep_prob ~ 0: every sample's branch dropped
    block.train()
    x = torch.randn(4, 17, 48)
    assert torch.equal(block(x, 4, 4), x)
    block.eval()
    assert not torch.equal(block(x, 4, 4), x)


def test_quick_gelu_in_mlp():
    model = CvT(config=tiny())
    act = model.stages[0].blocks[0].mlp.act
    x = torch.linspace(-3, 3, 7)
    assert torch.allclose(act(x), x * torch.sigmoid(1.702 * x))
    gelu = CvT(config=tiny(hidden_act="gelu")).stages[0].blocks[0].mlp.act
    assert torch.allclose(gelu(x), F.gelu(x))


def test_attention_scale_is_whole_width():
    model = CvT(config=tiny())
    assert model.stages[2].blocks[0].attn.scale == pytest.approx(48**-0.5)  # not (48 / 3) ** -0.5


def test_official_initialisation():
    torch.manual_seed(0)
    model = CvT(config=preset_config("cvt-13"))
    fc = model.stages[2].blocks[3].mlp.fc1
    # timm's trunc_normal_(std=0.02), as the official code: bounds at +-2 absolute, i.e. ~N(0, 0.02)
    assert fc.bias.abs().max() == 0 and 0.0195 < fc.weight.std().item() < 0.0205
    bn = model.stages[1].blocks[0].attn.conv_proj_k.bn
    assert torch.equal(bn.weight, torch.ones_like(bn.weight)) and bn.bias.abs().max() == 0
    assert 0.015 < model.stages[2].cls_token.std().item() < 0.022
    assert 0.019 < model.head.weight.std().item() < 0.021


def test_training_mode_is_deterministic_without_dropout_and_batchnorm_updates():
    model = CvT(config=tiny(drop_path_rate=(0, 0, 0)))
    bn = model.stages[0].blocks[0].attn.conv_proj_q.bn
    before = bn.running_mean.clone()
    model.train()
    loss = model(torch.randn(2, 3, 32, 32)).sum()
    loss.backward()
    assert not torch.equal(before, bn.running_mean)  # BN statistics update in training mode
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad), "every parameter gets a gradient"


def test_create_model_overrides():
    model = create_model("cvt-13", hidden_act="gelu", num_classes=10, drop_path_rate=(0, 0, 0.2))
    assert model.config.hidden_act == "gelu" and model.config.num_classes == 10
    assert model.stages[2].blocks[-1].drop_path.drop_prob == pytest.approx(0.2)
    with pytest.raises(torchcvt.ConfigError, match="unknown CvTConfig field"):
        create_model("cvt-13", depths=(1, 1, 1))
