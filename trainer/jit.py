"""numba, set up once for every kernel module: its on-disk cache folder and its threading layer.

Kept apart from `kernels` (the optimizer kernels and their torch glue) and free of torch, so the modules that build
the data cache (tokenizing, hashing, encoding) import without torch: the CLI builds the cache in a child process
while the training process imports torch (trainer/data_cache.py).
"""

from __future__ import annotations

import os
import tempfile

try:  # numba is a dependency; the guard keeps the package importable where it has no wheel (the torch ops remain)
    import numba
except ImportError:  # pragma: no cover - exercised only on platforms without numba
    numba = None


def fused_kernels_enabled() -> bool:
    return numba is not None and os.environ.get("TRAINER_FUSED_KERNELS", "1") != "0"


def _numba_cache_dir() -> bool:
    """Point numba's on-disk cache of compiled kernels at a folder this process can write; False if none.

    Why: numba's default places the cache next to the package (site-packages, read-only for a non-root container
    user) or under $HOME/.cache (often unwritable or absent in pods), and when it finds neither it refuses to
    import the module. Same places as the vector cache: $TRAINER_CACHE_DIR, else ~/.cache/trainer, else the
    temp folder. NUMBA_CACHE_DIR, when set, wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return True
    bases = [os.environ.get("TRAINER_CACHE_DIR"), os.path.join(os.path.expanduser("~"), ".cache", "trainer"),
             os.path.join(tempfile.gettempdir(), f"trainer-{os.getuid() if hasattr(os, 'getuid') else 'user'}")]
    for base in filter(None, bases):
        path = os.path.join(base, "numba")
        try:
            os.makedirs(path, exist_ok=True)
        except OSError:
            continue
        if os.access(path, os.W_OK):
            numba.config.CACHE_DIR = path
            return True
    return False


_CACHE = False
if numba is not None:
    _CACHE = _numba_cache_dir()  # without a writable folder kernels compile in every process (a few seconds)

    # Prefer the OpenMP layer: measured here it runs beside torch's own OpenMP pool without stalls, while numba's
    # default choice (tbb when present, else workqueue) made every torch op in the step 3-10x slower.
    if os.environ.get("NUMBA_THREADING_LAYER") is None:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
