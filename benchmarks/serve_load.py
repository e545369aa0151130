"""Load test of an image classification server: throughput, latency percentiles, errors and 503s.

    python benchmarks/serve_load.py --weights cvt-13 --concurrency 1 8 32 128 --requests 200 200 300 2000
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --name cvt-13 --concurrency 32

With ``--weights`` it starts ``cvt serve`` itself (extra options after ``--serve-args``), waits
until ``/v2/health/ready``, runs each concurrency level, reads the server's peak resident memory
(VmHWM of the process and its children from /proc), and stops it with SIGTERM, checking it exits 0.
``--baseline N`` also times the same weights one image at a time (decode, preprocess, forward: what a
loop over ``Classifier`` gives) in a child process loaded once, the reference for the speed-up.
``--rounds R`` alternates: N baseline images, then each level's share of its requests, R times, and a
last N baseline images; each round's speed-up is that round's throughput over the mean of the two
baselines around it, and a level's ``speedup`` is the median over rounds. On a machine shared with
other tenants, whose speed drifts by 20 % from one minute to the next, only ratios taken this close
together mean anything.

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
    return {"concurrency": concurrency, "requests": requests, **counts, "seconds": seconds, "latencies": latencies,
            "failures": failures, "answers": answers, "load_before": load_before, "load_after": os.getloadavg()[0]}


def summary(parts: list[dict]) -> dict:
    """One level's row from its rounds: counts and latencies pooled, throughput over the summed time."""
    latencies = sorted(t for part in parts for t in part["latencies"])
    pct = lambda q: 1000 * latencies[min(len(latencies) - 1, int(q * len(latencies)))] if latencies else float("nan")
    counts = {key: sum(part[key] for part in parts) for key in ("requests", "ok", "503", "failed", "seconds")}
    failures: dict[str, int] = {}
    for part in parts:
        for kind, n in part["failures"].items():
            failures[kind] = failures.get(kind, 0) + n
    return {"concurrency": parts[0]["concurrency"], **counts, "throughput": counts["ok"] / counts["seconds"],
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "mean_ms": 1000 * statistics.fmean(latencies) if latencies else float("nan"),
            "failures": failures, "distinct_answers": len(set().union(*(part["answers"] for part in parts))),
            "load_before": parts[0]["load_before"], "load_after": parts[-1]["load_after"]}


class BaselineLoop:
    """A ``Classifier`` loaded and warmed once, timed on demand: ``time(n)`` is the images per second of a loop
    over ``n`` single images (decode, preprocess, forward)."""

    def __init__(self, weights: str, backend: str, image: bytes, threads: int | None) -> None:
        import torch

        from torchcvt import Classifier
        from torchcvt.images import load_image

        if threads:
            torch.set_num_threads(threads)
        classifier = Classifier(weights, device="cpu", backend=backend)
        self.one = lambda: classifier.predict_batch(classifier.preprocess(load_image(image, max_pixels=10**8, name="x"))[None])
        for _ in range(5):
            self.one()

    def time(self, requests: int) -> dict:
        started = time.perf_counter()
        for _ in range(requests):
            self.one()
        seconds = time.perf_counter() - started
        return {"throughput": requests / seconds, "ms_per_image": 1000 * seconds / requests, "load": os.getloadavg()[0]}


