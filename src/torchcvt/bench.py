"""``cvt bench``: torchcvt against transformers' CvT, same weights, same process, timed alternately.

Method (also in docs/performance.md):

* One set of random weights: a torchcvt CvT with ``hidden_act="gelu"`` (what transformers computes)
  and random BatchNorm statistics is written with ``save_pretrained`` and read back by
  ``CvtForImageClassification.from_pretrained``; the logits must agree within 1e-4 before any timing.
* Timing: in each round every candidate runs once, in an order that rotates from round to round,
  after warm-up rounds. We report the median time of each and the median of the per-round
  ratios (transformers' time / ours): on a shared machine neighbouring runs see the same load,
  so the ratio is far steadier than either time.
* Throughput: GFLOP/s = 2 x MACs (``torchcvt.summary``: matrix products, convolutions, attention)
  x batch / time; a training step counts 3x the forward FLOPs. "% attain" relates it to the
  attainable fp32 GEMM rate: the faster of ``torch.mm`` (MKL, what ``nn.Linear`` uses by default)
  and oneDNN (what torchcvt's linears use with the fast path) on 2048^3 products, both timed in the
  same alternating rounds as the models (median over rounds of the per-round fraction). The header's
  matmul rates are the medians of those same GEMM runs: there is no separate GEMM run.
* Backends (``cvt bench``; ``run_benchmark(backends=True)``): ONNX Runtime on the exported file
  (float32; int8 where the CPU's flags offer it, or as ``--precisions`` asks), and the default
  ``optimize_for_inference(model)`` (backend ``"auto"``); "vs onnxruntime" is the median of per-round
  ratios against ONNX Runtime float32. The header names the CPU and its flags.
* Reduced precision: bfloat16 (the eager backend under CPU autocast) is timed with or without the
  backends; int8 runs on ONNX Runtime, so only with them.
* Models: "torchcvt" is the model ``create_model`` returns (the fast path applied, fastpath.py, its
  linears on the GEMM ``fastpath.gemm_engine()`` measured faster here; the header says which),
  "torchcvt plain" the reference model without it (``CvT(...)``: ``nn.Linear`` on MKL), so the
  fast path's own gain shows; "torchcvt optimized" is ``optimize_for_inference``.
* Peak memory: each (model, case) runs in a fresh subprocess with glibc's dynamic mmap threshold
  off (``MALLOC_MMAP_THRESHOLD_``), so freed tensors go back to the OS and the resident set follows
  the live tensors; after one warm-up call the kernel's high-water mark is reset
  (``/proc/self/clear_refs``), the case runs once more, and we report the high-water mark minus the
  resident set before that run: the memory the call itself needs (activations, gradients, workspace).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from .config import CvTConfig
from .errors import ConfigError, TorchCvTError
from . import mkl_amd
from .allocator import retain_freed_memory
from .fastpath import apply_fast_path, gemm_engine, onednn_available, onednn_linear, remove_fast_path
from .fused import fuse_for_inference
from .backends import NEEDS, PRECISIONS, AutocastModel, OnnxRuntimeModel, available_backends, describe_backend, optimize_for_inference
from .machine import cpu_info, load_average, median_ratio, onnxruntime_version, time_alternating
from .model import CvT

TOLERANCE = 1e-4


# ------------------------------------------------------------------------------------ timing
def gemm_candidates(n: int = 2048) -> dict[str, Callable[[], object]]:
    """fp32 ``n``^3 matrix products on ``torch.mm`` (MKL on x86) and oneDNN, to time beside the models."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    candidates: dict[str, Callable[[], object]] = {"torch.mm": lambda: torch.mm(a, b)}
    if onednn_available():
        candidates["oneDNN"] = lambda: onednn_linear(a, b)  # a @ b^T: the same FLOPs
    return candidates


def gemm_rates(times: dict[str, list[float]], n: int) -> dict[str, float]:
    """GFLOP/s of each ``n``^3 product from its seconds per call (the median over its runs)."""
    return {k: 2 * n**3 / statistics.median(v) / 1e9 for k, v in times.items()}


def matmul_rates(n: int = 2048, repeats: int = 5) -> dict[str, float]:
    """fp32 GEMM rate in GFLOP/s of ``torch.mm`` (MKL on x86) and of oneDNN, timed alternately on their own."""
    with torch.inference_mode():
        return gemm_rates(time_alternating(gemm_candidates(n), repeats=repeats, warmup=1), n)


