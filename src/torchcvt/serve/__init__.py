"""``cvt serve``: a classification service for any checkpoint torchcvt loads.

Modules, each owning one thing: ``command`` (the CLI and starting uvicorn), ``settings`` (what a
server runs with), ``model`` (bytes -> pixels -> probabilities, the attention overlay),
``batching`` (the dynamic batcher and its bounded queue), ``protocol`` (the Open Inference
Protocol v2 schemas and tensors), ``metrics`` (Prometheus) and ``app`` (the FastAPI routes).
docs/serving.md is the user's guide. The HTTP stack (fastapi, uvicorn, python-multipart,
prometheus-client) is the ``serve`` extra and is imported only when a server starts.
"""
