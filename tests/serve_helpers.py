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
ANSWER_LIMIT = 120.0  # seconds a test waits for an answer, likewise (httpx's default is 5 s)


def reserve_port() -> socket.socket:
    """A socket bound (not listening) to a free localhost port, with SO_REUSEADDR. While it is open,
    no other process takes the port (neither another test's server, nor one of the many outgoing
    connections the tests make), and the server, which sets SO_REUSEADDR too, can still listen on it.
    A port that was merely free when asked for could be taken before the server had loaded its model."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class Server:
    """``python -m torchcvt serve --weights ... --port P`` and its log; ``stop()`` sends SIGTERM."""

    def __init__(self, weights: Path, *options: str, name: str = "tiny", log: Path) -> None:
        import httpx

        self.reserved = reserve_port()  # held until stop()
        self.port = self.reserved.getsockname()[1]
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
                # Refused at once until the server listens; once it does, every poll must get its answer
                # (the SIGTERM test counts them): a short timeout could give up on one the server counts.
                response = httpx.get(self.url + "/v2/health/ready", timeout=ANSWER_LIMIT)
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
            self.reserved.close()


def image_bytes(seed: int, size: tuple[int, int] = (96, 80), fmt: str = "PNG") -> bytes:
    """An encoded random RGB image, different for each seed."""
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, format=fmt)
    return buffer.getvalue()