class BaselineChild:
    """``BaselineLoop`` in a fresh process, as a user's loop would run (not beside this client): loaded once,
    then each ``time(n)`` runs while the server and the client are idle."""

    def __init__(self, args: argparse.Namespace) -> None:
        code = ("import json, sys; sys.path.insert(0, sys.argv[1]); from serve_load import BaselineLoop, test_image; "
                "loop = BaselineLoop(sys.argv[2], sys.argv[3], test_image(), int(sys.argv[4]) or None); print('ready', flush=True)\n"
                "for line in sys.stdin: print(json.dumps(loop.time(int(line))), flush=True)")
        self.process = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parent), args.weights, args.backend,
                                         str(args.threads or 0)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if self.process.stdout.readline().strip() != "ready":
            raise SystemExit(f"the baseline process failed (status {self.process.wait()})")

    def time(self, requests: int) -> dict:
        self.process.stdin.write(f"{requests}\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise SystemExit(f"the baseline process failed (status {self.process.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


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
    parser.add_argument("--rounds", type=int, default=1, help="alternate the baseline and the levels this many times, "
                        "each level's requests split between the rounds (default: 1)")
    parser.add_argument("--backend", default="eager", help="backend for the server and the baseline (default: eager)")
    parser.add_argument("--threads", type=int, help="PyTorch threads for the server (`cvt serve --threads`) and the baseline "
                                                    "(default: PyTorch's, every core)")
    parser.add_argument("--server-pid", type=int, help="with --url: report this process's (and children's) peak memory")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("--serve-args", nargs=argparse.REMAINDER, default=[], help="more `cvt serve` options")
    args = parser.parse_args()
    if len(args.requests) not in (1, len(args.concurrency)):
        parser.error("--requests: give one number, or one per --concurrency level")
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    requests = args.requests * len(args.concurrency) if len(args.requests) == 1 else args.requests
    if min(requests) < args.rounds:
        parser.error(f"--requests: each level needs at least --rounds ({args.rounds}) requests, one a round")
    image = test_image()
    if args.weights:
        from torchcvt.serve.model import model_name_for

        args.name = args.name or model_name_for(args.weights)
    if not (args.url or args.weights) or not args.name:
        parser.error("give --weights, or --url and --name")
    results: dict = {"server": args.serve_args, "threads": args.threads, "cpu_count": os.cpu_count(), "rounds": args.rounds,
                     "levels": [], "baselines": []}
    loop = BaselineChild(args) if args.baseline else None
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
    parts: list[list[dict]] = [[] for _ in args.concurrency]
    try:
        # Round r: a baseline stretch, then every level's share of its requests; a last baseline closes. Each
        # level's round is compared with the two baselines around it, so a machine whose speed drifts (other
        # tenants) moves both sides of the ratio alike.
        for r in range(args.rounds):
            if loop is not None:
                results["baselines"].append(loop.time(args.baseline))
                print(f"round {r}: baseline (one image at a time, in a child process):", results["baselines"][-1], flush=True)
            for i, (concurrency, count) in enumerate(zip(args.concurrency, requests)):
                share = count // args.rounds + (r < count % args.rounds)
                part = asyncio.run(run_level(args.url, args.name, args.endpoint, image, concurrency, share, args.timeout))
                parts[i].append(part)
                print(f"round {r}: concurrency {concurrency}: {part['ok'] / part['seconds']:.2f} images/s, "
                      f"ok={part['ok']} 503={part['503']} failed={part['failed']}", flush=True)
        if loop is not None:
            results["baselines"].append(loop.time(args.baseline))
            print("baseline after the last round:", results["baselines"][-1], flush=True)
        for level_parts in parts:
            row = summary(level_parts)
            if process is not None or args.server_pid:
                row["server_peak_rss_mb"] = peak_rss_mb(process.pid if process is not None else args.server_pid)
            results["levels"].append(row)
            print(" ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    finally:
        if loop is not None:
            loop.close()
        if process is not None:
            process.send_signal(signal.SIGTERM)
            results["server_exit_status"] = process.wait(timeout=120)
            print("server exit status:", results["server_exit_status"])
    if args.baseline:
        base = [b["throughput"] for b in results["baselines"]]
        for row, level_parts in zip(results["levels"], parts):
            ratios = [part["ok"] / part["seconds"] / ((base[r] + base[r + 1]) / 2) for r, part in enumerate(level_parts)]
            row["speedup_rounds"] = ratios
            row["speedup"] = statistics.median(ratios)
            print(f"concurrency {row['concurrency']}: {row['throughput']:.2f} images/s; {row['speedup']:.2f}x the baseline "
                  f"(median over {len(ratios)} rounds: {', '.join(f'{x:.2f}' for x in ratios)}; baseline "
                  f"{statistics.fmean(base):.2f} images/s on average)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
