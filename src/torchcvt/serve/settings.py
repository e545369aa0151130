"""What one server runs with: ``ServeSettings``, from ``cvt serve``'s options to every worker process.

Worker processes are started fresh (uvicorn spawns them) and read their settings from the
environment variable ``SETTINGS_VARIABLE`` as JSON, which ``cvt serve`` writes before starting them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from ..errors import ConfigError
from .model import DEFAULT_MAX_PIXELS

SETTINGS_VARIABLE = "TORCHCVT_SERVE_SETTINGS"


@dataclass(frozen=True)
class ServeSettings:
    weights: str
    name: str
    backend: str | None = None  # None: what the precision runs on (eager; onnxruntime for int8)
    precision: str = "float32"
    device: str | None = None
    max_batch_size: int = 8
    max_delay_ms: float = 5.0
    max_queue: int = 128
    timeout_s: float = 30.0
    max_body_mb: float = 20.0
    max_pixels: int = DEFAULT_MAX_PIXELS  # 0: no limit, as everywhere --max-pixels is taken
    allow_nonfinite: bool = False  # --allow-nonfinite-weights
    threads: int | None = None  # torch threads per worker; None: the cores divided among the workers

    def __post_init__(self) -> None:
        for field, low in (("max_batch_size", 1), ("max_queue", 1), ("max_pixels", 0)):
            if getattr(self, field) < low:
                raise ConfigError(f"--{field.replace('_', '-')} must be >= {low}, got {getattr(self, field)}")
        if not self.max_delay_ms >= 0:
            raise ConfigError(f"--max-delay-ms must be >= 0, got {self.max_delay_ms}")
        for field, option in (("timeout_s", "--timeout"), ("max_body_mb", "--max-body-mb")):
            if not getattr(self, field) > 0:
                raise ConfigError(f"{option} must be positive, got {getattr(self, field)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads must be >= 1, got {self.threads}")

    @property
    def max_wait_s(self) -> float:
        """Longest estimated queue wait a new request is accepted with: half its timeout, the other
        half a margin for decoding and for the model slowing down (another process on the cores)."""
        return self.timeout_s / 2

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    def to_environment(self) -> None:
        os.environ[SETTINGS_VARIABLE] = json.dumps(asdict(self))

    @classmethod
    def from_environment(cls) -> ServeSettings:
        if SETTINGS_VARIABLE not in os.environ:
            raise ConfigError(f"{SETTINGS_VARIABLE} is not set: start the server with `cvt serve`")
        return cls(**json.loads(os.environ[SETTINGS_VARIABLE]))
