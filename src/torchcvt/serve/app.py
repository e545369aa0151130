"""The HTTP application: FastAPI routes for the Open Inference Protocol v2, ``POST /predict``,
``POST /attention``, ``GET /metrics`` and the upload page, around one ``ModelService``.

Every request path ends in a response: bad input is a ``RequestError`` (or FastAPI's validation
error, or a torchcvt ``ImageError``), answered as ``{"error": "<one line>"}`` with a 4xx status;
a full queue is 503 with ``Retry-After``; a request over ``--timeout`` is 504; anything else is a
500 with the exception's type, logged with its traceback, and the server goes on.

``ServingMiddleware`` (plain ASGI, around the routes) does what must happen before a body is read:
it refuses more concurrent inference requests than the queue can hold (503) and bodies over
``--max-body-mb`` (413), and it records every request in the metrics.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from importlib import resources
from typing import Annotated

import anyio
import torch
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from ..errors import ImageError
from ..version import __version__
from . import metrics, protocol
from .batching import DynamicBatcher, QueueFull
from .model import ModelService
from .protocol import RequestError
from .settings import ServeSettings

logger = logging.getLogger("uvicorn.error")  # uvicorn configures it, in every worker

INFERENCE_PATHS = ("/infer", "/predict", "/attention")  # path endings that queue work for the model
RAW_IMAGE_TYPES = ("image/", "application/octet-stream")


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


# ---------------------------------------------------------------------------------- middleware
class ServingMiddleware:
    """Admission (in-flight inference requests <= ``max_queue``), the body size limit, metrics,
    and the counts the shutdown log line reports."""

    def __init__(self, app, settings: ServeSettings, state) -> None:
        self.app, self.settings, self.state = app, settings, state
        state.middleware = self  # for the shutdown counts
        self.in_flight = 0
        self.accepted = 0
        self.answered = 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500
        self.accepted += 1

        async def send_and_record(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        inference = scope["method"] == "POST" and scope["path"].endswith(INFERENCE_PATHS)
        try:
            refusal = self._refusal(scope) if inference else None
            if refusal is not None:
                await refusal(scope, receive, send_and_record)
                return
            self.in_flight += inference
            try:
                await self.app(scope, self._limited(receive), send_and_record)
            finally:
                self.in_flight -= inference
        finally:
            self.answered += 1
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            metrics.record_request(endpoint, status, time.perf_counter() - started)

    def _refusal(self, scope) -> Response | None:
        batcher: DynamicBatcher = self.state.batcher
        # Requests in flight but not yet queued (still being read or decoded) bring at least one image each.
        ahead = max(0, self.in_flight - batcher.queued) + 1
        if self.in_flight >= self.settings.max_queue or batcher.expected_wait(ahead) > self.settings.max_wait_s:
            retry = str(batcher.retry_after())
            return error(503, f"overloaded ({self.in_flight} requests in flight, {batcher.queued} images queued); "
                              f"retry in {retry} s", {"Retry-After": retry})
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.settings.max_body_bytes:
            return error(413, f"request body of {int(declared)} bytes is over the limit of "
                              f"{self.settings.max_body_bytes} bytes (--max-body-mb {self.settings.max_body_mb:g})")
        return None

    def _limited(self, receive):
        """``receive`` that fails once a (chunked) body grows past the limit."""
        limit, received = self.settings.max_body_bytes, 0

        async def receive_limited():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException: whoever reads the body (a route, FastAPI's or Starlette's parsers)
                    # passes it on to the handler below, where another exception could become a 400.
                    raise HTTPException(413, f"request body over the limit of {limit} bytes "
                                             f"(--max-body-mb {self.settings.max_body_mb:g})")
            return message

        return receive_limited


# ----------------------------------------------------------------------------------------- app
def create_app(settings: ServeSettings, service: ModelService | None = None) -> FastAPI:
    """The server's app. ``service``: an already loaded model; None loads ``settings.weights`` at startup."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = app.state
        state.service = service or load_service(settings)
        throughput = metrics.Throughput()
        batcher = DynamicBatcher(
            state.service.forward, max_batch_size=settings.max_batch_size, max_delay=settings.max_delay_ms / 1000,
            max_queue=settings.max_queue, max_wait=settings.max_wait_s, on_batch=lambda n, s: metrics.record_batch(n, s, throughput),
            on_depth=metrics.QUEUE_DEPTH.set, on_shed=metrics.SHED.inc,
        )
        size = state.service.image_size
        await batcher.warm_up(torch.zeros(settings.max_batch_size, 3, size, size))
        batcher.start()
        state.batcher = batcher
        # Parsing and decoding threads, as many as the model's (load_service applied --threads by now).
        state.decode_limiter = anyio.CapacityLimiter(max(2, torch.get_num_threads()))

        async def update_rate() -> None:
            while True:
                throughput.update_gauge()
                await asyncio.sleep(1.0)

        rate_task = asyncio.get_running_loop().create_task(update_rate())
        logger.info("serving %s (%s backend) as %r: batches up to %d images, %.1f ms delay, queue %d",
                    settings.weights, state.service.backend, settings.name, settings.max_batch_size,
                    settings.max_delay_ms, settings.max_queue)
        yield
        middleware = state.middleware
        logger.info("shutting down: answered %d of %d accepted requests", middleware.answered, middleware.accepted)
        rate_task.cancel()
        await state.batcher.stop()
        metrics.worker_exited()

    app = FastAPI(
        title="torchcvt serve", version=__version__, lifespan=lifespan,
        description="CvT image classification: the Open Inference Protocol v2 (KServe V2) REST endpoints, "
                    "a plain upload endpoint, Prometheus metrics and an upload page at /.",
    )
    _add_error_handlers(app)
    _add_routes(app, settings)
    app.add_middleware(ServingMiddleware, settings=settings, state=app.state)
    return app


