"""Measure the candidate serving libraries against each other, interleaved so that a machine whose
load drifts (other jobs on the same cores) biases none of them: every server runs at once, and each
round sends one level's requests to each in turn; the table gives each one's median over rounds.

    python benchmarks/compare_serving.py --weights DIR --rounds 3 --requests 60 \
        --python fastapi=.venv/bin/python litserve=/venvs/litserve/bin/python \
                 kserve=/venvs/kserve/bin/python mlserver=/venvs/mlserver/bin/python

``fastapi`` is ``cvt serve`` itself; the others are benchmarks/serving_candidates.py, each in the
venv where its library is installed. All use the same batching settings (8 images, 5 ms) where the
library batches, and the same client and request (serve_load.py: one base64 image per OIP request).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from serve_load import free_port, peak_rss_mb, run_level, test_image  # noqa: E402


def start(library: str, python: str, weights: str, port: int, log: Path) -> subprocess.Popen:
    if library == "fastapi":
        command = [python, "-m", "torchcvt", "serve", "--weights", weights, "--name", "model", "--port", str(port),
                   "--max-batch-size", "8", "--max-delay-ms", "5", "--max-queue", "256"]
    else:
        command = [python, str(HERE / "serving_candidates.py"), library, "--weights", weights, "--port", str(port),
                   "--max-batch-size", "8", "--max-delay-ms", "5"]
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent / 'src'}{os.pathsep}{HERE}"}
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_until_answering(url: str, image: bytes, process: subprocess.Popen, limit: float = 600) -> float:
    import base64

    body = {"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image).decode()]}]}
    started = time.monotonic()
    while time.monotonic() - started < limit:
        if process.poll() is not None:
            raise SystemExit(f"{url}: the server exited with {process.returncode}")
        try:
            if httpx.post(url + "/v2/models/model/infer", json=body, timeout=30).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise SystemExit(f"{url}: not answering after {limit} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True)
    parser.add_argument("--python", nargs="+", required=True, metavar="LIBRARY=PYTHON")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--requests", type=int, default=60, help="requests per level, round and library")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="write every round's figures here")
    parser.add_argument("--logs", default="/tmp", help="folder for the servers' logs")
    args = parser.parse_args()
    image = test_image()
    servers = {}
    for item in args.python:
        library, python = item.split("=", 1)
        port = free_port()
        process = start(library, python, args.weights, port, Path(args.logs) / f"compare-{library}.log")
        servers[library] = (f"http://127.0.0.1:{port}", process)
    results: dict[str, dict[int, list[dict]]] = {lib: {c: [] for c in args.concurrency} for lib in servers}
    try:
        for library, (url, process) in servers.items():
            print(f"{library}: answering after {wait_until_answering(url, image, process):.0f} s", flush=True)
        for round_ in range(args.rounds):
            for concurrency in args.concurrency:
                for library, (url, process) in servers.items():
                    row = asyncio.run(run_level(url, "model", "infer", image, concurrency, args.requests, 300))
                    row["server_peak_rss_mb"] = peak_rss_mb(process.pid)
                    results[library][concurrency].append(row)
                    print(f"round {round_ + 1} {library:9s} c={concurrency:<3d} {row['throughput']:7.1f}/s "
                          f"p50 {row['p50_ms']:7.1f} ms p99 {row['p99_ms']:7.1f} ms failed {row['failed']} "
                          f"load {row['load_before']:.1f}", flush=True)
    finally:
        for url, process in servers.values():
            os.killpg(process.pid, signal.SIGTERM)
        for url, process in servers.values():
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
    print("\nmedians over rounds: library, concurrency, images/s, p50 ms, p99 ms, failed, peak RSS MiB")
    for library, levels in results.items():
        for concurrency, rows in levels.items():
            median = lambda key: statistics.median(r[key] for r in rows)
            print(f"| {library} | {concurrency} | {median('throughput'):.1f} | {median('p50_ms'):.0f} | "
                  f"{median('p99_ms'):.0f} | {sum(r['failed'] for r in rows)} | {max(r['server_peak_rss_mb'] for r in rows):.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
