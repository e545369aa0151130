"""torchcvt against transformers' CvT on the same weights: the table of docs/performance.md.

    python benchmarks/bench_vs_transformers.py            # CvT-13, batches 1/8/32, training step at 16
    python benchmarks/bench_vs_transformers.py --quick    # a minute or two
    python benchmarks/bench_vs_transformers.py --help

The same as ``cvt bench`` (the measuring code lives in ``torchcvt.bench``).
"""

from __future__ import annotations

import sys

from torchcvt.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
