"""The eager inference path against transformers, ONNX Runtime and torch.compile: docs/performance.md.

    python benchmarks/eager_paths.py                                  # CvT-13, batches 1 and 8, 2 threads
    python benchmarks/eager_paths.py --candidates fused,ort --batches 1 --rounds 30
    python benchmarks/eager_paths.py --profile fused --batches 1       # per-op times (torch.profiler)
    python benchmarks/eager_paths.py --candidates fused,compiled --batches 1 --rounds 5  # torch.compile(freezing); "first call" = compile cost

Same weights for every candidate (``torchcvt.bench.reference_pair``: random CvT-13 with random
BatchNorm statistics, read back by transformers); every candidate's logits are checked against
transformers' before timing. Candidates run alternately in one process, the order rotating each
round (``torchcvt.machine.time_alternating``); ratios are medians of per-round ratios, so they hold on
a loaded machine where the times do not. The load average is printed with every figure.

Candidates:
  transformers   CvtForImageClassification
  plain          CvT(...) as built: nn.Linear (MKL), no fusions
  fast           apply_fast_path: linears on oneDNN
  fused          fused.fuse_for_inference: the eager backend
  ort            ONNX Runtime on export_onnx(model, dynamic=True): intra-op threads = torch's, spinning off
  compiled       torch.compile(fused) with torch._inductor.config.freezing = True (minutes to compile)
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from torchcvt.bench import matmul_rates, reference_pair
from torchcvt.fastpath import apply_fast_path
from torchcvt.fused import fuse_for_inference
from torchcvt.machine import cpu_info, load_average, median_ratio, time_alternating
from torchcvt.summary import summary


def ort_runner(model: torch.nn.Module, directory: str, threads: int):
    import onnxruntime

    from torchcvt.backends import onnxruntime_session
    from torchcvt.export import export_onnx

    path = Path(directory) / "model.onnx"
    start = time.perf_counter()
    export_onnx(model, path, dynamic=True)
    print(f"# ONNX export: {time.perf_counter() - start:.0f} s, onnxruntime {onnxruntime.__version__}", flush=True)
    session = onnxruntime_session(path, threads)
    return lambda x: torch.from_numpy(session.run(["logits"], {"pixel_values": x.numpy()})[0])


def compiled_runner(model: torch.nn.Module, mode: str | None):
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    return torch.compile(model, mode=mode)


def build(names: list[str], theirs, plain, directory: str, threads: int, compile_mode: str | None) -> dict:
    fused = fuse_for_inference(plain)
    makers = {
        "transformers": lambda: (lambda x: theirs(x).logits),
        "plain": lambda: plain,
        "fast": lambda: apply_fast_path(copy.deepcopy(plain)),
        "fused": lambda: fused,
        "ort": lambda: ort_runner(plain, directory, threads),
        "compiled": lambda: compiled_runner(copy.deepcopy(fused), compile_mode),
    }
    unknown = sorted(set(names) - set(makers))
    if unknown:
        sys.exit(f"error: unknown candidates {unknown}; choose from {sorted(makers)}")
    return {n: makers[n]() for n in names}


def compare(runners: dict, theirs, batches: list[int], rounds: int, gflop_per_image: float, peak: float) -> None:
    names = list(runners)
    for batch in batches:
        x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(batch))
        with torch.inference_mode():
            ref = theirs(x).logits
            for name, run in runners.items():
                start = time.perf_counter()
                out = run(x)  # also the warm-up (and, for "compiled", the compilation for this shape)
                took = time.perf_counter() - start
                diff = (out - ref).abs().max().item()
                same = bool((out.argmax(-1) == ref.argmax(-1)).all())
                print(f"# b{batch} {name}: first call {took:.1f} s, max |logits - transformers| {diff:.1e}, same top-1: {same}")
                if not diff < 1e-3:
                    sys.exit(f"error: {name} differs from transformers by {diff}")
            load = load_average()
            n = rounds if batch > 1 else 2 * rounds
            times = time_alternating({k: (lambda f=f, x=x: f(x)) for k, f in runners.items()}, repeats=n, warmup=1)
        print(f"\nbatch {batch}, {n} rounds, load {load} -> {load_average()}")
        header = f"| {'candidate':<13} | {'median ms':>9} | {'GFLOP/s':>7} | {'% mm':>5} |" + "".join(f" vs {k[:11]:<11} |" for k in names)
        print(header)
        print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
        for k in names:
            med = statistics.median(times[k])
            gflops = gflop_per_image * batch / med
            ratios = "".join(f" {median_ratio(times[o], times[k]):>13.2f}x |" for o in names)
            print(f"| {k:<13} | {med * 1e3:>9.1f} | {gflops:>7.0f} | {100 * gflops / peak:>4.0f}% |{ratios}")
        print("(vs X: median over rounds of X's time / this candidate's time; > 1 means faster than X)")


def profile(run, batch: int, calls: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    x = torch.randn(batch, 3, 224, 224)
    with torch.inference_mode():
        for _ in range(2):
            run(x)
        load = load_average()
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(calls):
                run(x)
    print(f"\nprofile, batch {batch}, {calls} calls, load {load} -> {load_average()}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", default="transformers,plain,fast,fused,ort")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--rounds", type=int, default=10, help="timed rounds at batch > 1; twice as many at batch 1")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile-mode", default=None, help="torch.compile mode for 'compiled' (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--profile", default=None, help="a candidate to profile per op instead of timing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory(prefix="eager-paths-") as directory:
        theirs, plain = reference_pair("cvt-13", directory)
        gflop_per_image = 2 * summary(plain, 224).macs / 1e9
        print(f"# cvt-13 224x224 fp32, threads {torch.get_num_threads()}, torch {torch.__version__}, "
              f"CPU {cpu_info().describe()}, load {load_average()}")
        if args.profile:
            (run,) = build([args.profile], theirs, plain, directory, args.threads, args.compile_mode).values()
            for batch in batches:
                profile(run, batch, calls=5 if batch == 1 else 2)
            return
        rates = matmul_rates()
        peak = max(rates.values())
        print("# fp32 matmul 2048^3 (alternated): " + ", ".join(f"{k} {v:.0f} GFLOP/s" for k, v in rates.items())
              + f"; % mm below is of the faster, {peak:.0f}", flush=True)
        runners = build(args.candidates.split(","), theirs, plain, directory, args.threads, args.compile_mode)
        compare(runners, theirs, batches, args.rounds, gflop_per_image, peak)


if __name__ == "__main__":
    main()
