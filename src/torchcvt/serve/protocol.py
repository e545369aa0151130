"""The Open Inference Protocol v2 (KServe V2) as this server speaks it over REST.

Request and response bodies are pydantic models, which validate them and document them on the
OpenAPI page; ``read_request`` parses an ``infer`` body (the server runs it in a thread, off the
event loop). One model, two ways to send images (exactly one input per request):

* ``pixel_values``, FP32 ``[B, 3, S, S]``: pixels already preprocessed as the weights expect
  (normalised, ``S`` the model's input size), nested or flattened in row-major order;
* ``image_bytes``, BYTES ``[B]``: encoded image files (JPEG, PNG, ...), each a base64 string, as
  the protocol's implementations carry binary data in JSON. The server preprocesses them.

Outputs (all by default; ``outputs`` in the request selects some): ``probabilities`` FP32
``[B, num_classes]`` (softmax), ``top_k_labels`` BYTES ``[B, k]``, ``top_k_indices`` INT64
``[B, k]`` and ``top_k_scores`` FP32 ``[B, k]``, best first; ``k`` is the request parameter
``top_k`` (default 5, capped at the number of classes). Errors are ``{"error": "<one line>"}``.
"""

from __future__ import annotations

import base64
import binascii
import math
from typing import Any, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel, ValidationError

PIXELS, IMAGE_BYTES = "pixel_values", "image_bytes"
OUTPUTS = ("probabilities", "top_k_labels", "top_k_indices", "top_k_scores")
DEFAULT_TOP_K = 5

Parameters = dict[str, Any]


class RequestError(Exception):
    """A request the server refuses: HTTP ``status`` and a one-line message (``{"error": message}``)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


# ------------------------------------------------------------------------------------ schemas
class ErrorResponse(BaseModel):
    error: str


class MetadataTensor(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class ReadyResponse(BaseModel):
    name: str
    ready: bool


class LiveResponse(BaseModel):
    live: bool


class ServerReadyResponse(BaseModel):
    ready: bool


class InferTensor(BaseModel):
    """A request's input and a response's output have the same fields in the protocol."""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any]


class RequestInput(InferTensor):
    pass


class RequestOutput(BaseModel):
    name: str
    parameters: Parameters | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: Parameters | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(InferTensor):
    pass


class InferenceResponse(BaseModel):
    model_name: str
    id: str | None = None
    parameters: Parameters | None = None
    outputs: list[ResponseOutput]


# ------------------------------------------------------------------------------------ metadata
def model_metadata(name: str, platform: str, image_size: int, num_classes: int) -> ModelMetadata:
    """Inputs and outputs of the model; -1 marks the free batch (and top-k) dimension."""
    s = image_size
    return ModelMetadata(
        name=name,
        platform=platform,
        inputs=[MetadataTensor(name=PIXELS, datatype="FP32", shape=[-1, 3, s, s]),
                MetadataTensor(name=IMAGE_BYTES, datatype="BYTES", shape=[-1])],
        outputs=[MetadataTensor(name="probabilities", datatype="FP32", shape=[-1, num_classes]),
                 MetadataTensor(name="top_k_labels", datatype="BYTES", shape=[-1, -1]),
                 MetadataTensor(name="top_k_indices", datatype="INT64", shape=[-1, -1]),
                 MetadataTensor(name="top_k_scores", datatype="FP32", shape=[-1, -1])],
    )


def inline_schema(model: type[BaseModel]) -> dict:
    """``model``'s JSON schema with its nested models written out in place (no ``$ref``), for the
    OpenAPI page of a route that reads its body itself."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        return [resolve(value) for value in node] if isinstance(node, list) else node

    return resolve(schema)


# ------------------------------------------------------------------------------------ requests
class Inference(NamedTuple):
    """A checked ``infer`` request: its images (pixels, or encoded files to decode) and what to answer."""

    id: str | None
    top_k: int
    outputs: list[str]
    pixels: torch.Tensor | None  # [B, 3, S, S] of a pixel_values input, else None
    files: list[bytes]  # the encoded images of an image_bytes input, else empty


def read_request(body: bytes, image_size: int, num_classes: int, max_images: int) -> Inference:
    """Parse and check the JSON body of an ``infer`` request (pydantic's own JSON parser: about five
    times faster than ``json.loads`` on a large tensor; still CPU work to keep off the event loop)."""
    try:
        request = InferenceRequest.model_validate_json(body)
    except ValidationError as exc:
        raise RequestError(400, validation_message(exc.errors())) from None
    tensor = the_input(request)
    k = top_k_of(request.parameters, num_classes)
    outputs = requested_outputs(request)
    if tensor.name == PIXELS:
        return Inference(request.id, k, outputs, pixels_of(tensor, image_size, max_images), [])
    return Inference(request.id, k, outputs, None, encoded_images(tensor, max_images))


def validation_message(errors: list[dict]) -> str:
    """A list of pydantic (or FastAPI) validation errors as one line about the first."""
    first = errors[0] if errors else {}
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query"))
    if first.get("type") == "json_invalid":
        return f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg', ''))}"
    if first.get("type") == "missing":
        return f"missing field {where!r}"
    return f"{where or 'body'}: {first.get('msg', 'invalid')}"


