"""``cvt serve``'s app in this process (Starlette's TestClient, the lifespan included): where request
work runs (parsing and decoding off the event loop, a request's images decoded concurrently, as many
decoding threads as ``--threads``), and the image-safety options it shares with ``cvt predict``.

The model is the tiny transformers-built checkpoint of conftest.py; test_serve.py runs the real server.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import warnings

import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="cvt serve needs the serve extra: pip install -e '.[serve]'")
pytest.importorskip("httpx")

from fastapi.testclient import TestClient  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from serve_helpers import image_bytes  # noqa: E402

from torchcvt import load_model  # noqa: E402
from torchcvt.cli import build_parser  # noqa: E402
from torchcvt.errors import TorchCvTError  # noqa: E402
from torchcvt.serve import protocol  # noqa: E402
from torchcvt.serve.app import create_app, load_service  # noqa: E402
from torchcvt.serve.command import settings_of  # noqa: E402
from torchcvt.serve.model import DEFAULT_MAX_PIXELS  # noqa: E402
from torchcvt.serve.settings import ServeSettings  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(reference):
    return reference("tiny")[1]


@pytest.fixture
def restore_threads():
    """load_service applies --threads to this whole process; the suite runs on one thread (conftest.py)."""
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


@pytest.fixture
def served(checkpoint, restore_threads):
    """The app started with --threads two above this process's count, and a client talking to it."""
    app = create_app(ServeSettings(weights=str(checkpoint), name="tiny", device="cpu", threads=restore_threads + 2))
    with TestClient(app) as client:
        yield app, client


def serve_args(*options: str):
    return build_parser().parse_args(["serve", *options])


def test_decoding_threads_follow_the_threads_option(served, restore_threads):
    app, _ = served
    assert app.state.decode_limiter.total_tokens == restore_threads + 2


def test_a_requests_images_are_decoded_concurrently_and_the_first_bad_one_answers(served):
    app, client = served
    service = app.state.service
    decode = service.decode
    # Each decode waits for the other: one after the other, the first would wait until the barrier
    # breaks (its timeout only ends a test that already failed) and the request would get a 500.
    both = threading.Barrier(2, timeout=120)

    def decode_together(data: bytes, name: str) -> torch.Tensor:
        both.wait()
        return decode(data, name)

    service.decode = decode_together
    files = [("file", (f"{i}.png", image_bytes(60 + i))) for i in range(2)]
    together = client.post("/predict", files=files)
    service.decode = decode
    assert together.status_code == 200, together.text
    alone = [client.post("/predict", files=[f]).json()[0] for f in files]
    assert together.json() == alone  # the same answers as one image at a time, in the request's order

    bad = [("file", ("good.png", image_bytes(62))), ("file", ("first-bad.png", b"no image")),
           ("file", ("second-bad.png", b"no image either"))]
    response = client.post("/predict", files=bad)
    assert response.status_code == 400 and "first-bad.png" in response.json()["error"], response.text


def test_a_timed_out_decode_keeps_its_thread_slot_until_its_thread_ends(checkpoint, restore_threads):
    """Requests that time out while their images decode answer 504, and their decoding threads still count
    against the limit until they return: no other decode starts beside them (bounded memory under overload)."""
    app = create_app(ServeSettings(weights=str(checkpoint), name="tiny", device="cpu", threads=1, timeout_s=0.2))
    running, most, lock, release = [0], [0], threading.Lock(), threading.Event()
    statuses: dict[int, int] = {}
    with TestClient(app) as client:
        slots = app.state.decode_limiter.total_tokens
        service = app.state.service
        decode = service.decode

        def slow_decode(data: bytes, name: str) -> torch.Tensor:
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            release.wait(120)  # hold the thread well past every request's 0.2 s
            with lock:
                running[0] -= 1
            return decode(data, name)

        def ask(seed: int) -> None:
            response = client.post("/predict", content=image_bytes(seed), headers={"content-type": "image/png"})
            statuses[seed] = response.status_code

        service.decode = slow_decode
        holders = [threading.Thread(target=ask, args=(70 + i,)) for i in range(slots)]
        for t in holders:
            t.start()
        for _ in range(12000):  # until every slot is held by a decode (a failed test ends after 120 s)
            if running[0] == slots:
                break
            threading.Event().wait(0.01)
        others = [threading.Thread(target=ask, args=(80 + i,)) for i in range(3)]
        for t in others:  # with every slot held past their deadlines, they time out (or are refused) before decoding
            t.start()
        for t in others:
            t.join(120)
        release.set()
        for t in holders:
            t.join(120)
        service.decode = decode
    assert most[0] == slots, f"{most[0]} decodes ran at once with {slots} thread slots"
    assert all(statuses.get(80 + i) in (503, 504) for i in range(3)), statuses  # no slot in time, or no room in the queue
    assert all(statuses.get(70 + i) in (200, 504) for i in range(slots)), statuses


