"""The fast path (fastpath.py) against references: transformers' CvT, the plain model (``nn.Linear``,
``Mlp``: PyTorch's own autograd), the official attention transcribed with einsum
(test_model.official_attention), and hand formulas."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import torchcvt
from torchcvt import CvT, CvTConfig, apply_fast_path, remove_fast_path
from torchcvt import fastpath
from torchcvt.fastpath import OneDNNLinear, OneDNNMlp, onednn_available, use_onednn
from torchcvt.fused import FusedBlock, fuse_for_inference
from torchcvt.model import Mlp

from conftest import randomize_norms
from test_model import official_attention
from test_parity import SHAPES, compare


def fast_types(model: torch.nn.Module) -> set[type]:
    return {type(m) for m in model.modules()} & {torch.nn.Linear, OneDNNLinear, Mlp, OneDNNMlp}


def test_probe_finds_the_op_here():
    """Where PyTorch has oneDNN (x86 and ARM builds), the probe must find its linear op working:
    a probe that failed silently would make every model plain and slow."""
    assert onednn_available() == torch.backends.mkldnn.is_available()


@pytest.mark.parametrize("name", ["tiny", "cvt-13"])
@pytest.mark.parametrize("fast", [True, False])
def test_fast_path_on_and_off_match_transformers(reference, name, fast):
    hf_model, directory = reference(name)
    model = torchcvt.create_model(weights=str(directory)).eval()
    assert fast_types(model) == {OneDNNLinear, OneDNNMlp}  # create_model / load_model return fast models
    if not fast:
        remove_fast_path(model)
        assert fast_types(model) == {torch.nn.Linear, Mlp}
    for i, shape in enumerate(SHAPES if name == "tiny" else SHAPES[1:3]):
        compare(hf_model, model, shape, seed=i)  # logits, every stage's features, forward_head


def test_apply_and_remove_keep_the_state_dict():
    model = CvT(config=tiny())
    assert fast_types(model) == {torch.nn.Linear, Mlp}  # CvT(...) is the plain reference model
    before = model.state_dict()
    params = list(model.parameters())
    assert apply_fast_path(model) is model and fast_types(model) == {OneDNNLinear, OneDNNMlp}
    apply_fast_path(model)  # idempotent
    assert fast_types(model) == {OneDNNLinear, OneDNNMlp}
    for m in (model, remove_fast_path(model)):
        after = m.state_dict()
        assert list(after) == list(before)
        assert all(after[k].data_ptr() == before[k].data_ptr() and torch.equal(after[k], before[k]) for k in before)
        assert all(a is b for a, b in zip(m.parameters(), params))  # an optimizer's references stay valid
    assert fast_types(model) == {torch.nn.Linear, Mlp}


def test_hooked_and_subclassed_linears_are_left_alone():
    class LoRALinear(torch.nn.Linear):
        pass

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), LoRALinear(4, 4), torch.nn.Linear(4, 4))
    model[2].register_forward_hook(lambda *args: None)
    apply_fast_path(model)
    assert [type(m) for m in model] == [OneDNNLinear, LoRALinear, torch.nn.Linear]


@pytest.mark.parametrize("name", ["tiny", "cvt-13"])
def test_optimized_matches_transformers(reference, name):
    hf_model, directory = reference(name)
    model = fuse_for_inference(torchcvt.create_model(weights=str(directory)))
    assert all(isinstance(b, FusedBlock) for s in model.stages for b in s.blocks)
    for i, shape in enumerate(SHAPES if name == "tiny" else SHAPES[1:3]):
        compare(hf_model, model, shape, seed=i)  # logits, every stage's features, forward_head


def tiny(**changes) -> CvTConfig:
    base = dict(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 1, 2), num_classes=5, image_size=64)
    return CvTConfig(**{**base, **changes})


def official_block(block, x, h, w, method, act):
    """Pre-norm block with the official attention and a hand-written MLP (the activation by formula)."""
    x = x + official_attention(block.attn, block.norm1(x), h, w, method)
    hidden = F.linear(block.norm2(x), block.mlp.fc1.weight, block.mlp.fc1.bias)
    hidden = hidden * torch.sigmoid(1.702 * hidden) if act == "quick_gelu" else 0.5 * hidden * (1 + torch.erf(hidden / 2**0.5))
    return x + F.linear(hidden, block.mlp.fc2.weight, block.mlp.fc2.bias)


@pytest.mark.parametrize("method", ["dw_bn", "avg", "linear"])
@pytest.mark.parametrize("with_cls", [False, True])
@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_fused_block_matches_official_formulation(method, with_cls, act):
    """Cases transformers cannot build: avg/linear projections, QuickGELU, a cls token anywhere."""
    torch.manual_seed(2)
    config = tiny(qkv_projection_method=(method,) * 3, cls_token=(False, with_cls, with_cls), hidden_act=act)
    model = CvT(config=config).eval()
    randomize_norms(model)
    with torch.no_grad():
        for p in model.parameters():  # biases too: a dropped or doubled bias must show
            p.add_(0.02 * torch.randn_like(p))
    fused = fuse_for_inference(model).stages[2].blocks[1]
    block = model.stages[2].blocks[1]
    for h, w in [(5, 7), (4, 4)]:
        x = torch.randn(3, h * w + int(with_cls), 48)
        with torch.no_grad():
            expected = official_block(block, x, h, w, method, act)
            assert (fused(x, h, w) - expected).abs().max().item() < 1e-5


def test_optimized_model_api_and_errors():
    model = CvT(config=tiny(hidden_act="quick_gelu")).eval()
    optimized = fuse_for_inference(model)
    assert optimized is not model and isinstance(model.stages[0].blocks[0], torchcvt.model.Block)  # the original is untouched
    assert not any(p.requires_grad for p in optimized.parameters())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert optimized.forward_intermediates(x, intermediates_only=True)[-1].shape == (2, 48, 4, 4)
        assert optimized(x[:1]).shape == (1, 5)
    with pytest.raises(RuntimeError, match="inference-only"):
        optimized.train()
    with pytest.raises(TypeError, match="torchcvt CvT"):
        fuse_for_inference(torch.nn.Linear(2, 2))


def test_onednn_linear_gradients_match_f_linear():
    """The oneDNN autograd path gives F.linear's output and gradients (reference: PyTorch's autograd)."""
    torch.manual_seed(3)
    layer = OneDNNLinear(24, 40)
    x = torch.randn(2, 7, 24, requires_grad=True)
    upstream = torch.randn(2, 7, 40)
    assert use_onednn(x) == torch.backends.mkldnn.is_available()
    out = layer(x)
    assert "OneDNN" in type(out.grad_fn.next_functions[0][0]).__name__  # view <- our Function
    gx, gw, gb = torch.autograd.grad(out, (x, layer.weight, layer.bias), upstream)
    ref = F.linear(x, layer.weight, layer.bias)
    rx, rw, rb = torch.autograd.grad(ref, (x, layer.weight, layer.bias), upstream)
    assert (out - ref).abs().max() < 1e-5
    for ours, theirs in ((gx, rx), (gw, rw), (gb, rb)):
        assert (ours - theirs).abs().max() < 1e-5


def test_fused_mlp_gradients_match_plain_mlp():
    """The fused MLP (activation recomputed in backward) gives the plain Mlp's output and gradients."""
    torch.manual_seed(5)
    mlp = Mlp(24, 96, "quick_gelu", drop=0.0)
    x = torch.randn(2, 7, 24, requires_grad=True)
    upstream = torch.randn(2, 7, 24)
    params = (x, mlp.fc1.weight, mlp.fc1.bias, mlp.fc2.weight, mlp.fc2.bias)
    ref = mlp(x)
    expected = torch.autograd.grad(ref, params, upstream)
    out = apply_fast_path(mlp)(x)
    if torch.backends.mkldnn.is_available():
        assert "OneDNNMlp" in type(out.grad_fn.next_functions[0][0]).__name__  # view <- the fused Function
    assert (out - ref).abs().max() < 1e-5
    for ours, theirs in zip(torch.autograd.grad(out, params, upstream), expected):
        assert (ours - theirs).abs().max() < 1e-5


