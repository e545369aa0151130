"""MKL with and without torchcvt's Intel-path shim (torchcvt/mkl_amd.py) on this CPU: docs/performance.md, row 22.

    python benchmarks/mkl_amd.py                 # 3 rounds of two child processes, CvT-13, 2 threads
    python benchmarks/mkl_amd.py --rounds 5 --train

The shim acts process-wide and only before torch loads, so the two cases cannot alternate in one
process. Each round starts one child without it (``TORCHCVT_MKL_INTEL_PATH=0``) and one with it, in
alternating order. Inside a child the candidates alternate against a yardstick that MKL does not touch:
ONNX Runtime on the same weights (its own GEMMs, MLAS; spinning off). So each child reports
``candidate time / ONNX Runtime time``, a ratio that holds while the machine's speed drifts, and the
shim's speed-up is the ratio of those ratios, child against child, round by round. Candidates: the
2048^3 ``torch.mm``, the eager backend (``optimize_for_inference(model, "eager")``) at batch 1 and 8,
and with ``--train`` a training step (forward and backward, batch 16, AdamW) of the fast-path model.

transformers (the same weights, ``torchcvt.bench.reference_pair``) is timed at batch 8 in both children,
so the report also gives the eager backend against transformers two ways: in one process, where both
call the same MKL, and each as a user gets it: torchcvt with the shim against transformers in a process
that never imported torchcvt (MKL's default dispatch), through the shared ONNX Runtime yardstick.
Every candidate keeps its freed memory (``retain_freed_memory``), so only MKL's kernels differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import torchcvt  # first: the shim is loaded before torch (mkl_amd.py)
import json, sys, statistics, torch
from torchcvt import mkl_amd
from torchcvt.allocator import retain_freed_memory
from torchcvt.backends import optimize_for_inference
from torchcvt.fastpath import apply_fast_path
from torchcvt.machine import cpu_info, load_average, time_alternating
from torchcvt.pretrained import create_model

import tempfile
from torchcvt.bench import reference_pair

retain_freed_memory(); torch.set_num_threads(2); torch.manual_seed(0)
train = sys.argv[1] == "1"
with tempfile.TemporaryDirectory() as directory:
    theirs, model = reference_pair("cvt-13", directory)
eager, ort = optimize_for_inference(model, backend="eager"), optimize_for_inference(model, backend="onnxruntime")
a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
ratios = {}
with torch.inference_mode():
    for batch, repeats in ((1, 12), (8, 4)):
        x = torch.randn(batch, 3, 224, 224)
        candidates = {"eager": lambda: eager(x), "mm": lambda: torch.mm(a, b), "ort": lambda: ort(x)}
        if batch == 8:
            candidates["transformers"] = lambda: theirs(x)
        t = time_alternating(candidates, repeats=repeats, warmup=2)
        for name in t:
            if name != "ort":
                key = "mm 2048^3" if name == "mm" else f"{name} b{batch}"
                ratios.setdefault(key, statistics.median(c / o for c, o in zip(t[name], t["ort"])))
if train:
    net = apply_fast_path(create_model("cvt-13")).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    xs, ys, x8 = torch.randn(16, 3, 224, 224), torch.randint(0, 1000, (16,)), torch.randn(8, 3, 224, 224)
    def step():
        opt.zero_grad(set_to_none=True); torch.nn.functional.cross_entropy(net(xs), ys).backward(); opt.step()
    def infer():
        with torch.inference_mode():
            ort(x8)
    t = time_alternating({"step": step, "ort": infer}, repeats=3, warmup=1)
    ratios["train step b16"] = statistics.median(s / o for s, o in zip(t["step"], t["ort"]))
print(json.dumps({"status": mkl_amd.status(), "cpu": cpu_info().describe(), "load": load_average(), "ratios": ratios}))
"""


def child(shim: bool, train: bool) -> dict:
    env = dict(os.environ, TORCHCVT_MKL_INTEL_PATH="1" if shim else "0")
    done = subprocess.run([sys.executable, "-c", CHILD, "1" if train else "0"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"child process failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--train", action="store_true", help="also a training step (batch 16)")
    args = parser.parse_args()
    speedups: dict[str, list[float]] = {}
    for r in range(args.rounds):
        order = (False, True) if r % 2 == 0 else (True, False)
        results = {shim: child(shim, args.train) for shim in order}
        if r == 0:
            print("CPU:", results[True]["cpu"])
            print("without:", results[False]["status"])
            print("with:   ", results[True]["status"])
        for name, without in results[False]["ratios"].items():
            speedups.setdefault(name, []).append(without / results[True]["ratios"][name])
        print(f"round {r + 1}: load {results[True]['load']}; time / ONNX Runtime's, without -> with: "
              + ", ".join(f"{k} {results[False]['ratios'][k]:.3f} -> {v:.3f}" for k, v in results[True]["ratios"].items()), flush=True)
        user = results[False]["ratios"]["transformers b8"] / results[True]["ratios"]["eager b8"]
        same = results[True]["ratios"]["transformers b8"] / results[True]["ratios"]["eager b8"]
        speedups.setdefault("eager b8 vs transformers, each as imported (transformers without the shim)", []).append(user)
        speedups.setdefault("eager b8 vs transformers, one process (both with the shim)", []).append(same)
    print("speed-up from the shim (median over rounds of the ratio of ratios):")
    for name, values in speedups.items():
        print(f"  {name}: {statistics.median(values):.3f}x  (rounds: {', '.join(f'{v:.3f}' for v in values)})")


if __name__ == "__main__":
    main()