def test_infer_parses_pixels_and_base64_off_the_event_loop(served, monkeypatch):
    _, client = served
    on_loop: list[tuple[str, bool]] = []

    def recording(function):
        def call(*args):
            try:
                asyncio.get_running_loop()
                on_loop.append((function.__name__, True))
            except RuntimeError:  # no event loop in this thread: a worker thread
                on_loop.append((function.__name__, False))
            return function(*args)
        return call

    for name in ("pixels_of", "encoded_images"):
        monkeypatch.setattr(protocol, name, recording(getattr(protocol, name)))
    pixels = {"name": "pixel_values", "shape": [1, 3, 224, 224], "datatype": "FP32", "data": [0.0] * (3 * 224 * 224)}
    encoded = {"name": "image_bytes", "shape": [1], "datatype": "BYTES", "data": [base64.b64encode(image_bytes(63)).decode()]}
    for tensor in (pixels, encoded):
        response = client.post("/v2/models/tiny/infer", json={"inputs": [tensor]})
        assert response.status_code == 200, response.text
    assert on_loop == [("pixels_of", False), ("encoded_images", False)]


def test_image_safety_options_are_the_shared_ones_and_reach_the_model(checkpoint, tmp_path, monkeypatch, restore_threads):
    defaults = settings_of(serve_args("--weights", str(checkpoint)))
    assert defaults.max_pixels == DEFAULT_MAX_PIXELS and not defaults.allow_nonfinite  # serve's own default limit

    # --max-pixels 0 means no limit, as for cvt predict and cvt eval: not even Pillow's, here lowered to
    # 30,000 pixels (it refuses twice that; the 224 px crop only makes it warn).
    pillow_limit = Image.MAX_IMAGE_PIXELS
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    big = image_bytes(64, (300, 250))  # 75,000 pixels
    unlimited = load_service(settings_of(serve_args("--weights", str(checkpoint), "--max-pixels", "0")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        assert unlimited.decode(big, "big.png").shape == (3, 224, 224)
    limited = load_service(settings_of(serve_args("--weights", str(checkpoint), "--max-pixels", "5000")))
    with pytest.raises(TorchCvTError, match="big.png.*over the limit of 5,000"):
        limited.decode(big, "big.png")

    state = load_model(checkpoint).state_dict()
    state["head.bias"][0] = float("nan")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "nan.safetensors")
    nan_weights = str(tmp_path / "nan.safetensors")
    with pytest.raises(TorchCvTError, match="NaN or infinite"):
        load_service(settings_of(serve_args("--weights", nan_weights)))
    allowed = load_service(settings_of(serve_args("--weights", nan_weights, "--allow-nonfinite-weights")))
    assert allowed.classifier.model.head.bias.isnan().any()
    # Served, such weights answer (NaN scores are JSON's null, as `cvt predict --format json` writes them), not 500.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)
    app = create_app(ServeSettings(weights=nan_weights, name="tiny", device="cpu", threads=restore_threads, allow_nonfinite=True))
    with TestClient(app) as client:
        response = client.post("/predict?top_k=2", content=image_bytes(64, (100, 100)), headers={"content-type": "image/png"})
    assert response.status_code == 200, response.text
    assert [p["score"] for p in response.json()[0]["top_k"]] == [None, None]
