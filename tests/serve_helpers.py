"""Starting a real ``cvt serve`` for the tests: a subprocess on a free localhost port."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
START_LIMIT = 300.0  # seconds: a safety net for a loaded machine, not a speed requirement


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m torchcvt serve --weights ... --port P`` and its log; ``stop()`` sends SIGTERM."""

    def __init__(self, weights: Path, *options: str, name: str = "tiny", log: Path) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.name = name
        self.log_path = log
        env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log_file = open(log, "w")  # the server's stderr; closed by stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "torchcvt", "serve", "--weights", str(weights), "--name", name,
             "--port", str(self.port), "--threads", "1", *options],
            stdout=subprocess.DEVNULL, stderr=self.log_file, env=env,
        )
        self.ready_polls = 0  # responses the readiness loop received (the server counts them too)
        deadline = time.monotonic() + START_LIMIT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"cvt serve exited with {self.process.returncode}:\n{self.log()}")
            try:
                response = httpx.get(self.url + "/v2/health/ready", timeout=5)
                self.ready_polls += 1
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"cvt serve not ready within {START_LIMIT} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        """SIGTERM, then the exit status; the log file is closed (it stays readable through ``log()``)."""
        try:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            return self.process.wait(timeout=START_LIMIT)
        finally:
            self.log_file.close()


def image_bytes(seed: int, size: tuple[int, int] = (96, 80), fmt: str = "PNG") -> bytes:
    """An encoded random RGB image, different for each seed."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()
