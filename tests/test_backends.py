"""Inference backends: ONNX Runtime against eager PyTorch and transformers on the same weights, the export
cache, threads, the "auto" choice and its per-machine record, reduced precision offered or refused by CPU."""

from __future__ import annotations

import statistics
import sys

import pytest
import torch

import torchcvt
from torchcvt import backends, machine
from torchcvt.backends import (AutocastModel, OnnxRuntimeModel, available_backends, optimize_for_inference, resolve_backend,
                               weights_hash)
from torchcvt.errors import ConfigError
from torchcvt.machine import cpu_info, read_record, update_record

pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One export cache for the module: tests on the same weights reuse one export (seconds each)."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHCVT_CACHE", str(root))
        mp.setattr(machine.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # a quiet machine: measurements are stored
        yield root / "onnx"


def _model(image_size: int, seed: int = 0) -> torchcvt.CvT:
    torch.manual_seed(seed)
    config = torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=7,
                                image_size=image_size)
    model = torchcvt.create_model(config).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the identity, so a skipped norm shows
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_available_backends_and_resolution():
    assert available_backends() == ["eager", "onnxruntime"]
    assert resolve_backend("eager")[0] == "eager" and resolve_backend("onnxruntime")[0] == "onnxruntime"
    assert resolve_backend("auto")[0] in available_backends() + ["auto"]  # "auto": a measurement decides
    assert resolve_backend("auto", "cuda") == ("eager", "ONNX Runtime runs on the CPU only, the model is on cuda")
    assert resolve_backend("auto", "cpu", torch.bfloat16)[0] == "eager"
    with pytest.raises(ConfigError, match="backend must be one of auto, eager, onnxruntime"):
        resolve_backend("tensorrt")
    with pytest.raises(ConfigError, match="runs on the CPU"):
        resolve_backend("onnxruntime", "cuda")


@pytest.mark.parametrize("image_size", [64, 32], ids=["dynamic-size", "fixed-size"])
def test_onnxruntime_matches_eager(cache, image_size):
    model = _model(image_size)
    runner = optimize_for_inference(model, "onnxruntime", threads=1)
    assert isinstance(runner, OnnxRuntimeModel)
    g = torch.Generator().manual_seed(1)
    for batch, height, width in [(1, image_size, image_size), (3, image_size, image_size), (2, image_size + 16, image_size + 8)]:
        x = torch.randn(batch, 3, height, width, generator=g)
        with torch.no_grad():
            expected = model(x)
        got = runner(x)
        assert got.shape == expected.shape
        assert (got - expected).abs().max() < 1e-4
        assert torch.equal(got.topk(3).indices, expected.topk(3).indices)
    files = sorted(p.name for p in cache.glob(f"{runner._key}*.onnx"))
    # One dynamic file; or one file per input size where the layout cannot take free sizes at this resolution.
    assert len(files) == (1 if image_size >= backends.min_dynamic_side(model.config) else 2)


def test_export_is_cached_per_weights(cache, monkeypatch):
    model = _model(64)
    first = optimize_for_inference(model, "onnxruntime", threads=1)
    assert first.path.is_file() and first.path.parent == cache

    def no_export(*args, **kwargs):
        raise AssertionError("exported again although the file for these weights is cached")

    monkeypatch.setattr(backends, "export_onnx", no_export)
    again = optimize_for_inference(_model(64), "onnxruntime", threads=1)  # same seed: the same weights
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max() < 1e-4
    with pytest.raises(AssertionError, match="exported again"):
        optimize_for_inference(_model(64, seed=1), "onnxruntime", threads=1)  # other weights: another file


def test_weights_hash_sees_every_tensor():
    model = _model(32)
    before = weights_hash(model)
    with torch.no_grad():
        model.stages[1].blocks[0].attn.conv_proj_k.bn.running_var[0] += 1e-3  # a buffer, not a parameter
    assert weights_hash(model) != before


