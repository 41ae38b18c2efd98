# speccascade on Ray's official CPU image, with PyTorch's CPU build of torch.
#   make image            # builds the wheel into dist/, then this image as speccascade:<version>-cpu
#   docker build -f docker/cpu.Dockerfile -t speccascade:0.1.0-cpu .   # once dist/ holds the wheel
# RAY_VERSION is the chart's rayVersion (helm/speccascade/values.yaml); TORCH_VERSION is the exact
# torch of the install path (Makefile), within the package's range (pyproject.toml). tests/docker
# checks both and rehearses the RUN step.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cpu

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
# The torch wheel on PyPI for Linux is the CUDA build (gigabytes of CUDA libraries a CPU node never
# loads); PyTorch's CPU index has the same version built for CPUs only.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# jemalloc and tcmalloc, the C allocators a tier may ask for (TierConfig.allocator; glibc's is the
# default): CPU passes reuse their large tensors instead of faulting them in afresh each pass.
USER root
RUN apt-get update \
 && apt-get install -y --no-install-recommends libjemalloc2 libtcmalloc-minimal4 \
 && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /home/ray
COPY --chown=ray:users dist/speccascade-*.whl wheels/
# torch first, from its index; then the package, whose torch range that torch satisfies, and
# Ray pinned to the image's own version so that pip never replaces it.
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "ray[serve]==${RAY_VERSION}" wheels/speccascade-*.whl \
 && rm -rf wheels