def the_input(request: InferenceRequest) -> RequestInput:
    """The request's one input, checked by name and datatype."""
    if len(request.inputs) != 1:
        raise RequestError(400, f"expected exactly one input ({PIXELS} or {IMAGE_BYTES}), got {len(request.inputs)}")
    tensor = request.inputs[0]
    expected = {PIXELS: "FP32", IMAGE_BYTES: "BYTES"}.get(tensor.name)
    if expected is None:
        raise RequestError(400, f"unknown input {tensor.name!r}: expected {PIXELS} (FP32) or {IMAGE_BYTES} (BYTES)")
    if tensor.datatype != expected:
        raise RequestError(400, f"input {tensor.name!r} must have datatype {expected}, got {tensor.datatype!r}")
    if not tensor.shape or any(d < 1 for d in tensor.shape):
        raise RequestError(400, f"input {tensor.name!r}: shape must be positive integers, got {tensor.shape}")
    return tensor


def pixels_of(tensor: RequestInput, image_size: int, max_images: int) -> torch.Tensor:
    """The ``[B, 3, S, S]`` float32 batch of a ``pixel_values`` input."""
    s = image_size
    if len(tensor.shape) != 4 or tensor.shape[1:] != [3, s, s]:
        raise RequestError(400, f"input {PIXELS!r}: expected shape [B, 3, {s}, {s}], got {tensor.shape}")
    _check_batch(tensor.shape[0], max_images)
    try:
        values = np.asarray(tensor.data, dtype=np.float32)
    except (ValueError, TypeError, OverflowError):  # OverflowError: an integer too large for a float
        raise RequestError(400, f"input {PIXELS!r}: data must be numbers in row-major order, nested or flat") from None
    if values.size != math.prod(tensor.shape):
        raise RequestError(400, f"input {PIXELS!r}: shape {tensor.shape} needs {math.prod(tensor.shape)} values, "
                                f"got {values.size}")
    if not np.isfinite(values).all():
        raise RequestError(400, f"input {PIXELS!r}: data contains NaN or infinity")
    return torch.from_numpy(values.reshape(tensor.shape))


def encoded_images(tensor: RequestInput, max_images: int) -> list[bytes]:
    """The decoded base64 strings of an ``image_bytes`` input, one encoded file each."""
    items = [x for row in tensor.data for x in (row if isinstance(row, list) else [row])]  # [B] or [B, 1]
    if len(tensor.shape) not in (1, 2) or (len(tensor.shape) == 2 and tensor.shape[1] != 1):
        raise RequestError(400, f"input {IMAGE_BYTES!r}: expected shape [B] or [B, 1], got {tensor.shape}")
    if len(items) != tensor.shape[0]:
        raise RequestError(400, f"input {IMAGE_BYTES!r}: shape {tensor.shape} needs {tensor.shape[0]} strings, "
                                f"got {len(items)}")
    _check_batch(len(items), max_images)
    files = []
    for i, item in enumerate(items):
        if not isinstance(item, str):
            raise RequestError(400, f"input {IMAGE_BYTES!r}[{i}]: expected a base64 string, got {type(item).__name__}")
        try:
            files.append(base64.b64decode(item, validate=True))
        except (binascii.Error, ValueError):
            raise RequestError(400, f"input {IMAGE_BYTES!r}[{i}]: not valid base64") from None
    return files


def _check_batch(n: int, max_images: int) -> None:
    if n > max_images:
        raise RequestError(413, f"{n} images in one request; this server takes at most {max_images}")


def top_k_of(parameters: Parameters | None, num_classes: int) -> int:
    """The ``top_k`` request parameter (default 5), capped at the number of classes."""
    k = (parameters or {}).get("top_k", DEFAULT_TOP_K)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise RequestError(400, f"parameter top_k must be a positive integer, got {k!r}")
    return min(k, num_classes)


def requested_outputs(request: InferenceRequest) -> list[str]:
    if not request.outputs:
        return list(OUTPUTS)
    names = [o.name for o in request.outputs]
    unknown = [n for n in names if n not in OUTPUTS]
    if unknown:
        raise RequestError(400, f"unknown output {unknown[0]!r}: this model has {', '.join(OUTPUTS)}")
    return names


# ----------------------------------------------------------------------------------- responses
def response_outputs(probabilities: torch.Tensor, labels: list[str], k: int, names: list[str]) -> list[ResponseOutput]:
    """The requested outputs for ``[B, C]`` probabilities, flattened in row-major order."""
    batch = probabilities.shape[0]
    scores, indices = probabilities.topk(k, dim=-1)
    tensors = {
        "probabilities": ("FP32", list(probabilities.shape), lambda: probabilities.reshape(-1).tolist()),
        "top_k_labels": ("BYTES", [batch, k], lambda: [labels[i] for i in indices.reshape(-1).tolist()]),
        "top_k_indices": ("INT64", [batch, k], lambda: indices.reshape(-1).tolist()),
        "top_k_scores": ("FP32", [batch, k], lambda: scores.reshape(-1).tolist()),
    }
    return [ResponseOutput(name=n, datatype=tensors[n][0], shape=tensors[n][1], data=tensors[n][2]()) for n in names]
