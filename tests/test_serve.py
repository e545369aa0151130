"""``cvt serve`` end to end: a real server in a subprocess on a free localhost port, every endpoint,
every bad request, concurrency, backpressure, timeouts and a graceful SIGTERM.

References: the transformers model the checkpoint was built from (probabilities), ``cvt predict
--format json`` on the same files (top-k answers), and ``attention_maps`` on the same weights
(the overlay). The model is the tiny transformers-built checkpoint of conftest.py (7 classes, 224 px).
"""

from __future__ import annotations

import base64
import io
import json
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi", reason="cvt serve needs the serve extra: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx")

from serve_helpers import ANSWER_LIMIT, ROOT, Server, image_bytes  # noqa: E402

from torchcvt import load_model  # noqa: E402
from torchcvt.inference import class_labels  # noqa: E402
from torchcvt.transforms import PreprocessConfig, preprocess  # noqa: E402

ERROR_LINE = re.compile(r"^[^\n]+$")


@pytest.fixture(scope="module")
def checkpoint(reference):
    return reference("tiny")  # (transformers model, folder)


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    s = Server(checkpoint[1], "--max-batch-size", "16", "--max-delay-ms", "20",
               log=tmp_path_factory.mktemp("serve") / "server.log")
    yield s
    assert s.stop() == 0, s.log()


@pytest.fixture(scope="module")
def strict_server(checkpoint, tmp_path_factory):
    """Small limits: 2 requests in flight, 1 Mpx images, 1 MiB bodies, and a 1 s timeout that a
    3 s batching delay always exceeds."""
    s = Server(checkpoint[1], "--max-queue", "2", "--max-pixels", "1000000", "--max-body-mb", "1",
               "--timeout", "1", "--max-delay-ms", "3000", "--max-batch-size", "8",
               log=tmp_path_factory.mktemp("serve-strict") / "server.log")
    yield s
    assert s.stop() == 0, s.log()


def predict_cli(weights, files, top_k=5) -> list[dict]:
    """``cvt predict --format json`` on the files: the reference answers of /predict."""
    out = subprocess.run([sys.executable, "-m", "torchcvt", "predict", "--weights", str(weights), "--format", "json",
                          "--top-k", str(top_k), "--device", "cpu", *map(str, files)],
                         capture_output=True, text=True, check=True, env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""})
    return [json.loads(line) for line in out.stdout.splitlines()]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def assert_error(response, status: int, *words: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"] and ERROR_LINE.match(body["error"]), body
    for word in words:
        assert word in body["error"], body["error"]


# --------------------------------------------------------------------------------------- health
def test_health_and_metadata(server):
    with httpx.Client(base_url=server.url, timeout=ANSWER_LIMIT) as c:
        assert c.get("/v2/health/live").json() == {"live": True}
        assert c.get("/v2/health/ready").json() == {"ready": True}
        assert c.get("/v2/models/tiny/ready").json() == {"name": "tiny", "ready": True}
        assert c.get("/v2").json()["name"] == "torchcvt"
        meta = c.get("/v2/models/tiny").json()
    assert meta["name"] == "tiny" and meta["platform"] == "pytorch_eager"
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "pixel_values": ("FP32", [-1, 3, 224, 224]), "image_bytes": ("BYTES", [-1])}
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "probabilities": ("FP32", [-1, 7]), "top_k_labels": ("BYTES", [-1, -1]),
        "top_k_indices": ("INT64", [-1, -1]), "top_k_scores": ("FP32", [-1, -1])}


