"""The deployment files agree with the server: the Dockerfile's port and install order, the KServe
runtime's arguments (parsed by ``cvt serve``'s own parser), its probes (routes the app has), and the
InferenceService's reference to the runtime. deploy/kserve/check_manifests.py checks the field
names against the kserve SDK; this test needs no SDK."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
pytest.importorskip("fastapi", reason="cvt serve needs the serve extra: pip install -e '.[serve]'")

from torchcvt.cli import build_parser  # noqa: E402
from torchcvt.serve.app import create_app  # noqa: E402
from torchcvt.serve.settings import ServeSettings  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KSERVE = ROOT / "deploy" / "kserve"


def load(name: str) -> dict:
    (document,) = list(yaml.safe_load_all((KSERVE / name).read_text()))
    return document


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_installs_cpu_torch_first_and_serves_on_8080():
    steps = dockerfile_instructions()
    runs = [arg for op, arg in steps if op == "RUN"]
    torch_step = next(i for i, r in enumerate(runs) if "torch==2.13.0" in r)
    package_step = next(i for i, r in enumerate(runs) if '".[serve]"' in r)
    assert torch_step < package_step and "/whl/cpu" in runs[torch_step]
    entrypoint = yaml.safe_load(next(arg for op, arg in steps if op == "ENTRYPOINT"))
    command = yaml.safe_load(next(arg for op, arg in steps if op == "CMD"))
    assert entrypoint[:2] == ["cvt", "serve"]
    args = build_parser().parse_args(entrypoint[1:] + command)
    assert (args.host, args.port, args.weights) == ("0.0.0.0", 8080, "/mnt/models")
    assert ("EXPOSE", "8080") in steps


def test_kserve_runtime_speaks_v2_on_the_container_port():
    runtime, service = load("servingruntime.yaml"), load("inferenceservice.yaml")
    spec = runtime["spec"]
    assert runtime["kind"] == "ServingRuntime" and spec["protocolVersions"] == ["v2"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"
    # The image's entry point plus the runtime's args must be a valid `cvt serve` command line.
    entrypoint = yaml.safe_load(next(arg for op, arg in dockerfile_instructions() if op == "ENTRYPOINT"))
    args = build_parser().parse_args(entrypoint[1:] + [a.replace("{{.Name}}", "cvt-13") for a in container["args"]])
    assert args.weights == "/mnt/models" and args.name == "cvt-13"
    assert [p["containerPort"] for p in container["ports"]] == [args.port]
    routes = {route.path for route in create_app(ServeSettings(weights="x", name="cvt-13")).routes}
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/v2/health/ready"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/v2/health/live"
    assert all(p["path"] in routes and p["port"] == args.port for p in probes.values())
    assert spec["annotations"]["prometheus.kserve.io/path"] in routes

    model = service["spec"]["predictor"]["model"]
    assert service["kind"] == "InferenceService" and model["protocolVersion"] == "v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["modelFormat"]["name"] in {f["name"] for f in spec["supportedModelFormats"]}
    # Graceful shutdown needs the request timeout (plus uvicorn's grace) inside the pod's grace period.
    assert service["spec"]["predictor"]["terminationGracePeriodSeconds"] > args.timeout + 5
    assert all(isinstance(a, str) for a in container["args"])  # Kubernetes passes strings only