def create_app_from_environment() -> FastAPI:
    """The app of one worker process (uvicorn's factory): settings from the environment."""
    settings = ServeSettings.from_environment()
    return create_app(settings)


def load_service(settings: ServeSettings) -> ModelService:
    from ..inference import Classifier

    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    classifier = Classifier(settings.weights, device=settings.device, backend=settings.backend, precision=settings.precision,
                            max_pixels=settings.max_pixels, allow_nonfinite=settings.allow_nonfinite)
    return ModelService(classifier, settings.name)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, exc.headers)

    @app.exception_handler(ImageError)
    async def image_error(request: Request, exc: ImageError) -> JSONResponse:
        return error(400, str(exc))

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, exc: QueueFull) -> JSONResponse:
        return error(503, str(exc), {"Retry-After": str(exc.retry_after)})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(400, protocol.validation_message(exc.errors()))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, " ".join(str(exc.detail).split()), exc.headers)

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("error while answering %s %s", request.method, request.url.path)
        return error(500, f"internal error ({type(exc).__name__}); the server logged it and goes on")


# -------------------------------------------------------------------------------------- routes
def _add_routes(app: FastAPI, settings: ServeSettings) -> None:
    state = app.state
    page = resources.files(__package__).joinpath("static/index.html").read_text(encoding="utf-8")

    def model(name: str) -> ModelService:
        if name != settings.name:
            raise RequestError(404, f"unknown model {name!r}; this server serves {settings.name!r}")
        return state.service

    async def in_thread(function, *args):
        """``function(*args)`` in a worker thread, off the event loop; at most ``decode_limiter`` such
        calls (parsing, decoding) run at once, which bounds their memory."""
        return await anyio.to_thread.run_sync(function, *args, limiter=state.decode_limiter)

    async def decode(service: ModelService, files: list[tuple[bytes, str]]) -> torch.Tensor:
        """The ``[B, 3, S, S]`` pixels of a request's files, decoded concurrently; a bad file's error
        (the first in the request's order) is the answer."""
        tensors: list[torch.Tensor | None] = [None] * len(files)
        errors: list[Exception | None] = [None] * len(files)

        async def one(i: int, data: bytes, name: str) -> None:
            try:
                tensors[i] = await in_thread(service.decode, data, name)
            except Exception as error:  # a bad file; a cancellation (BaseException) goes through
                errors[i] = error

        # An anyio task group, not asyncio.gather: a timeout cancels through anyio's scopes, so each
        # decode keeps its limiter slot until its thread has finished and the limit stays a limit.
        async with anyio.create_task_group() as group:
            for i, (data, name) in enumerate(files):
                group.start_soon(one, i, data, name)
        for error in errors:
            if error is not None:
                raise error
        return torch.stack(tensors)

    def deadline() -> float:
        """When a request that starts now times out (``time.monotonic``, as the batcher keeps time)."""
        return time.monotonic() + settings.timeout_s

    async def within_timeout(work, due: float):
        """``await work`` until ``due`` (from ``deadline()``, taken when the request started), else 504."""
        try:
            # anyio's deadline, not asyncio.timeout: a worker thread it cancels keeps its limiter slot
            # until the thread returns (asyncio's cancel frees the slot while the thread still parses).
            with anyio.fail_after(max(0.0, due - time.monotonic())):
                return await work
        except TimeoutError:
            raise RequestError(504, f"no answer within --timeout {settings.timeout_s:g} s; the server is overloaded") from None

    # --------------------------------------------------------------- Open Inference Protocol v2
    @app.get("/v2", response_model=protocol.ServerMetadata, tags=["v2"])
    async def server_metadata():
        return protocol.ServerMetadata(name="torchcvt", version=__version__, extensions=[])

    @app.get("/v2/health/live", response_model=protocol.LiveResponse, tags=["v2"])
    async def live():
        return protocol.LiveResponse(live=True)

    # uvicorn listens only once the lifespan has loaded the model: whatever answers is ready.
    @app.get("/v2/health/ready", response_model=protocol.ServerReadyResponse, tags=["v2"])
    async def ready():
        return protocol.ServerReadyResponse(ready=True)

    @app.get("/v2/models/{name}", response_model=protocol.ModelMetadata, response_model_exclude_none=True, tags=["v2"],
             responses={404: {"model": protocol.ErrorResponse}})
    async def model_metadata(name: str):
        service = model(name)
        return protocol.model_metadata(name, f"pytorch_{service.backend}", service.image_size, service.num_classes)

    @app.get("/v2/models/{name}/ready", response_model=protocol.ReadyResponse, tags=["v2"],
             responses={404: {"model": protocol.ErrorResponse}})
    async def model_ready(name: str):
        model(name)
        return protocol.ReadyResponse(name=name, ready=True)

    @app.post("/v2/models/{name}/infer", response_model=protocol.InferenceResponse, response_model_exclude_none=True,
              tags=["v2"], responses={code: {"model": protocol.ErrorResponse} for code in (400, 404, 413, 503, 504)},
              openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
                  "schema": protocol.inline_schema(protocol.InferenceRequest)}}}})
    async def infer(name: str, request: Request):
        # The body is parsed here, in a thread, not by FastAPI on the event loop: JSON of a large
        # pixel_values tensor takes json.loads 20 ms per MiB, which every other request would wait for.
        service = model(name)
        due = deadline()
        body = await request.body()

        async def work() -> tuple[protocol.Inference, torch.Tensor]:
            inference = await in_thread(protocol.read_request, body, service.image_size, service.num_classes,
                                        settings.max_queue)
            pixels = inference.pixels
            if pixels is None:
                pixels = await decode(service, [(data, f"{protocol.IMAGE_BYTES}[{i}]") for i, data in enumerate(inference.files)])
            return inference, await state.batcher.submit(pixels, due)

        inference, probabilities = await within_timeout(work(), due)
        return protocol.InferenceResponse(
            model_name=name, id=inference.id,
            outputs=protocol.response_outputs(probabilities, service.labels, inference.top_k, inference.outputs))

    # -------------------------------------------------------------------------- plain endpoints
    @app.post("/predict", tags=["plain"], responses={code: {"model": protocol.ErrorResponse} for code in (400, 413, 415, 503, 504)},
              openapi_extra=_image_body_schema("one or more images as multipart `file` fields, or one image as the raw body"))
    async def predict(request: Request, top_k: Annotated[int, Query(ge=1, description="classes per image")] = 5):
        """Classify images; the answer is `cvt predict --format json`'s lines as a JSON list."""
        service = state.service
        due = deadline()
        files = await _uploaded_files(request, settings.max_queue)

        async def work() -> torch.Tensor:
            return await state.batcher.submit(await decode(service, files), due)

        rows = service.top_k(await within_timeout(work(), due), top_k)
        return [{"path": name, "top_k": row} for (_, name), row in zip(files, rows)]

    @app.post("/attention", tags=["plain"], response_class=Response,
              responses={200: {"content": {"image/png": {}}}, **{c: {"model": protocol.ErrorResponse} for c in (400, 409)}},
              openapi_extra=_image_body_schema("one image as a multipart `file` field or as the raw body"))
    async def attention(request: Request):
        """The crop the model saw, with its last-stage cls-token attention (mean over heads) laid over it."""
        service = state.service
        if not service.has_attention:
            raise RequestError(409, "this model has no attention map to show: it needs a cls token in its last stage "
                                    "and more than one key position at its input size")
        due = deadline()
        files = await _uploaded_files(request, 1)

        async def work() -> bytes:
            pixels = await decode(service, files)
            return await asyncio.get_running_loop().run_in_executor(state.batcher.executor, service.attention_png, pixels[0])

        return Response(await within_timeout(work(), due), media_type="image/png")

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def prometheus_metrics():
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def upload_page():
        config = {"model": settings.name, "attention": state.service.has_attention}
        return page.replace("__CONFIG__", json.dumps(config))


