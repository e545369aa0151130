"""The same classification service on the other candidate libraries, to measure them against
``cvt serve`` (FastAPI + uvicorn) with ``benchmarks/serve_load.py`` (docs/serving.md has the figures).

    python benchmarks/serving_candidates.py litserve --weights DIR --port 8001
    python benchmarks/serving_candidates.py kserve   --weights DIR --port 8002   # the kserve SDK
    python benchmarks/serving_candidates.py mlserver --weights DIR --port 8003
    python benchmarks/serve_load.py --url http://127.0.0.1:8001 --name model --server-pid PID --concurrency 1 32

Each answers ``POST /v2/models/NAME/infer`` with one base64 BYTES image (the load script's
request) using torchcvt's own ``ModelService`` for decode, preprocessing and the forward pass, so
only the serving layer differs: LitServe and MLServer batch with their own batchers
(``--max-batch-size``, ``--max-delay-ms``); the kserve SDK has no batcher in the server (KServe
batches in a sidecar in the cluster), so it runs one request per forward pass. Each library is
installed in a venv of its own (``pip install -c constraints.txt litserve`` with ``torch==2.13.0``
in the constraints, so that none of them replaces the CPU torch). ``--threads`` fixes PyTorch's
threads in whichever process loads the model (``cvt serve --threads`` for the FastAPI server): on a
shared 2-core machine two threads are many times slower than one, which would swamp any difference
between the libraries.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import torch

NAME = "model"


def load_service(weights: str):
    from torchcvt import Classifier
    from torchcvt.serve.model import ModelService

    if os.environ.get("OMP_NUM_THREADS"):  # --threads; read here, in the process that runs the model
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

    return ModelService(Classifier(weights, device="cpu"), NAME)


def top5(service, probabilities: torch.Tensor) -> dict:
    scores, indices = probabilities.topk(min(5, service.num_classes), dim=-1)
    return {"top_k_labels": [[service.labels[i] for i in row] for row in indices.tolist()], "top_k_scores": scores.tolist()}


def decode_all(service, strings: list[str]) -> torch.Tensor:
    return torch.stack([service.decode(base64.b64decode(s), "image") for s in strings])


# ------------------------------------------------------------------------------------ LitServe
try:  # LitServe pickles the API object into its worker process: the class lives at module level
    import litserve as ls

    class ClassifierAPI(ls.LitAPI):
        def __init__(self, weights: str, **options) -> None:
            super().__init__(**options)
            self.weights = weights

        def setup(self, device):
            self.service = load_service(self.weights)

        def decode_request(self, request):
            return self.service.decode(base64.b64decode(request["inputs"][0]["data"][0]), "image")

        def batch(self, inputs):
            return torch.stack(inputs)

        def predict(self, pixels):
            return self.service.forward(pixels if pixels.ndim == 4 else pixels[None])

        def unbatch(self, output):
            return list(output)

        def encode_response(self, probabilities):
            out = top5(self.service, probabilities[None])
            return {"model_name": NAME, "outputs": [{"name": "top_k_labels", "datatype": "BYTES", "shape": [1, 5],
                                                     "data": out["top_k_labels"][0]}]}
except ImportError:
    pass


def run_litserve(args: argparse.Namespace) -> None:
    import litserve as ls

    api = ClassifierAPI(args.weights, max_batch_size=args.max_batch_size, batch_timeout=args.max_delay_ms / 1000,
                        api_path=f"/v2/models/{NAME}/infer")
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1, timeout=120)
    server.run(host="127.0.0.1", port=args.port, generate_client_file=False, log_level="warning")


# ------------------------------------------------------------------------------------ kserve SDK
def run_kserve(args: argparse.Namespace) -> None:
    from kserve import InferOutput, InferResponse, Model, ModelServer

    class ClassifierModel(Model):
        def load(self) -> bool:
            self.service = load_service(args.weights)
            self.ready = True
            return True

        def predict(self, payload, headers=None, response_headers=None):
            strings = payload.inputs[0].data
            probabilities = self.service.forward(decode_all(self.service, strings))
            out = top5(self.service, probabilities)
            labels = InferOutput(name="top_k_labels", shape=[len(strings), 5], datatype="BYTES",
                                 data=[label for row in out["top_k_labels"] for label in row])
            return InferResponse(model_name=NAME, infer_outputs=[labels], response_id=payload.id or str(uuid.uuid4()))

    model = ClassifierModel(NAME)
    model.load()
    ModelServer(http_port=args.port, grpc_port=args.port + 1000, enable_grpc=False, workers=1).start([model])


# ------------------------------------------------------------------------------------ MLServer
def run_mlserver(args: argparse.Namespace) -> None:
    folder = Path(tempfile.mkdtemp(prefix="mlserver-"))
    (folder / "settings.json").write_text(json.dumps({
        "http_port": args.port, "grpc_port": args.port + 1000, "metrics_port": args.port + 2000,
        "host": "127.0.0.1", "parallel_workers": args.parallel_workers}))
    (folder / "model-settings.json").write_text(json.dumps({
        "name": NAME, "implementation": "serving_candidates.MLServerModel",
        "max_batch_size": args.max_batch_size, "max_batch_time": args.max_delay_ms / 1000,
        "parameters": {"uri": str(Path(args.weights).resolve())}}))
    env_path = str(Path(__file__).resolve().parent)
    subprocess.run([sys.executable, "-m", "mlserver.cli.main", "start", str(folder)], check=True,
                   env={**os.environ, "PYTHONPATH": env_path + ":" + os.environ.get("PYTHONPATH", "")})


try:  # MLServer imports this module by name to find the model class
    from mlserver import MLModel
    from mlserver.codecs import StringCodec
    from mlserver.types import InferenceResponse, ResponseOutput

    class MLServerModel(MLModel):
        async def load(self) -> bool:
            self.service = load_service(self.settings.parameters.uri)
            return True

        async def predict(self, payload):
            strings = [s.decode() if isinstance(s, bytes) else s for s in payload.inputs[0].data.root]
            probabilities = self.service.forward(decode_all(self.service, strings))
            out = top5(self.service, probabilities)
            labels = [label for row in out["top_k_labels"] for label in row]
            return InferenceResponse(model_name=NAME, outputs=[ResponseOutput(
                name="top_k_labels", shape=[len(strings), 5], datatype="BYTES", data=labels)])
except ImportError:
    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("library", choices=("litserve", "kserve", "mlserver"))
    parser.add_argument("--weights", required=True)
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--parallel-workers", type=int, default=0, help="MLServer's inference pool processes (default: 0, in the server process)")
    parser.add_argument("--threads", type=int, help="PyTorch threads in the process that runs the model (default: every core)")
    args = parser.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # inherited by LitServe's and MLServer's workers
    {"litserve": run_litserve, "kserve": run_kserve, "mlserver": run_mlserver}[args.library](args)


if __name__ == "__main__":
    main()