def test_openapi_docs_and_page(server):
    with httpx.Client(base_url=server.url, timeout=ANSWER_LIMIT) as c:
        openapi = c.get("/openapi.json").json()
        docs = c.get("/docs")
        page = c.get("/")
    paths = openapi["paths"]
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/{name}", "/v2/models/{name}/ready",
                 "/v2/models/{name}/infer", "/predict", "/attention", "/metrics"):
        assert path in paths

    def resolved(schema: dict) -> dict:
        ref = schema.get("$ref", "")
        return openapi["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema

    # The protocol's request body is documented, down to the fields of an input tensor.
    body = resolved(paths["/v2/models/{name}/infer"]["post"]["requestBody"]["content"]["application/json"]["schema"])
    assert body["required"] == ["inputs"]
    tensor = resolved(body["properties"]["inputs"]["items"])
    assert set(tensor["required"]) == {"name", "shape", "datatype", "data"}
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert page.status_code == 200 and '"model": "tiny"' in page.text and '"attention": true' in page.text


# ------------------------------------------------------------------------------------ inference
def test_infer_pixel_values_matches_transformers(server, checkpoint):
    hf_model, _ = checkpoint
    files = [image_bytes(1), image_bytes(2, (64, 200))]
    pixels = torch.stack([preprocess(Image.open(io.BytesIO(f)), PreprocessConfig()) for f in files])  # [2, 3, 224, 224]
    request = {"id": "req-1", "parameters": {"top_k": 3},
               "inputs": [{"name": "pixel_values", "shape": list(pixels.shape), "datatype": "FP32",
                           "data": pixels.reshape(-1).tolist()}]}
    response = httpx.post(f"{server.url}/v2/models/tiny/infer", json=request, timeout=60)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_name"] == "tiny" and body["id"] == "req-1"
    out = {o["name"]: o for o in body["outputs"]}
    with torch.no_grad():
        expected = hf_model(pixels).logits.softmax(-1)  # [2, 7]
    probabilities = torch.tensor(out["probabilities"]["data"]).view(out["probabilities"]["shape"])
    torch.testing.assert_close(probabilities, expected, atol=1e-5, rtol=1e-4)
    top = expected.topk(3, dim=-1)
    assert out["top_k_indices"]["shape"] == [2, 3] and out["top_k_indices"]["data"] == top.indices.reshape(-1).tolist()
    labels = class_labels(load_model(checkpoint[1]))  # transformers' placeholder LABEL_i names read as class_i
    assert out["top_k_labels"]["data"] == [labels[i] for i in top.indices.reshape(-1).tolist()]
    torch.testing.assert_close(torch.tensor(out["top_k_scores"]["data"]), top.values.reshape(-1), atol=1e-5, rtol=1e-4)


def test_infer_bytes_and_predict_match_cvt_predict(server, checkpoint, tmp_path):
    files = [tmp_path / "a.png", tmp_path / "b.jpg"]
    files[0].write_bytes(image_bytes(3))
    files[1].write_bytes(image_bytes(4, (300, 120), "JPEG"))
    expected = predict_cli(checkpoint[1], files, top_k=3)
    with httpx.Client(base_url=server.url, timeout=60) as c:
        infer = c.post("/v2/models/tiny/infer", json={
            "parameters": {"top_k": 3}, "outputs": [{"name": "top_k_labels"}, {"name": "top_k_scores"}],
            "inputs": [{"name": "image_bytes", "shape": [2], "datatype": "BYTES", "data": [b64(f.read_bytes()) for f in files]}]})
        multipart = c.post("/predict?top_k=3", files=[("file", (f.name, f.read_bytes())) for f in files])
        raw = c.post("/predict?top_k=3", content=files[1].read_bytes(), headers={"content-type": "image/jpeg"})
    assert infer.status_code == multipart.status_code == raw.status_code == 200
    outputs = infer.json()["outputs"]
    assert [o["name"] for o in outputs] == ["top_k_labels", "top_k_scores"]
    assert outputs[0]["data"] == [e["label"] for row in expected for e in row["top_k"]]
    np.testing.assert_allclose(outputs[1]["data"], [e["score"] for row in expected for e in row["top_k"]], atol=2e-6)
    assert multipart.json() == [{**row, "path": f.name} for row, f in zip(expected, files)]
    assert raw.json() == [{**expected[1], "path": "body"}]


def test_attention_overlay_matches_attention_maps(server, checkpoint):
    from torchcvt.attention_maps import cls_attention, overlay, upsample
    from torchcvt.transforms import denormalize

    data = image_bytes(5, (150, 100))
    response = httpx.post(f"{server.url}/attention", files={"file": ("x.png", data)}, timeout=60)
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    shown = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.int16)
    pre = PreprocessConfig()
    pixels = preprocess(Image.open(io.BytesIO(data)), pre)
    maps, _ = cls_attention(load_model(checkpoint[1]).eval(), pixels)
    heat = upsample(maps.mean(0, keepdim=True), (224, 224))[0].numpy()
    expected = np.round(overlay(denormalize(pixels, pre.mean, pre.std).permute(1, 2, 0).numpy(), heat) * 255)
    assert shown.shape == (224, 224, 3)
    assert np.abs(shown - expected).max() <= 1