async def _uploaded_files(request: Request, max_files: int) -> list[tuple[bytes, str]]:
    """``(bytes, name)`` of the images in a multipart form's ``file`` fields or in the raw body."""
    content_type = request.headers.get("content-type", "application/octet-stream").lower()
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=max_files, max_fields=max_files + 10) as form:  # closes the spooled files
            uploads = [f for f in form.getlist("file") if isinstance(f, UploadFile)]
            if not uploads:
                raise RequestError(400, "the form has no `file` field with a file in it")
            return [(await f.read(), f.filename or f"file[{i}]") for i, f in enumerate(uploads)]
    if content_type.startswith(RAW_IMAGE_TYPES):
        return [(await request.body(), "body")]
    raise RequestError(415, f"Content-Type {content_type!r}: send multipart/form-data with `file` fields, "
                            "or the image itself as image/* or application/octet-stream")


def _image_body_schema(description: str) -> dict:
    """OpenAPI text for an endpoint that reads its images from the request itself."""
    binary = {"schema": {"type": "string", "format": "binary"}}
    return {"requestBody": {"required": True, "description": description, "content": {
        "multipart/form-data": {"schema": {"type": "object", "properties": {
            "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}},
        "image/jpeg": binary, "image/png": binary, "application/octet-stream": binary}}}