def attainable_fraction(times: list[float], gflop: float, gemm_times: dict[str, list[float]], n: int) -> float:
    """Median over rounds of (this call's GFLOP/s) / (the faster GEMM's GFLOP/s in the same round).

    The GEMMs run in the same alternating rounds as the models, so on a shared machine the rate a
    model reaches is compared with what the machine attained at that moment, not minutes earlier.
    """
    gemm_gflop = 2 * n**3 / 1e9
    return statistics.median(
        (gflop / t) / max(gemm_gflop / g[r] for g in gemm_times.values()) for r, t in enumerate(times)
    )


# ----------------------------------------------------------------------------- the two models
def reference_pair(name: str | CvTConfig, directory: str | os.PathLike, seed: int = 0):
    """``(transformers model, plain torchcvt model)`` with the same random weights, both in eval mode.

    The torchcvt model is written to ``directory`` (transformers' layout) and read back by
    transformers. BatchNorm statistics are random so folding them is exercised.
    """
    try:
        from transformers import CvtForImageClassification
        from transformers.utils import logging as hf_logging
    except ImportError:
        raise TorchCvTError("cvt bench compares against transformers: pip install transformers") from None
    from .checkpoint import save_pretrained
    from .pretrained import preset_config

    config = preset_config(name, hidden_act="gelu") if isinstance(name, str) else name.replace(hidden_act="gelu")
    if any(m != "dw_bn" for m in config.qkv_projection_method) or any(config.cls_token[:-1]):
        raise ConfigError(f"{name}: transformers' CvT supports only dw_bn projections with a cls token in the last stage")
    if any(d <= i for i, d in enumerate(config.depth)):
        raise ConfigError(f"{name}: transformers' CvT cannot build a stage i with depth <= i, got depth {list(config.depth)}")
    torch.manual_seed(seed)
    ours = CvT(config=config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in ours.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.5 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    save_pretrained(ours, directory)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    theirs = CvtForImageClassification.from_pretrained(str(directory))
    return theirs.eval(), ours.eval()


def _forward(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits of either kind of model (transformers returns an output object)."""
    return lambda x: getattr(out := model(x), "logits", out)


def make_train_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    """One training step: forward, cross-entropy, backward, AdamW (PyTorch's default CPU implementation)."""
    model.train()
    forward = _forward(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)

    def step() -> None:
        loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------- peak memory
_MEMORY_CHILD = """
import json, sys, torch
from torchcvt.bench import _memory_child
print(json.dumps(_memory_child(*json.loads(sys.argv[1]))))
"""


def _rss_kib(field_name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1])
    raise OSError(f"/proc/self/status has no {field_name}")


def _memory_child(kind: str, case: str, directory: str, batch: int, image_size: int, threads: int) -> float:
    """Run in a fresh process: MiB the case needs at its peak beyond what is resident before it.

    ``kind``: "transformers", "torchcvt" (fast path), "plain" (without it), "optimized", or
    "checkpointed" (the fast path with ``set_grad_checkpointing()``)."""
    from .pretrained import load_model

    torch.set_num_threads(threads)
    if kind == "transformers":
        from transformers import CvtForImageClassification
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
        model = CvtForImageClassification.from_pretrained(directory).eval()
    else:
        model = load_model(directory).eval()
        model = remove_fast_path(model) if kind == "plain" else apply_fast_path(model)
        if kind == "optimized":
            model = fuse_for_inference(model)
        if kind == "checkpointed":
            model.set_grad_checkpointing()
    x = torch.randn(batch, 3, image_size, image_size)
    if case == "train":
        y = torch.randint(0, model.config.num_labels if kind == "transformers" else model.num_classes, (batch,))
        run = make_train_step(model, x, y)
    else:
        forward = _forward(model)

        def run() -> None:
            with torch.inference_mode():
                forward(x)

    run()  # warm-up: optimizer state, oneDNN primitive caches
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
    before = _rss_kib("VmRSS")
    run()
    return (_rss_kib("VmHWM") - before) / 1024


def peak_memory_mib(kind: str, case: str, directory: str | os.PathLike, batch: int, image_size: int, threads: int) -> float | None:
    """Peak MiB of one call of ``case`` ("train" or "infer") for ``kind``, measured in a fresh process; None off Linux."""
    if not Path("/proc/self/clear_refs").exists():
        return None
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS=str(threads))
    args = json.dumps([kind, case, str(directory), batch, image_size, threads])
    result = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, args], env=env, capture_output=True, text=True)
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise TorchCvTError(f"memory measurement of {kind} {case} failed: {reason}")
    return float(result.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------ the run
def _rounds(repeats: int, batch: int) -> int:
    """Timed rounds for a batch size: ``repeats`` at batch 8, twice that at 1, fewer (>= 3) above 8."""
    if batch <= 1:
        return 2 * repeats
    return max(3, repeats * 8 // batch) if batch > 8 else repeats


@dataclass
class Row:
    case: str
    batch: int
    model: str
    times: list[float]
    gflop: float  # GFLOP per call
    speedup: float | None = None  # transformers' time / this time, median over rounds
    peak_mib: float | None = None
    vs_onnxruntime: float | None = None  # ONNX Runtime's (float32) time / this time, median over rounds
    attainable: float | None = None  # fraction of the attainable GEMM rate, timed in the same rounds

    @property
    def median(self) -> float:
        return statistics.median(self.times)


@dataclass
class Report:
    name: str
    image_size: int
    threads: int
    diffs: dict[str, float]
    rows: list[Row] = field(default_factory=list)
    matmul_size: int = 2048
    gemm_times: dict[str, list[float]] = field(default_factory=dict)  # seconds of each GEMM, every round of the run
    load: list[str] = field(default_factory=lambda: [load_average(), "?"])  # 1/5/15-minute load: other work on the machine
    notes: list[str] = field(default_factory=list)  # the default backend, reduced precision offered or not, their accuracy

    def add_gemm_times(self, times: dict[str, list[float]]) -> dict[str, list[float]]:
        """The GEMM runs of one alternating timing (keys ``"GEMM <name>"``) by name, added to the run's."""
        these = {k: times[f"GEMM {k}"] for k in self.gemm_times}
        for k, t in these.items():
            self.gemm_times[k] += t
        return these

    @property
    def matmul(self) -> dict[str, float]:
        """fp32 GFLOP/s of each GEMM: the median of its runs in the model rounds."""
        return gemm_rates(self.gemm_times, self.matmul_size)

    @property
    def attainable(self) -> float:
        """The attainable fp32 GEMM rate: the faster of MKL (torch.mm) and oneDNN."""
        return max(self.matmul.values())

    def table(self) -> str:
        rates = ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in self.matmul.items())
        lines = [
            f"{self.name} at {self.image_size}x{self.image_size}, threads: {self.threads}, torch {torch.__version__}"
            + (f", onnxruntime {v}" if (v := onnxruntime_version()) else "")
            + f", load average at start/end: {self.load[0]} / {self.load[1]}",
            f"CPU: {cpu_info().describe()}",
            f"fp32 matmul rate ({self.matmul_size}^3, timed in the model rounds): {rates}; attainable (the faster): {self.attainable:.0f} GFLOP/s",
            "max |logits - transformers|: " + ", ".join(f"{k} {v:.1e}" for k, v in self.diffs.items()),
            *self.notes,
        ]
        columns = [("case", 10), ("batch", 5), ("model", 26), ("median ms", 9), ("img/s", 7), ("GFLOP/s", 7),
                   ("% attain", 8), ("vs transformers", 15), ("vs onnxruntime", 14), ("peak MiB", 8)]
        lines += ["", "| " + " | ".join(f"{c:<{w}}" for c, w in columns) + " |",
                  "|" + "|".join("-" * (w + 2) for _, w in columns) + "|"]
        for r in self.rows:
            gflops = r.gflop / r.median
            cells = [
                r.case, str(r.batch), r.model, f"{r.median * 1e3:.1f}", f"{r.batch / r.median:.1f}", f"{gflops:.0f}",
                f"{100 * (r.attainable if r.attainable is not None else gflops / self.attainable):.0f}%", f"{r.speedup:.2f}x" if r.speedup is not None else "1.00x",
                f"{r.vs_onnxruntime:.2f}x" if r.vs_onnxruntime is not None else "-",
                f"{r.peak_mib:.0f}" if r.peak_mib is not None else "-",
            ]
            lines.append("| " + " | ".join(f"{c:<{w}}" if i < 3 else f"{c:>{w}}" for i, (c, (_, w)) in enumerate(zip(cells, columns))) + " |")
        return "\n".join(lines)


_MEMORY_KINDS = {"transformers": "transformers", "torchcvt plain": "plain", "torchcvt": "torchcvt", "torchcvt optimized": "optimized"}
ORT = "onnxruntime"


def _more_candidates(ours: CvT, optimized: CvT, backends: bool, precisions: tuple[str, ...],
                     log: Callable[[str], None]) -> tuple[dict[str, Callable], list[str]]:
    """With ``backends``: ONNX Runtime (fp32) and the default ``optimize_for_inference(model)``; the
    reduced-precision runners in ``precisions`` (int8 only beside ONNX Runtime fp32, bfloat16 always).

    Returns the candidates and notes for the table's header (which backend "auto" chose, which
    reduced precisions this CPU's flags offer, which were not timed).
    """
    cpu = cpu_info()
    candidates: dict[str, Callable] = {}
    notes = []
    if backends:
        if ORT in available_backends():
            log("exporting to ONNX (cached per weights)")
            candidates[ORT] = OnnxRuntimeModel(ours)
        default = optimize_for_inference(ours)  # backend "auto"
        candidates["default (auto)"] = default
        notes.append(f"default optimize_for_inference(model): backend auto -> {describe_backend(default)}")
    for precision in ("int8", "bfloat16"):
        asked = precision in precisions
        if precision == "int8" and asked and ORT not in candidates:
            notes.append("int8: not timed (it runs on onnxruntime: " + ("not installed)" if backends else "--no-onnxruntime)"))
            asked = False
        if not cpu.has_any(NEEDS[precision]):
            notes.append(f"{precision}: not offered on this CPU (no {'/'.join(NEEDS[precision])})"
                         + ("; measured anyway below" if asked else ""))
        if asked and precision == "int8":
            candidates[f"{ORT} int8"] = OnnxRuntimeModel(ours, precision="int8")
        elif asked:
            candidates["eager bfloat16"] = AutocastModel(optimized, torch.bfloat16)
    return candidates, notes


def run_benchmark(
    name: str | CvTConfig = "cvt-13",
    *,
    batches: tuple[int, ...] = (1, 8, 32),
    train_batch: int | None = 16,
    repeats: int = 10,
    threads: int | None = None,
    memory: bool = True,
    matmul_size: int = 2048,
    backends: bool = False,
    precisions: tuple[str, ...] | None = None,
    log: Callable[[str], None] = lambda s: None,
) -> Report:
    """Time transformers, torchcvt (eval, plain and with the fast path), ``optimize_for_inference`` and ONNX Runtime on the same weights.

    ``name``: a preset or a CvTConfig that transformers can build. The memory subprocesses read the
    weights from a temporary directory, so they work for any layout. ``backends``: also ONNX Runtime
    and the default (``"auto"``) backend (``cvt bench`` turns it on; it exports the model once).
    ``precisions``: the reduced precisions to time (``"int8"``, which needs ``backends``, and
    ``"bfloat16"``); default those this CPU's flags offer. The GEMMs behind "% attain" and the
    header's matmul rates run in every timed round, beside the models.
    """
    from .pretrained import describe
    from .summary import summary

    if threads is not None:
        torch.set_num_threads(threads)
    threads = torch.get_num_threads()
    retained = retain_freed_memory()  # for every candidate alike, as optimize_for_inference does
    if precisions is None:
        precisions = tuple(p for p in ("int8", "bfloat16") if cpu_info().has_any(NEEDS[p]))
    with tempfile.TemporaryDirectory(prefix="cvt-bench-") as directory:
        theirs, plain = reference_pair(name, directory)
        ours = apply_fast_path(copy.deepcopy(plain))
        size = ours.config.image_size
        optimized = fuse_for_inference(ours)
        models: dict[str, Callable] = {
            "transformers": _forward(theirs), "torchcvt plain": plain, "torchcvt": ours, "torchcvt optimized": optimized,
        }
        notes = [f"freed memory retained in the process (glibc mallopt, every candidate): {'yes' if retained else 'no'}",
                 f"GEMMs on MKL (every candidate that calls torch's matmul, transformers too): {mkl_amd.status()}",
                 f"fast path linears ('torchcvt', 'torchcvt optimized'): {gemm_engine()} "
                 f"({'$TORCHCVT_GEMM' if os.environ.get('TORCHCVT_GEMM') else 'the faster on this CPU, measured once'})"]
        more, more_notes = _more_candidates(ours, optimized, backends, precisions, log)
        notes += more_notes
        models.update(more)
        gflop_per_image = 2 * summary(ours, size).macs / 1e9

        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            ref = theirs(x).logits
            diffs = {k: (f(x) - ref).abs().max().item() for k, f in models.items() if k != "transformers"}
        bad = {k: v for k, v in diffs.items() if not v < TOLERANCE and k not in (f"{ORT} int8", "eager bfloat16")}
        if bad:
            raise TorchCvTError(f"logits differ from transformers by {bad} (tolerance {TOLERANCE}); not timing different models")
        log(f"logits agree with transformers: {diffs}")
        products = gemm_candidates(matmul_size)  # in every round, beside the models: "% attain" compares within a round
        gemms = {f"GEMM {k}": f for k, f in products.items()}
        report = Report(name if isinstance(name, str) else describe(ours.config), size, threads, diffs,
                        matmul_size=matmul_size, notes=notes, gemm_times={k: [] for k in products})

        for batch in batches:
            x = torch.randn(batch, 3, size, size)
            fns = {k: (lambda f=f: f(x)) for k, f in models.items()} | gemms
            with torch.inference_mode():
                times = time_alternating(fns, repeats=_rounds(repeats, batch), warmup=1)
            gemm_times = report.add_gemm_times(times)
            for k in models:
                row = Row("inference", batch, k, times[k], gflop_per_image * batch,
                          None if k == "transformers" else median_ratio(times["transformers"], times[k]),
                          vs_onnxruntime=median_ratio(times[ORT], times[k]) if ORT in times else None,
                          attainable=attainable_fraction(times[k], gflop_per_image * batch, gemm_times, matmul_size))
                if memory and batch == 8 and k in _MEMORY_KINDS:
                    row.peak_mib = peak_memory_mib(_MEMORY_KINDS[k], "infer", directory, batch, size, threads)
                report.rows.append(row)
                log(f"inference batch {batch} {k}: {statistics.median(times[k]) * 1e3:.1f} ms")

        if train_batch:
            x = torch.randn(train_batch, 3, size, size)
            y = torch.randint(0, ours.num_classes, (train_batch,))
            # Copies: the optimizer steps change the weights.
            steps = {k: make_train_step(copy.deepcopy(m), x, y) for k, m in (("transformers", theirs), ("torchcvt plain", plain), ("torchcvt", ours))}
            times = time_alternating(steps | gemms, repeats=max(3, repeats // 2), warmup=1)
            gemm_times = report.add_gemm_times(times)
            for k in steps:
                row = Row("train step", train_batch, k, times[k], 3 * gflop_per_image * train_batch,
                          None if k == "transformers" else median_ratio(times["transformers"], times[k]),
                          attainable=attainable_fraction(times[k], 3 * gflop_per_image * train_batch, gemm_times, matmul_size))
                if memory:
                    row.peak_mib = peak_memory_mib(_MEMORY_KINDS[k], "train", directory, train_batch, size, threads)
                report.rows.append(row)
                log(f"train step batch {train_batch} {k}: {statistics.median(times[k]) * 1e3:.1f} ms")
    report.load[1] = load_average()
    log("matmul rates (in the model rounds): " + ", ".join(f"{name} {rate:.0f} GFLOP/s" for name, rate in report.matmul.items()))
    return report


# ---------------------------------------------------------------------------------------- CLI
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="cvt-13", help="preset to build with random weights (default cvt-13)")
    parser.add_argument("--batch-sizes", default="1,8,32", help="inference batch sizes, comma-separated (default 1,8,32)")
    parser.add_argument("--train-batch", type=int, default=16, help="training-step batch size; 0 skips it (default 16)")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds at batch 8 (more at 1, fewer above 8; default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: PyTorch's, one per core)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--no-onnxruntime", action="store_true", help="skip the ONNX Runtime rows (float32, int8) and the default-backend row; "
                        "bfloat16 is timed either way")
    parser.add_argument("--precisions", default="offered",
                        help="reduced precisions to time: 'offered' (default: those this CPU's flags offer), 'all', "
                             "'none' or a comma-separated list of int8, bfloat16")
    parser.add_argument("--quick", action="store_true", help="batches 1 and 8, 4 rounds, training batch 8, no memory")


def run(args: argparse.Namespace) -> int:
    try:
        batches = tuple(int(b) for b in args.batch_sizes.split(","))
    except ValueError:
        raise ConfigError(f"--batch-sizes must be integers separated by commas, got {args.batch_sizes!r}") from None
    if any(b <= 0 for b in batches) or args.repeats <= 0 or args.train_batch < 0:
        raise ConfigError("--batch-sizes and --repeats must be positive, --train-batch >= 0")
    repeats, train_batch, memory = args.repeats, args.train_batch, not args.no_memory
    reduced = [p for p in PRECISIONS if p != "float32"]
    choice = {"offered": None, "all": tuple(reduced), "none": ()}.get(args.precisions)
    if args.precisions not in ("offered", "all", "none"):
        choice = tuple(p.strip() for p in args.precisions.split(","))
        if not set(choice) <= set(reduced):
            raise ConfigError(f"--precisions must be offered, all, none or a list of {', '.join(reduced)}; got {args.precisions!r}")
    if args.quick:
        batches, repeats, train_batch, memory = (1, 8), 4, 8, False
    report = run_benchmark(
        args.model, batches=batches, train_batch=train_batch, repeats=repeats, threads=args.threads,
        memory=memory, backends=not args.no_onnxruntime, precisions=choice, log=lambda s: print(s, file=sys.stderr, flush=True),
    )
    print(report.table())
    return 0