def test_session_threads_and_no_spinning(cache):
    runner = optimize_for_inference(_model(64), "onnxruntime", threads=2)
    options = next(iter(runner._sessions.values())).get_session_options()
    assert options.intra_op_num_threads == 2 and options.inter_op_num_threads == 1
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"


def test_classifier_backends_agree(cache, tmp_path):
    model = _model(64)
    directory = torchcvt.save_pretrained(model, tmp_path / "ckpt")
    eager = torchcvt.Classifier(str(directory), device="cpu")
    onnx = torchcvt.Classifier(str(directory), device="cpu", backend="onnxruntime")
    assert onnx.backend == "onnxruntime" and "backend=onnxruntime" in repr(onnx)
    images = [torch.rand(3, 80, 70, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    for ours, theirs in zip(eager(images, top_k=3), onnx(images, top_k=3)):
        assert [label for label, _ in ours] == [label for label, _ in theirs]
        assert max(abs(a - b) for (_, a), (_, b) in zip(ours, theirs)) < 1e-5
    with pytest.raises(ConfigError, match="float32 only"):
        torchcvt.Classifier(str(directory), device="cpu", dtype="bfloat16", backend="onnxruntime")


# ---- parity with transformers through every backend
@pytest.mark.parametrize("backend", ["eager", "onnxruntime", "auto"])
def test_backends_match_transformers(cache, reference, backend):
    theirs, directory = reference("tiny")
    runner = optimize_for_inference(torchcvt.load_model(directory).eval(), backend)
    g = torch.Generator().manual_seed(2)
    for batch, size in [(1, 224), (4, 224), (2, 160)]:
        x = torch.randn(batch, 3, size, size, generator=g)
        with torch.no_grad():
            expected = theirs(x).logits
            got = runner(x)
        assert (got - expected).abs().max() < 1e-4
        assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.slow
def test_onnxruntime_matches_transformers_cvt13(cache, reference):
    theirs, directory = reference("cvt-13")
    runner = optimize_for_inference(torchcvt.load_model(directory).eval(), "onnxruntime")
    x = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(x).logits
    got = runner(x)
    assert (got - expected).abs().max() < 1e-4
    assert torch.equal(got.topk(5).indices, expected.topk(5).indices)


# ---- the CPU and the per-machine record
ZEN3 = "model name\t: AMD EPYC 7R13 Processor\nflags\t\t: fpu sse sse2 avx fma avx2 bmi2 sha_ni vaes\n"
SAPPHIRE_RAPIDS = ("model name\t: Intel(R) Xeon(R) Platinum 8488C\nflags\t\t: avx2 avx512f avx512_vnni avx_vnni "
                   "avx512_bf16 amx_bf16 amx_tile amx_int8 avx512_fp16\n")


def test_cpu_info_reads_the_flags_that_matter():
    zen3, spr = cpu_info(ZEN3), cpu_info(SAPPHIRE_RAPIDS)
    assert zen3.name == "AMD EPYC 7R13 Processor" and zen3.flags == {"avx2"}
    assert spr.flags == set(machine.KNOWN_FLAGS)  # avx512_fp16 is not one of them
    assert not zen3.has_any(machine.INT8_FLAGS) and not zen3.has_any(machine.BF16_FLAGS)
    assert spr.has_any(machine.INT8_FLAGS) and spr.has_any(machine.BF16_FLAGS)
    assert zen3.flag_summary() == "avx2; no avx512f, avx512_vnni, avx_vnni, avx512_bf16, amx_tile, amx_bf16, amx_int8"
    # This machine: what /proc/cpuinfo says, restricted to the flags that matter.
    real = cpu_info()
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return
    line = next(l for l in text.splitlines() if l.startswith(("flags", "Features")))
    assert real.flags == set(line.split(":", 1)[1].split()) & set(machine.KNOWN_FLAGS)


def _ratios(**by_name):
    """A stand-in for measure_speedups: fixed speed-ups, and a list of what it was asked to time."""
    asked = []

    def measure(candidates, reference, image_size, batches=(1, 8)):
        asked.append(sorted(candidates))
        measure.threads.append(torch.get_num_threads())
        return {name: by_name[name] for name in candidates if name != reference}

    measure.threads = []  # torch's thread count during each timing
    return measure, asked


def test_auto_times_eager_at_the_thread_count_of_onnxruntime(cache, monkeypatch):
    model = _model(64)
    measure, asked = _ratios(onnxruntime={"1": 0.9, "8": 0.8})
    monkeypatch.setattr(backends, "measure_speedups", measure)
    before = torch.get_num_threads()
    runner = optimize_for_inference(model, threads=before + 2)
    assert isinstance(runner, torchcvt.CvT) and asked == [["eager", "onnxruntime"]]
    assert measure.threads == [before + 2] and torch.get_num_threads() == before  # set for the timing, then restored


def test_record_key_names_every_layout_field_and_the_gemm_engine(monkeypatch):
    def key(eager=True, onnxruntime=True, **changes):
        return backends.measurement_key(torchcvt.CvTConfig(**changes), 1, eager=eager, onnxruntime=onnxruntime)[0]

    base, ort_only = key(), key(eager=False)
    # Fields that change what is computed at inference change the key...
    for changes in (dict(patch_padding=(3, 1, 1)), dict(padding_q=(0, 1, 1)), dict(padding_kv=(1, 0, 1)),
                    dict(qkv_bias=(True, False, True)), dict(global_pool="avg"), dict(hidden_act="gelu"), dict(image_size=384)):
        assert key(**changes) != base, changes
    # ...dropout, drop path (off in eval), the LayerNorm epsilon and label names do not.
    assert key(drop_path_rate=(0.0, 0.0, 0.3), attention_drop_rate=(0.1, 0.1, 0.1), layer_norm_eps=1e-6,
               id2label={i: str(i) for i in range(1000)}) == base
    # The GEMM the eager path's linears run on is part of eager records only.
    monkeypatch.setenv("TORCHCVT_GEMM", "mkl")
    assert key() != base and key(eager=False) == ort_only
    description = backends.measurement_key(torchcvt.CvTConfig(), 1, eager=True, onnxruntime=False)[1]
    assert description["layout"]["gemm"] == "mkl" and description["layout"]["revision"] == backends.RECORD_REVISION
    assert "onnxruntime" not in description


def test_record_key_imports_onnxruntime_only_when_it_is_timed(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # any import of it now raises ImportError
    monkeypatch.setattr(machine, "onnxruntime_version", lambda: pytest.fail("onnxruntime looked up for a key without it"))
    key, description = machine.record_key({"linears": "cvt-13 at batch 4"}, 1)  # the GEMM choice's key
    assert "onnxruntime" not in description and description["threads"] == 1
    monkeypatch.setattr(machine, "onnxruntime_version", lambda: "1.0")
    other, description = machine.record_key({"linears": "cvt-13 at batch 4"}, 1, onnxruntime=True)
    assert description["onnxruntime"] == "1.0" and other != key


def test_cpu_info_is_read_once_per_process(monkeypatch):
    first = cpu_info()
    monkeypatch.setattr(machine.Path, "read_text", lambda self: pytest.fail(f"{self} read again"))
    assert cpu_info() is first
    assert cpu_info(ZEN3).name == "AMD EPYC 7R13 Processor"  # text passed in is still parsed


def test_auto_measures_once_then_reads_the_record(cache, monkeypatch):
    model = _model(64)  # the weights test_onnxruntime_matches_eager exported: no new export
    key, _ = backends.measurement_key(model.config, 1, eager=True, onnxruntime=True)
    measure, asked = _ratios(onnxruntime={"1": 1.5, "8": 1.1})
    monkeypatch.setattr(backends, "measure_speedups", measure)
    runner = optimize_for_inference(model, threads=1)
    assert isinstance(runner, OnnxRuntimeModel) and asked == [["eager", "onnxruntime"]]
    record = read_record(key)
    assert record["onnxruntime"] == {"1": 1.5, "8": 1.1} and record["cpu"] == cpu_info().name and record["threads"] == 1
    assert record["load_average"] and record["measured"]
    # The record decides from now on: eager once it says eager is faster (geometric mean of batch 1 and 8).
    update_record(key, record, {"onnxruntime": {"1": 1.2, "8": 0.8}})
    runner = optimize_for_inference(model, threads=1)
    assert isinstance(runner, torchcvt.CvT) and len(asked) == 1
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (runner(x) - model(x)).abs().max() < 1e-4


def test_auto_measurement_times_both_backends(cache):
    model = _model(64)
    runner = optimize_for_inference(model, threads=2)  # another record than the test above
    record = read_record(backends.measurement_key(model.config, 2, eager=True, onnxruntime=True)[0])
    assert set(record["onnxruntime"]) == {"1", "8"} and all(r > 0 for r in record["onnxruntime"].values())
    expected = OnnxRuntimeModel if statistics.geometric_mean(record["onnxruntime"].values()) > 1 else torchcvt.CvT
    assert isinstance(runner, expected)


# ---- reduced precision: offered by CPU flags plus a measurement, refused in one line elsewhere
@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_reduced_precision_refused_without_the_instructions(monkeypatch, precision):
    monkeypatch.setattr(backends, "cpu_info", lambda: cpu_info(ZEN3))
    monkeypatch.setattr(backends, "OnnxRuntimeModel", None)  # refused before any export
    with pytest.raises(ConfigError) as error:
        optimize_for_inference(_model(64), precision=precision)
    needs = "avx512_vnni/avx_vnni/amx_int8" if precision == "int8" else "avx512_bf16/amx_bf16"
    message = str(error.value)
    assert message.startswith(f"{precision} is slower than float32 on this CPU (AMD EPYC 7R13 Processor, no {needs}): ")
    assert message.endswith("; use --precision float32") and "\n" not in message
    assert backends.MEASURED_WITHOUT_FLAGS[precision] in message


def test_reduced_precision_offered_where_it_measures_faster(cache, monkeypatch):
    monkeypatch.setattr(backends, "cpu_info", lambda: cpu_info(SAPPHIRE_RAPIDS))
    model = _model(64)
    measure, asked = _ratios(int8={"1": 1.6, "8": 1.3}, bfloat16={"1": 0.9, "8": 1.4})
    monkeypatch.setattr(backends, "measure_speedups", measure)
    int8 = optimize_for_inference(model, precision="int8", threads=1)
    assert isinstance(int8, OnnxRuntimeModel) and int8.precision == "int8" and int8.path.name.endswith("-int8.onnx")
    x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        fp32 = model(x)
    assert (int8(x) - fp32).abs().max() < 0.1 * fp32.abs().max()  # int8 weights: close, not equal
    with pytest.raises(ConfigError, match=r"^bfloat16 is slower than float32 on this CPU .*: 0.90x at batch 1, 1.40x at batch 8"):
        optimize_for_inference(model, precision="bfloat16", threads=1)
    assert asked == [["float32", "int8"], ["bfloat16", "float32"]]
    optimize_for_inference(model, precision="int8", threads=1)  # read from the record: not timed again
    assert len(asked) == 2

    def build(*args, **kwargs):
        raise AssertionError("a runner built for a precision the record refuses")

    monkeypatch.setattr(backends, "OnnxRuntimeModel", build)
    monkeypatch.setattr(backends, "fuse_for_inference", build)
    with pytest.raises(ConfigError, match=r"^bfloat16 is slower than float32 on this CPU .*: 0.90x at batch 1, 1.40x at batch 8 measured 2"):
        optimize_for_inference(model, precision="bfloat16", threads=1)  # the stored verdict, read before anything is built
    assert len(asked) == 2
    with pytest.raises(ConfigError, match="int8 runs on the onnxruntime backend"):
        optimize_for_inference(model, "eager", precision="int8")


def test_bfloat16_autocast_runner_is_close_to_float32():
    model = _model(64)
    runner = AutocastModel(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fp32 = model(x)
    out = runner(x)
    assert out.dtype == torch.float32 and (out - fp32).abs().max() < 0.05 * fp32.abs().max()


def test_cli_refuses_reduced_precision_in_one_line(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from torchcvt.cli import main

    monkeypatch.setattr(backends, "cpu_info", lambda: cpu_info(ZEN3))
    monkeypatch.setattr(backends, "OnnxRuntimeModel", None)  # refused before any export
    directory = torchcvt.save_pretrained(_model(64), tmp_path / "ckpt")
    Image.new("RGB", (64, 64), (120, 30, 200)).save(tmp_path / "a.png")
    assert main(["predict", str(tmp_path / "a.png"), "--weights", str(directory), "--device", "cpu", "--precision", "int8"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: int8 is slower than float32 on this CPU (AMD EPYC 7R13 Processor, no avx512_vnni/avx_vnni/amx_int8): "
                   f"{backends.MEASURED_WITHOUT_FLAGS['int8']}; use --precision float32"]


def test_evaluate_takes_any_runner(cache, tmp_path):
    from torch.utils.data import DataLoader, TensorDataset

    from torchcvt.evaluate import evaluate

    model = _model(64)
    g = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.randn(10, 3, 64, 64, generator=g), torch.randint(0, 7, (10,), generator=g))
    loader = DataLoader(data, batch_size=4)
    ours = evaluate(model, loader)
    theirs = evaluate(optimize_for_inference(model, "onnxruntime", threads=1), loader, num_classes=7)
    assert torch.equal(ours.confusion, theirs.confusion) and theirs.loss == pytest.approx(ours.loss, abs=1e-5)
    with pytest.raises(ConfigError, match="num_classes"):
        evaluate(lambda x: model(x), loader)


def test_bench_has_onnxruntime_rows_and_the_cpu(cache):
    from torchcvt.bench import run_benchmark

    config = torchcvt.CvTConfig(embed_dim=(16, 32, 48), num_heads=(1, 2, 3), depth=(1, 2, 3), num_classes=7, image_size=64)
    threads = torch.get_num_threads()
    try:
        report = run_benchmark(config, batches=(1,), train_batch=0, repeats=1, memory=False, matmul_size=128, threads=1,
                               backends=True, precisions=("int8",))
    finally:
        torch.set_num_threads(threads)
    models = [r.model for r in report.rows]
    assert models == ["transformers", "torchcvt plain", "torchcvt", "torchcvt optimized", "onnxruntime", "default (auto)",
                      "onnxruntime int8"]
    assert report.diffs["onnxruntime"] < 1e-4 and report.diffs["default (auto)"] < 1e-4
    assert report.attainable == max(report.matmul.values())
    onnx = next(r for r in report.rows if r.model == "onnxruntime")
    assert onnx.vs_onnxruntime == 1.0  # the reference of its own column
    table = report.table()
    assert f"CPU: {cpu_info().describe()}" in table and "attainable (the faster)" in table
    assert "default optimize_for_inference(model): backend auto -> " in table


def test_a_measurement_is_not_stored_under_load_or_in_a_read_only_cache(tmp_path, monkeypatch, caplog):
    """update_record stores a record only when it can trust and write it; it never raises for either."""
    monkeypatch.setenv("TORCHCVT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(machine.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    assert update_record("k", {"what": "test"}, {"x": 1}) is False and not machine.measurements_path().exists()
    assert "measured at load 7.5 on 2 cores: not stored" in caplog.text
    monkeypatch.setattr(machine.os, "getloadavg", lambda: (0.5, 0.5, 0.5))
    assert update_record("k", {"what": "test"}, {"x": 1}) is True and read_record("k")["x"] == 1
    (tmp_path / "a-file").write_text("not a folder")  # a cache that cannot be written, even by root
    monkeypatch.setenv("TORCHCVT_CACHE", str(tmp_path / "a-file" / "cache"))
    assert update_record("k", {"what": "test"}, {"x": 2}) is False and "could not store the measurement" in caplog.text