def test_concurrent_requests_all_succeed_with_one_answer_per_image(server):
    images = [image_bytes(10 + i, (64 + 16 * i, 64)) for i in range(4)]

    def ask(i: int) -> tuple[int, int, str]:
        with httpx.Client(timeout=120) as c:
            r = c.post(f"{server.url}/predict", content=images[i % 4], headers={"content-type": "image/png"})
        return i % 4, r.status_code, r.text

    with ThreadPoolExecutor(max_workers=64) as pool:
        results = list(pool.map(ask, range(256)))
    assert [status for _, status, _ in results] == [200] * 256, [t for _, s, t in results if s != 200][:3]
    # One answer per image whatever batch it ran in: the same labels in the same order, and the same scores
    # to the 6 decimals the JSON carries. A batch's make-up moves a row's float32 rounding by ~1e-8, which can
    # carry a score across a 6-decimal boundary: one unit in the last place is the same answer.
    answers = {i: [json.loads(text) for j, _, text in results if j == i] for i in range(4)}
    for i, replies in answers.items():
        first = replies[0][0]["top_k"]
        for reply in replies:
            (image,) = reply
            prediction = image["top_k"]
            assert [(p["index"], p["label"]) for p in prediction] == [(p["index"], p["label"]) for p in first], i
            assert all(abs(p["score"] - q["score"]) <= 1.5e-6 for p, q in zip(prediction, first)), (i, prediction, first)
    assert len({json.dumps(a[0]) for a in answers.values()}) == 4  # four images, four different answers
    metrics = httpx.get(f"{server.url}/metrics", timeout=ANSWER_LIMIT).text
    batches = re.search(r"^cvt_batch_size_count ([\d.]+)$", metrics, re.M)
    images_done = re.search(r"^cvt_images_total ([\d.]+)$", metrics, re.M)
    assert batches and images_done and float(batches[1]) < float(images_done[1])  # some batches held several images


def test_metrics_count_requests_and_images(server):
    def scrape() -> dict[str, float]:
        text = httpx.get(f"{server.url}/metrics", timeout=ANSWER_LIMIT).text
        return {m[1]: float(m[2]) for m in re.finditer(r"^(\S+) ([0-9.e+-]+)$", text, re.M)}

    before = scrape()
    files = [("file", (f"{i}.png", image_bytes(20 + i))) for i in range(3)]
    assert httpx.post(f"{server.url}/predict", files=files, timeout=60).status_code == 200
    assert httpx.post(f"{server.url}/predict?top_k=0", content=b"x", headers={"content-type": "image/png"},
                      timeout=ANSWER_LIMIT).status_code == 400
    after = scrape()
    ok = 'cvt_requests_total{endpoint="/predict",status="200"}'
    bad = 'cvt_requests_total{endpoint="/predict",status="400"}'
    assert after[ok] - before.get(ok, 0) == 1 and after[bad] - before.get(bad, 0) == 1
    assert after["cvt_images_total"] - before["cvt_images_total"] == 3
    assert after['cvt_request_duration_seconds_count{endpoint="/predict"}'] - before.get(
        'cvt_request_duration_seconds_count{endpoint="/predict"}', 0) == 2
    assert "cvt_queue_depth" in after and "cvt_shed_images_total" in after and "cvt_images_per_second" in after and "cvt_batch_size_sum" in after


# --------------------------------------------------------------------------------- bad requests
def truncated_png() -> bytes:
    return image_bytes(30, (200, 200))[:1500]


def infer_body(name="image_bytes", datatype="BYTES", shape=(1,), data=None) -> dict:
    return {"inputs": [{"name": name, "datatype": datatype, "shape": list(shape),
                        "data": data if data is not None else [b64(image_bytes(31))]}]}


