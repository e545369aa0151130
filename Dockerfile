# cvt serve on the CPU: the Open Inference Protocol v2 on port 8080 (KServe's port for custom runtimes).
#
#   docker build -t torchcvt-serve .
#   docker run --rm -p 8080:8080 -v $PWD/runs/digits:/mnt/models:ro torchcvt-serve          # weights mounted
#   docker run --rm -p 8080:8080 torchcvt-serve --weights cvt-13 --name cvt-13               # downloaded at start
#
# The weights: mount a checkpoint folder at /mnt/models (where KServe's storage initializer puts
# storageUri), or bake them into an image of your own:  FROM torchcvt-serve / COPY runs/digits /mnt/models
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    TORCHCVT_CACHE=/home/cvt/.cache/torchcvt HF_HOME=/home/cvt/.cache/huggingface

# The CPU build of torch first: a plain `pip install torch` would pull a CUDA build of several GB.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

WORKDIR /opt/torchcvt
COPY pyproject.toml README.md ./
COPY src ./src
# torch 2.13.0 satisfies the package's torch range, so this installs no other torch.
RUN pip install ".[serve]" && useradd --create-home --uid 1000 cvt

USER cvt
EXPOSE 8080
ENTRYPOINT ["cvt", "serve", "--host", "0.0.0.0", "--port", "8080"]
CMD ["--weights", "/mnt/models", "--name", "model"]
