# speccascade on Ray's official CUDA image, with the CUDA build of torch.
#   make image            # builds the wheel into dist/, then this image as speccascade:<version>-cuda
#   docker build -f docker/cuda.Dockerfile -t speccascade:0.1.0-cuda .   # once dist/ holds the wheel
# Same steps as cpu.Dockerfile; only the base image and where torch comes from differ.
ARG RAY_VERSION=2.60.0
FROM rayproject/ray:${RAY_VERSION}-py311-cu128

ARG RAY_VERSION
ARG TORCH_VERSION=2.13.0
# Empty: torch from PyPI, whose Linux wheel is the CUDA build (it brings its CUDA runtime as
# nvidia-* wheels; the base image provides the NVIDIA container setup). Set it to e.g.
# https://download.pytorch.org/whl/cu128 to pin torch to one CUDA version.
ARG TORCH_INDEX_URL=

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
