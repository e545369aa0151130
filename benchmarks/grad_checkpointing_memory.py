"""Peak memory of a training step with and without ``model.set_grad_checkpointing()``: the figures
in docs/inference.md ("Gradient checkpointing").

    python benchmarks/grad_checkpointing_memory.py                       # cvt-13 at 224, batches 8, 16, 32
    python benchmarks/grad_checkpointing_memory.py --model cvt-21 --batches 16 --threads 4

Method: ``torchcvt.bench.peak_memory_mib``, as ``cvt bench`` measures peak memory. Each case runs
in a fresh process (random weights in transformers' layout, the fast path on), one warm-up step
(forward, cross-entropy, backward, AdamW), then the kernel's high-water mark is reset and a second
step runs: the figure is that step's high-water mark minus the resident set before it, with glibc's
mmap threshold lowered so that freed tensors leave the resident set. Activations dominate it; the
weights, gradients and AdamW state (about 16 bytes per parameter) exist before the step.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from torchcvt.bench import peak_memory_mib
from torchcvt.machine import cpu_info
from torchcvt.checkpoint import save_pretrained
from torchcvt.pretrained import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="cvt-13", help="registry name (random weights)")
    parser.add_argument("--batches", default="8,16,32", help="training batch sizes, comma-separated")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each measuring process")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="cvt-ckpt-mem-") as directory:
        model = create_model(args.model)
        save_pretrained(model, directory, model_card=False)
        size = model.config.image_size
        print(f"{args.model} at {size}x{size}, fp32, training step (AdamW), {args.threads} threads, torch {torch.__version__}, "
              f"CPU: {cpu_info().describe()}")
        print("| batch | without | with checkpointing | ratio | step time without / with |")
        print("|---|---|---|---|---|")
        for batch in (int(b) for b in args.batches.split(",")):
            mib, seconds = {}, {}
            for kind in ("torchcvt", "checkpointed"):
                start = time.perf_counter()
                mib[kind] = peak_memory_mib(kind, "train", directory, batch, size, args.threads)
                seconds[kind] = (time.perf_counter() - start) / 2  # two steps per process (load time included)
            print(f"| {batch} | {mib['torchcvt']:.0f} MiB | {mib['checkpointed']:.0f} MiB | "
                  f"{mib['checkpointed'] / mib['torchcvt']:.2f}x | {seconds['torchcvt']:.1f} s / {seconds['checkpointed']:.1f} s |",
                  flush=True)


if __name__ == "__main__":
    main()