def test_training_step_gradients_match_plain_model(monkeypatch):
    """A whole CvT's gradients with the fast path on (and on, with the op reported missing) equal
    those of the plain model (nn.Linear and Mlp: PyTorch's own autograd)."""
    torch.manual_seed(4)
    model = CvT(config=tiny(drop_path_rate=(0.0, 0.0, 0.0))).train()
    randomize_norms(model)
    x, y = torch.randn(3, 3, 40, 48), torch.tensor([0, 3, 4])

    def gradients():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = gradients()
    apply_fast_path(model)
    fast = gradients()
    monkeypatch.setattr(fastpath, "onednn_available", lambda: False)  # a torch without the op: F.linear fallback
    fallback = gradients()
    for grads in (fast, fallback):
        assert grads.keys() == reference.keys()
        for name, grad in reference.items():
            assert (grads[name] - grad).abs().max() < 1e-5 * max(1.0, grad.abs().max().item()), name


def test_fallback_without_the_op_gives_the_same_numbers(monkeypatch):
    """With the probe reporting the op missing, a fast model runs plain ATen ops, same logits."""
    torch.manual_seed(6)
    model = apply_fast_path(CvT(config=tiny(hidden_act="gelu")).eval())
    randomize_norms(model)
    optimized = fuse_for_inference(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fast, fast_optimized = model(x), optimized(x)
    monkeypatch.setattr(fastpath, "onednn_available", lambda: False)
    monkeypatch.setattr(fastpath, "_linear_pointwise", None)  # would raise if anything still called the op
    monkeypatch.setattr(fastpath, "_linear_add", None)
    with torch.no_grad():
        assert (model(x) - fast).abs().max() < 1e-5
        assert (optimized(x) - fast_optimized).abs().max() < 1e-5
        assert (remove_fast_path(model)(x) - fast).abs().max() < 1e-5


def test_probe_says_no_when_the_op_fails(monkeypatch):
    def missing(*args, **kwargs):
        raise RuntimeError("No such operator mkldnn::_linear_pointwise")

    probe = onednn_available.__wrapped__  # the uncached probe
    monkeypatch.setattr(fastpath, "_linear_add", missing)
    assert probe() is False
    monkeypatch.setattr(fastpath, "_linear_add", lambda x, w, b, r: F.linear(x, w, b) - r)  # runs, wrong numbers
    assert probe() is False


def test_flop_counter_sees_plain_linears():
    """Under a dispatch mode (FLOP counting, fake tensors) the linear is plain aten: 2*N*in*out FLOPs."""
    layer = OneDNNLinear(24, 40).eval()
    x = torch.randn(6, 24)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        layer(x)
    assert counter.get_total_flops() == 2 * 6 * 24 * 40


# ---- the benchmark's measuring code (cvt bench)
def test_time_alternating_rotates_and_median_ratio_by_hand():
    from torchcvt.bench import median_ratio, time_alternating

    calls = []
    times = time_alternating({"a": lambda: calls.append("a"), "b": lambda: calls.append("b"), "c": lambda: calls.append("c")},
                             repeats=2, warmup=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # warm-up round, then rotated rounds
    assert all(len(v) == 2 for v in times.values())
    # per-round ratios 2, 3, 10 -> median 3 (the mean of the times would say 2.9 / 0.7 = 4.1)
    assert median_ratio([2.0, 0.6, 0.1], [1.0, 0.2, 0.01]) == pytest.approx(3.0)


def test_run_benchmark_small_layout(monkeypatch):
    from torchcvt import bench
    from torchcvt.bench import run_benchmark

    timed = []  # the candidates of every alternating timing

    def time_alternating(candidates, **kwargs):
        timed.append(set(candidates))
        return real_time_alternating(candidates, **kwargs)

    real_time_alternating = bench.time_alternating
    monkeypatch.setattr(bench, "time_alternating", time_alternating)
    config = CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=7, image_size=64)
    threads = torch.get_num_threads()
    try:  # one thread: tiny ops on two threads of a busy machine wait on each other
        # Without the ONNX Runtime rows (backends=False): bfloat16 runs on the eager backend, so it is timed all the same.
        report = run_benchmark(config, batches=(1, 2), train_batch=2, repeats=1, memory=False, matmul_size=256, threads=1,
                               precisions=("bfloat16", "int8"))
    finally:
        torch.set_num_threads(threads)
    assert report.threads == 1
    assert all(v < 1e-4 for k, v in report.diffs.items() if k != "eager bfloat16")  # checked against transformers before timing
    assert report.diffs["eager bfloat16"] < 0.1
    assert [(r.case, r.batch, r.model) for r in report.rows] == [
        ("inference", b, m) for b in (1, 2) for m in ("transformers", "torchcvt plain", "torchcvt", "torchcvt optimized", "eager bfloat16")
    ] + [("train step", 2, m) for m in ("transformers", "torchcvt plain", "torchcvt")]
    flops = 2 * torchcvt.summary(CvT(config=config), 64).macs * 2 / 1e9
    assert report.rows[5].gflop == pytest.approx(flops)  # batch 2 inference: 2 x MACs x batch
    assert report.rows[-1].gflop == pytest.approx(3 * flops)  # a training step: 3x the forward
    # The GEMMs ran only beside the models (no timing of their own), once per round: 2 + 1 inference rounds, 3 training.
    assert len(timed) == 3 and all({"GEMM torch.mm", "torchcvt"} <= names for names in timed)
    assert {k: len(v) for k, v in report.gemm_times.items()} == {k: 6 for k in bench.gemm_candidates(8)}
    table = report.table()
    assert "torch.mm" in table and "| train step" in table and "threads: 1" in table
    assert "int8: not timed (it runs on onnxruntime: --no-onnxruntime)" in table


def test_gemm_engine_is_measured_once_per_machine_and_can_be_forced(monkeypatch, tmp_path):
    """Without $TORCHCVT_GEMM the faster engine of a stored measurement is used; it is measured once, then read."""
    monkeypatch.delenv("TORCHCVT_GEMM")
    monkeypatch.setenv("TORCHCVT_CACHE", str(tmp_path))
    fastpath._measured_gemm_engine.cache_clear()
    monkeypatch.setattr(fastpath, "onednn_available", lambda: True)
    monkeypatch.setattr(fastpath.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine: the timing is stored
    measured = fastpath.time_gemm_engines(rounds=1)  # the real timing, once: both engines, seconds > 0
    assert set(measured) == {"mkl", "onednn"} and min(measured.values()) > 0
    calls = []
    for fake, expected in (({"mkl": 0.2, "onednn": 0.1}, "onednn"), ({"mkl": 0.1, "onednn": 0.2}, "mkl")):
        (tmp_path / "measurements.json").unlink(missing_ok=True)
        fastpath._measured_gemm_engine.cache_clear()
        monkeypatch.setattr(fastpath, "time_gemm_engines", lambda fake=fake: calls.append(fake) or fake)
        assert fastpath.gemm_engine() == expected
        fastpath._measured_gemm_engine.cache_clear()
        assert fastpath.gemm_engine() == expected  # from the record: not timed again
        assert len(calls) == 1 and "gemm_seconds" in (tmp_path / "measurements.json").read_text()
        calls.clear()
    # Timed on a busy machine: used by this process, not stored, so the next process times again.
    monkeypatch.setattr(fastpath.os, "getloadavg", lambda: (9.0, 9.0, 9.0))
    monkeypatch.setattr(fastpath.os, "cpu_count", lambda: 2)
    (tmp_path / "measurements.json").unlink()
    fastpath._measured_gemm_engine.cache_clear()
    assert fastpath.gemm_engine() == "mkl" and len(calls) == 1 and not (tmp_path / "measurements.json").exists()
    fastpath._measured_gemm_engine.cache_clear()
    assert fastpath.gemm_engine() == "mkl" and len(calls) == 2
    monkeypatch.setenv("TORCHCVT_GEMM", "onednn")
    assert fastpath.gemm_engine() == "onednn"
    monkeypatch.setenv("TORCHCVT_GEMM", "blas")
    with pytest.raises(torchcvt.ConfigError, match="TORCHCVT_GEMM='blas': expected one of onednn, mkl"):
        fastpath.gemm_engine()
    fastpath._measured_gemm_engine.cache_clear()


def test_mkl_engine_gives_the_same_numbers(monkeypatch):
    """With MKL chosen the fast and fused models run F.linear (activations and adds in place) and match the plain model."""
    torch.manual_seed(7)
    model = CvT(config=tiny(hidden_act="quick_gelu")).eval()
    randomize_norms(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(x)
    monkeypatch.setenv("TORCHCVT_GEMM", "mkl")
    monkeypatch.setattr(fastpath, "_linear_pointwise", None)  # would raise if anything still called oneDNN
    monkeypatch.setattr(fastpath, "_linear_add", None)
    assert not use_onednn(x)
    fast, fused = apply_fast_path(copy.deepcopy(model)), fuse_for_inference(model)
    with torch.no_grad():
        assert (fast(x) - reference).abs().max() < 1e-5
        assert (fused(x) - reference).abs().max() < 1e-4
    with torch.inference_mode():
        assert (fused(x) - reference).abs().max() < 1e-4


def test_a_bad_gemm_override_stops_a_command_before_it_writes(monkeypatch, tmp_path, capsys):
    """`TORCHCVT_GEMM=blas cvt train` is one line naming the variable, and no run folder is made."""
    from torchcvt.cli import main

    monkeypatch.setenv("TORCHCVT_GEMM", "blas")
    assert main(["train", "--epochs", "1", "--output", str(tmp_path / "run")]) == 1
    assert capsys.readouterr().err.strip() == "error: TORCHCVT_GEMM='blas': expected one of onednn, mkl"
    assert not (tmp_path / "run").exists()
