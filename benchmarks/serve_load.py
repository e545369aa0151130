"""Load test of an image classification server: throughput, latency percentiles, errors and 503s.

    python benchmarks/serve_load.py --weights cvt-13 --concurrency 1 8 32 128 --requests 200 200 300 2000
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --name cvt-13 --concurrency 32

With ``--weights`` it starts ``cvt serve`` itself (extra options after ``--serve-args``), waits
until ``/v2/health/ready``, runs each concurrency level, reads the server's peak resident memory
(VmHWM of the process and its children from /proc), and stops it with SIGTERM, checking it exits 0.
``--baseline N`` also times the same weights in-process, one image at a time (decode, preprocess,
forward: what a loop over ``Classifier`` gives), the reference for the speed-up: in a child process
before the server starts and again after it stops, so a machine whose speed drifts shows it; each
level's ``speedup`` is its throughput over the mean of the two.

Each request is an Open Inference Protocol v2 ``infer`` call carrying one encoded image as a base64
BYTES tensor (``--endpoint predict`` posts the raw image to ``/predict`` instead). A 503 is counted
apart from failures (backpressure); anything else that is not a 200 (other statuses, timeouts,
connection errors) is a failure. The client (aiohttp, asyncio) runs on the same machine and takes
CPU from the server: the figures are for client and server sharing the cores. (httpx, measured first,
spent 17 s of CPU on 1,000 requests at concurrency 128, 4 s at 32: at 128 it measured itself.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx


def test_image(size: int = 320) -> bytes:
    """A JPEG with some structure (gradients and a disc), the kind of file a client sends."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:size, 0:size] / size
    rgb = np.stack([x, y, ((x - 0.5) ** 2 + (y - 0.5) ** 2 < 0.1).astype(float)], axis=-1)
    buffer = io.BytesIO()
    Image.fromarray((rgb * 255).astype("uint8")).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss_mb(pid: int) -> float:
    """VmHWM (peak resident set) of ``pid`` and its children, summed, in MiB."""
    total = 0
    pids = [pid] + [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        for line in Path(f"/proc/{p}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                total += int(line.split()[1])
    return total / 1024


async def run_level(url: str, name: str, endpoint: str, image: bytes, concurrency: int, requests: int,
                    timeout: float) -> dict:
    if endpoint == "infer":
        path = f"/v2/models/{name}/infer"
        body = json.dumps({"inputs": [{"name": "image_bytes", "shape": [1], "datatype": "BYTES",
                                       "data": [base64.b64encode(image).decode()]}],
                           "outputs": [{"name": "top_k_labels"}, {"name": "top_k_scores"}]}).encode()
        headers = {"content-type": "application/json"}
    else:
        path, body, headers = "/predict", image, {"content-type": "image/jpeg"}
    latencies: list[float] = []
    counts = {"ok": 0, "503": 0, "failed": 0}
    failures: dict[str, int] = {}  # what the failures were: a status code or an exception's name
    answers: set[str] = set()
    remaining = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as client:

        async def worker() -> None:
            for _ in remaining:
                started = time.perf_counter()
                try:
                    async with client.post(path, data=body, headers=headers) as response:
                        status, text = response.status, await response.text()
                except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                    counts["failed"] += 1
                    failures[type(exc).__name__] = failures.get(type(exc).__name__, 0) + 1
                    continue
                if status == 200:
                    latencies.append(time.perf_counter() - started)
                    counts["ok"] += 1
                    answers.add(text if endpoint == "predict" else json.dumps(json.loads(text)["outputs"][0]))
                elif status == 503:
                    counts["503"] += 1
                else:
                    counts["failed"] += 1
                    failures[str(status)] = failures.get(str(status), 0) + 1

        load_before = os.getloadavg()[0]
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
    latencies.sort()
    pct = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    return {"concurrency": concurrency, "requests": requests, **counts, "seconds": seconds,
            "throughput": counts["ok"] / seconds, "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
            "failures": failures, "distinct_answers": len(answers), "load_before": load_before, "load_after": os.getloadavg()[0]}


def baseline(weights: str, backend: str, image: bytes, requests: int, threads: int | None) -> dict:
    """Images per second of a loop over one image at a time in this process: decode, preprocess, forward."""
    import torch

    from torchcvt import Classifier
    from torchcvt.transforms import load_image

    if threads:
        torch.set_num_threads(threads)
    classifier = Classifier(weights, device="cpu", backend=backend)
    one = lambda: classifier.predict_batch(classifier.preprocess(load_image(image, max_pixels=10**8, name="x"))[None])
    for _ in range(5):
        one()
    started = time.perf_counter()
    for _ in range(requests):
        one()
    seconds = time.perf_counter() - started
    return {"throughput": requests / seconds, "ms_per_image": 1000 * seconds / requests, "load": os.getloadavg()[0]}


def baseline_in_child(args: argparse.Namespace, image: bytes) -> dict:
    """``baseline`` in a fresh process, as a user's loop would run (not beside this client)."""
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from serve_load import baseline, test_image; "
            "print(json.dumps(baseline(sys.argv[2], sys.argv[3], test_image(), int(sys.argv[4]), int(sys.argv[5]) or None)))")
    out = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), args.weights, args.backend,
                          str(args.baseline), str(args.threads or 0)], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def wait_ready(url: str, process: subprocess.Popen, limit: float = 300) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with status {process.returncode} before it was ready")
        try:
            if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit("the server was not ready in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", help="start `cvt serve --weights WEIGHTS` (else --url must point at a server)")
    parser.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--name", help="model name on the server (default: from --weights)")
    parser.add_argument("--endpoint", choices=("infer", "predict"), default="infer", help="OIP infer (default) or /predict")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 128], help="levels (default: 1 8 32 128)")
    parser.add_argument("--requests", type=int, nargs="+", default=[400],
                        help="requests per level: one number for all, or one per level (default: 400)")
    parser.add_argument("--timeout", type=float, default=120, help="client timeout per request, s (default: 120)")
    parser.add_argument("--baseline", type=int, default=0, metavar="N", help="also time N single images in-process")
    parser.add_argument("--backend", default="eager", help="backend for the server and the baseline (default: eager)")
    parser.add_argument("--threads", type=int, help="PyTorch threads for the server (`cvt serve --threads`) and the baseline "
                                                    "(default: PyTorch's, every core)")
    parser.add_argument("--server-pid", type=int, help="with --url: report this process's (and children's) peak memory")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more `cvt serve` options")
    args = parser.parse_args()
    if len(args.requests) not in (1, len(args.concurrency)):
        parser.error("--requests: give one number, or one per --concurrency level")
    requests = args.requests * len(args.concurrency) if len(args.requests) == 1 else args.requests
    image = test_image()
    if args.weights:
        from torchcvt.serve.model import model_name_for

        args.name = args.name or model_name_for(args.weights)
    if not (args.url or args.weights) or not args.name:
        parser.error("give --weights, or --url and --name")
    results: dict = {"server": args.serve_args, "threads": args.threads, "cpu_count": os.cpu_count(), "levels": []}
    if args.baseline:
        results["baseline_before"] = baseline_in_child(args, image)
        print("baseline before (in-process, one image at a time):", results["baseline_before"], flush=True)
    process = None
    if args.weights:
        port = free_port()
        args.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "torchcvt", "serve", "--weights", args.weights, "--port", str(port),
                   "--name", args.name, "--backend", args.backend, *args.serve_args]
        if args.threads:
            command += ["--threads", str(args.threads)]
        print("server:", " ".join(command[2:]), flush=True)
        process = subprocess.Popen(command)
        wait_ready(args.url, process)
    try:
        for concurrency, count in zip(args.concurrency, requests):
            row = asyncio.run(run_level(args.url, args.name, args.endpoint, image, concurrency, count, args.timeout))
            if process is not None or args.server_pid:
                row["server_peak_rss_mb"] = peak_rss_mb(process.pid if process is not None else args.server_pid)
            results["levels"].append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        if process is not None:
            process.send_signal(signal.SIGTERM)
            results["server_exit_status"] = process.wait(timeout=120)
            print("server exit status:", results["server_exit_status"])
    if args.baseline:
        results["baseline_after"] = baseline_in_child(args, image)
        print("baseline after (in-process, one image at a time):", results["baseline_after"])
        reference = (results["baseline_before"]["throughput"] + results["baseline_after"]["throughput"]) / 2
        for row in results["levels"]:
            row["speedup"] = row["throughput"] / reference
            print(f"concurrency {row['concurrency']}: {row['throughput']:.2f} images/s = {row['speedup']:.2f}x the baseline "
                  f"({reference:.2f} images/s, the mean of before and after)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
