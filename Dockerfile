# The image the cluster files run (cluster/aws.yaml, cluster/gcp.yaml, cluster/kuberay/): this
# repository at /home/ray/dinor1 and dinor1 with its Ray in /home/ray/venv, installed by the
# very `make setup` that sets up a checkout and that CI runs in a fresh venv (torch first and
# alone, then the project).
#   docker build -t REGISTRY/dinor1:0.1.0 .     # PyPI's torch 2.13.0 for Linux x86_64: CUDA
#   docker build --build-arg TORCH_PIP_ARGS="--index-url <a PyTorch CUDA wheel index>" ...
#   docker push REGISTRY/dinor1:0.1.0
# Linted with hadolint in the tests (tests/test_packaging.py); not built there (no base images
# can be pulled offline).
FROM python:3.11-slim-bookworm

ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_PIP_ARGS=""

# make runs the setup; git, ssh and rsync: what Ray's cluster launcher runs in the container
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends make git openssh-client rsync \
    && rm -rf /var/lib/apt/lists/*

# an unprivileged user as in Ray's own images (uid 1000, home /home/ray)
RUN useradd --create-home --uid 1000 ray
USER 1000:1000
WORKDIR /home/ray/dinor1
COPY --chown=1000:1000 . .
ENV PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    MLFLOW_DISABLE_TELEMETRY=true
RUN make setup VENV=/home/ray/venv EXTRAS= \
    TORCH_SPEC="${TORCH_SPEC}" TORCH_PIP_ARGS="${TORCH_PIP_ARGS}"
ENV PATH=/home/ray/venv/bin:${PATH}
CMD ["dinor1", "--help"]