BAD_REQUESTS = {
    "not an image": ("POST", "/predict", {"content": b"GIF89a? not really", "headers": {"content-type": "image/gif"}}, 400, "not an image"),
    "empty body": ("POST", "/predict", {"content": b"", "headers": {"content-type": "image/png"}}, 400, "empty"),
    "truncated image": ("POST", "/predict", {"files": {"file": ("t.png", truncated_png())}}, 400, "t.png"),
    "form without file": ("POST", "/predict", {"files": {"image": ("a.png", image_bytes(1))}}, 400, "`file`"),
    "unsupported content type": ("POST", "/predict", {"json": {"a": 1}}, 415, "Content-Type"),
    "top_k zero": ("POST", "/predict?top_k=0", {"content": image_bytes(1), "headers": {"content-type": "image/png"}}, 400, "top_k"),
    "top_k not a number": ("POST", "/predict?top_k=many", {"content": image_bytes(1), "headers": {"content-type": "image/png"}}, 400, "top_k"),
    "unknown model (metadata)": ("GET", "/v2/models/resnet", {}, 404, "resnet"),
    "unknown model (ready)": ("GET", "/v2/models/resnet/ready", {}, 404, "resnet"),
    "unknown model (infer)": ("POST", "/v2/models/resnet/infer", {"json": infer_body()}, 404, "resnet"),
    "malformed JSON": ("POST", "/v2/models/tiny/infer", {"content": b'{"inputs": [', "headers": {"content-type": "application/json"}}, 400, "malformed JSON"),
    "missing inputs": ("POST", "/v2/models/tiny/infer", {"json": {"id": "1"}}, 400, "inputs"),
    "missing datatype": ("POST", "/v2/models/tiny/infer", {"json": {"inputs": [{"name": "image_bytes", "shape": [1], "data": ["x"]}]}}, 400, "datatype"),
    "no input": ("POST", "/v2/models/tiny/infer", {"json": {"inputs": []}}, 400, "exactly one input"),
    "unknown input": ("POST", "/v2/models/tiny/infer", {"json": infer_body(name="image")}, 400, "unknown input"),
    "wrong datatype": ("POST", "/v2/models/tiny/infer", {"json": infer_body(name="pixel_values", datatype="INT8")}, 400, "FP32"),
    "wrong shape": ("POST", "/v2/models/tiny/infer", {"json": infer_body("pixel_values", "FP32", (1, 3, 32, 32), [0.0] * 3072)}, 400, "[B, 3, 224, 224]"),
    "data does not fill the shape": ("POST", "/v2/models/tiny/infer", {"json": infer_body("pixel_values", "FP32", (1, 3, 224, 224), [0.0] * 10)}, 400, "150528"),
    "non-numeric pixels": ("POST", "/v2/models/tiny/infer", {"json": infer_body("pixel_values", "FP32", (1, 3, 224, 224), ["a"] * 150528)}, 400, "numbers"),
    "not base64": ("POST", "/v2/models/tiny/infer", {"json": infer_body(data=["%%%"])}, 400, "base64"),
    "base64 of a non-image": ("POST", "/v2/models/tiny/infer", {"json": infer_body(data=[b64(b"hello")])}, 400, "image_bytes[0]"),
    "bytes shape mismatch": ("POST", "/v2/models/tiny/infer", {"json": infer_body(shape=(2,))}, 400, "needs 2"),
    "unknown output": ("POST", "/v2/models/tiny/infer", {"json": {**infer_body(), "outputs": [{"name": "logits"}]}}, 400, "unknown output"),
    "bad top_k parameter": ("POST", "/v2/models/tiny/infer", {"json": {**infer_body(), "parameters": {"top_k": "5"}}}, 400, "top_k"),
    "unknown path": ("GET", "/v3/whatever", {}, 404, "Not Found"),
    "wrong method": ("GET", "/predict", {}, 405, "Method Not Allowed"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_request_gets_a_one_line_error_and_the_server_goes_on(server, case):
    method, path, kwargs, status, word = BAD_REQUESTS[case]
    with httpx.Client(base_url=server.url, timeout=60) as c:
        assert_error(c.request(method, path, **kwargs), status, word)
        assert c.post("/predict", content=image_bytes(1), headers={"content-type": "image/png"}).status_code == 200


def test_limits_pixels_and_body_size(strict_server):
    big = io.BytesIO()
    Image.new("1", (1500, 1000)).save(big, format="PNG")  # 1.5 Mpx in a few hundred bytes
    with httpx.Client(base_url=strict_server.url, timeout=60) as c:
        assert_error(c.post("/predict", files={"file": ("big.png", big.getvalue())}), 400, "big.png", "too large", "1500x1000")
        body = b"\0" * (1024 * 1024 + 1)
        assert_error(c.post("/predict", content=body, headers={"content-type": "image/png"}), 413, "limit")
        def chunks(data: bytes):  # no Content-Length: chunked
            return (data[i:i + 65536] for i in range(0, len(data), 65536))

        assert_error(c.post("/predict", content=chunks(body), headers={"content-type": "image/png"}), 413, "limit")
        too_long = json.dumps(infer_body(data=[b64(body)])).encode()
        for headers in ({}, {"content-type": "application/json"}):  # FastAPI's JSON parsing, if it did any
            assert_error(c.post("/v2/models/tiny/infer", content=chunks(too_long), headers=headers), 413, "limit")
        infer = infer_body("image_bytes", "BYTES", (3,), [b64(image_bytes(1))] * 3)
        assert_error(c.post("/v2/models/tiny/infer", json=infer), 413, "at most 2")
        assert c.get("/v2/health/ready").status_code == 200


def test_full_queue_answers_503_with_retry_after_and_slow_requests_504(strict_server):
    # Two requests may be in flight; each waits for the 3 s batching delay and passes its 1 s timeout.
    def ask(_):
        with httpx.Client(timeout=60) as c:
            return c.post(f"{strict_server.url}/predict", content=image_bytes(2), headers={"content-type": "image/png"})

    with ThreadPoolExecutor(max_workers=12) as pool:
        responses = list(pool.map(ask, range(12)))
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {503, 504} and 503 in statuses and 504 in statuses, statuses
    for r in responses:
        assert_error(r, r.status_code, "retry" if r.status_code == 503 else "--timeout")
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1


# ----------------------------------------------------------------------------------- shutdown
def test_sigterm_during_load_answers_every_accepted_request(checkpoint, tmp_path):
    s = Server(checkpoint[1], "--max-batch-size", "4", "--max-delay-ms", "50", log=tmp_path / "server.log")
    image = image_bytes(40)
    outcomes: list[str] = []  # "200", another status, or "no connection" (refused or reset: never accepted)
    got_enough = threading.Event()
    lock = threading.Lock()

    def hammer() -> None:
        while True:
            try:
                # A new connection per request: no request can be caught on an idle keep-alive connection.
                with httpx.Client(timeout=120, headers={"connection": "close"}) as c:
                    r = c.post(f"{s.url}/predict", content=image, headers={"content-type": "image/png"})
                with lock:
                    outcomes.append(str(r.status_code))
                    if outcomes.count("200") >= 10:
                        got_enough.set()
            except httpx.TransportError:
                with lock:
                    outcomes.append("no connection")
                if s.process.poll() is not None:
                    return

    threads = [threading.Thread(target=hammer) for _ in range(16)]
    for t in threads:
        t.start()
    assert got_enough.wait(timeout=600)
    status = s.stop()
    for t in threads:
        t.join(timeout=120)
    assert status == 0, s.log()
    answered = re.search(r"answered (\d+) of (\d+) accepted requests", s.log())
    assert answered, s.log()
    assert answered[1] == answered[2]  # nothing accepted was dropped
    responses = [o for o in outcomes if o != "no connection"]
    assert set(responses) == {"200"}
    assert len(responses) + s.ready_polls == int(answered[1])  # every answer reached its client


# ------------------------------------------------------------------------------------ the CLI
def test_cli_errors_are_one_line(tmp_path):
    def cvt(*args):
        return subprocess.run([sys.executable, "-m", "torchcvt", "serve", *args], capture_output=True, text=True,
                              env={"PYTHONPATH": str(ROOT / "src"), "PATH": ""}, timeout=300)

    missing = cvt("--weights", str(tmp_path / "nothing-here"))
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and missing.stderr.count("\n") == 1
    workers = cvt("--weights", "cvt-tiny", "--workers", "0")
    assert workers.returncode == 1 and "--workers" in workers.stderr
    pixels = cvt("--weights", "cvt-tiny", "--max-pixels", "-1")  # parsed as cvt predict parses it
    assert pixels.returncode == 2 and "--max-pixels: must be >= 0 (0: no limit)" in pixels.stderr


@pytest.mark.slow
def test_workers_share_one_metrics_view(checkpoint, tmp_path):
    s = Server(checkpoint[1], "--workers", "2", log=tmp_path / "server.log")
    try:
        with httpx.Client(base_url=s.url, timeout=120) as c:
            for i in range(12):
                assert c.post("/predict", content=image_bytes(i), headers={"content-type": "image/png",
                                                                            "connection": "close"}).status_code == 200
            pids = set(re.findall(r"Started server process \[(\d+)\]", s.log()))
            # Whichever worker answers the scrape, it reports the sum over both.
            for _ in range(4):
                text = c.get("/metrics", headers={"connection": "close"}).text
                assert re.search(r'^cvt_images_total 12\.0$', text, re.M), text
                assert re.search(r'^cvt_requests_total\{endpoint="/predict",status="200"\} 12\.0$', text, re.M)
        assert len(pids) == 2
    finally:
        assert s.stop() == 0, s.log()
