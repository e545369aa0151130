"""``cvt serve``: its options, and starting uvicorn with one or several worker processes.

The weights are loaded once here before anything listens, so a bad ``--weights`` is a one-line
error and the ONNX Runtime backend's export is cached before workers look for it. With one worker
the server runs in this process on that model; with several, uvicorn spawns them and each loads the
(cached) model itself, from the settings in the environment. Prometheus' multiprocess directory is
made here, before any process imports prometheus_client, and removed on exit.

SIGTERM (and Ctrl-C) stops the server gracefully: uvicorn stops accepting, the requests in flight
get their answers, then the process exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import socket
import tempfile

from ..backends import add_backend_arguments, log_backend_choice
from ..errors import ConfigError
from ..inference import add_image_safety_arguments
from .model import DEFAULT_MAX_PIXELS, model_name_for
from .settings import ServeSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = ServeSettings(weights="", name="")
    parser.add_argument("--weights", required=True, help="registry name (see `cvt models`) or hub id, checkpoint folder or file")
    parser.add_argument("--name", default=None,
                        help="the model's name in /v2/models/NAME (default: the last part of --weights, e.g. cvt-13)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    parser.add_argument("--max-batch-size", type=int, default=defaults.max_batch_size,
                        help=f"most images in one forward pass (default: {defaults.max_batch_size})")
    parser.add_argument("--max-delay-ms", type=float, default=defaults.max_delay_ms,
                        help="longest wait for more images to fill a batch, after the oldest arrived "
                             f"(default: {defaults.max_delay_ms:g}; 0: batch only what is already waiting)")
    parser.add_argument("--max-queue", type=int, default=defaults.max_queue,
                        help="images waiting, and inference requests in flight, per worker; beyond it requests get 503 "
                             f"with Retry-After (default: {defaults.max_queue})")
    parser.add_argument("--timeout", type=float, default=defaults.timeout_s,
                        help=f"seconds a request may take before it gets 504 (default: {defaults.timeout_s:g})")
    parser.add_argument("--max-body-mb", type=float, default=defaults.max_body_mb,
                        help=f"largest request body in MiB, else 413 (default: {defaults.max_body_mb:g})")
    parser.add_argument("--workers", type=int, default=1,
                        help="server processes, each with its own copy of the model (default: 1)")
    parser.add_argument("--threads", type=int, default=None,
                        help="PyTorch threads per worker (default: the CPU cores divided among the workers)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    add_backend_arguments(parser)
    add_image_safety_arguments(parser, default_max_pixels=DEFAULT_MAX_PIXELS)
    parser.add_argument("--access-log", action="store_true", help="log every request (default: off; /metrics counts them)")
    parser.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"),
                        help="server log level (default: info)")


def run(args: argparse.Namespace) -> int:
    # Only look: prometheus_client must first be imported after PROMETHEUS_MULTIPROC_DIR is set, below.
    missing = [name for name in ("fastapi", "uvicorn", "multipart", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(f"cvt serve needs the serve extra ({missing[0]} is missing): pip install 'torchcvt[serve]'")
    settings = settings_of(args)
    _check_port(args.host, args.port)
    log_backend_choice(args)
    metrics_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    made_metrics_dir = metrics_dir is None
    if made_metrics_dir:
        metrics_dir = tempfile.mkdtemp(prefix="cvt-serve-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    try:
        import uvicorn

        from .app import create_app, load_service

        service = load_service(settings)  # fails here, in one line, for bad weights
        options = dict(host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                       timeout_graceful_shutdown=int(settings.timeout_s) + 5)
        # uvicorn stops gracefully on SIGTERM, then raises the signal again under the handler that was
        # there before it started; a handler that returns turns that into a normal exit, status 0.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        if args.workers == 1:
            uvicorn.Server(uvicorn.Config(create_app(settings, service), **options)).run()
        else:
            del service
            settings.to_environment()
            uvicorn.run("torchcvt.serve.app:create_app_from_environment", factory=True, workers=args.workers, **options)
    finally:
        if made_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
    return 0


def settings_of(args: argparse.Namespace) -> ServeSettings:
    """What the server runs with, from ``cvt serve``'s options (checked: a one-line ConfigError)."""
    if args.workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {args.workers}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be 1..65535, got {args.port}")
    threads = args.threads
    if threads is None and args.workers > 1:
        threads = max(1, (os.cpu_count() or 1) // args.workers)
    return ServeSettings(
        weights=args.weights, name=args.name or model_name_for(args.weights), backend=args.backend,
        precision=args.precision, device=args.device,
        max_batch_size=args.max_batch_size, max_delay_ms=args.max_delay_ms, max_queue=args.max_queue,
        timeout_s=args.timeout, max_body_mb=args.max_body_mb, max_pixels=args.max_pixels,
        allow_nonfinite=args.allow_nonfinite_weights, threads=threads,
    )


def _check_port(host: str, port: int) -> None:
    """A one-line error now rather than uvicorn's exit after the model has loaded."""
    try:
        socket.create_server((host, port)).close()
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
