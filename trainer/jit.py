"""numba, set up once for every kernel module: its on-disk cache folder and its threading layer.

Kept apart from `kernels` (the optimizer kernels and their torch glue) and free of torch, so the modules that build
the data cache (tokenizing, hashing, encoding) import without torch: the CLI builds the cache in a child process
while the training process imports torch (trainer/data_cache.py).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

# An empty NUMBA_CPU_NAME means "not set" (this machine's CPU): the image's ENV passes its build argument through,
# and `--build-arg NUMBA_CPU_NAME=` asks for the build machine's CPU. numba would take it as a CPU named "".
if os.environ.get("NUMBA_CPU_NAME") == "" and "numba" not in sys.modules:
    del os.environ["NUMBA_CPU_NAME"]

# What a CPU level named in NUMBA_CPU_NAME needs from this CPU: kernels compiled for a level the CPU lacks die of
# an illegal instruction, so such a name is dropped (kernels for this CPU compile instead) with a warning.
CPU_LEVEL_FEATURES = {"x86-64-v2": ("sse4.2", "popcnt", "ssse3"), "x86-64-v3": ("avx2", "fma", "bmi2", "avx"),
                      "x86-64-v4": ("avx512f", "avx512bw", "avx512dq", "avx512vl", "avx2")}


def missing_cpu_features(level: str, have) -> list[str]:
    """The features CPU level `level` needs that `have` (llvmlite's host feature map) lacks; [] for other names."""
    return [f for f in CPU_LEVEL_FEATURES.get(level, ()) if not have.get(f, False)]


def _unsupported_cpu_level() -> tuple[str, list[str]] | None:
    level = os.environ.get("NUMBA_CPU_NAME", "")
    if level not in CPU_LEVEL_FEATURES or "numba" in sys.modules:
        return None
    try:
        from llvmlite import binding

        missing = missing_cpu_features(level, binding.get_host_cpu_features())
    except Exception:  # noqa: BLE001 - no llvmlite (no numba) or no feature query: leave the name to numba
        return None
    if not missing:
        return None
    del os.environ["NUMBA_CPU_NAME"]
    return level, missing


_DROPPED_LEVEL = _unsupported_cpu_level()

try:  # numba is a dependency; the guard keeps the package importable where it has no wheel (the torch ops remain)
    import numba
    from numba.core.dispatcher import Dispatcher
except ImportError:  # pragma: no cover - exercised only on platforms without numba
    numba = None
    Dispatcher = ()


def fused_kernels_enabled() -> bool:
    return numba is not None and os.environ.get("TRAINER_FUSED_KERNELS", "1") != "0"


def _numba_cache_dir() -> str | None:
    """Point numba's on-disk cache of compiled kernels at a folder this process can write, and return it (None if
    there is none).

    Why: numba's default places the cache next to the package (site-packages, read-only for a non-root container
    user) or under $HOME/.cache (often unwritable or absent in pods), and when it finds neither it refuses to
    import the module. Same places as the vector cache: $TRAINER_CACHE_DIR, else ~/.cache/trainer, else the
    temp folder. NUMBA_CACHE_DIR, when set, wins.
    """
    if os.environ.get("NUMBA_CACHE_DIR"):
        return numba.config.CACHE_DIR or os.environ["NUMBA_CACHE_DIR"]
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
            return path
    return None


def seed_cache(seed: str, cache_dir: str) -> int:
    """Copy into `cache_dir` the files of a seed folder of compiled kernels that it lacks; returns how many.

    Why: a container image cannot hold the cache itself (numba refuses a cache folder it cannot write, and a pod's
    cache is a fresh emptyDir), so without this every pod compiled every kernel on its first run (about 12 s; an
    18 s demo epoch against 5.5 s). The image holds a seed made at build time by `python -m trainer precompile`
    and names it in TRAINER_NUMBA_SEED_DIR. Files are never overwritten (a kernel this machine compiled stays),
    and each lands by rename, so ranks starting side by side never see half a file. numba itself checks that a
    cached kernel matches its source file (path, size, mtime) and this CPU, and compiles where it does not.
    """
    copied = 0
    for root, _, files in os.walk(seed):
        target = os.path.normpath(os.path.join(cache_dir, os.path.relpath(root, seed)))
        for name in files:
            dest = os.path.join(target, name)
            if os.path.exists(dest):
                continue
            os.makedirs(target, exist_ok=True)
            tmp = f"{dest}.seed-{os.getpid()}"
            shutil.copyfile(os.path.join(root, name), tmp)
            os.replace(tmp, dest)
            copied += 1
    return copied


def compiled_kernels() -> list[str]:
    """The trainer kernels this process compiled rather than loaded from the cache (one entry per signature)."""
    found = []
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("trainer.") or module is None:
            continue
        for attr, value in vars(module).items():
            stats = getattr(value, "stats", None) if isinstance(value, Dispatcher) else None
            if stats is not None and getattr(value, "__module__", module_name) == module_name:
                found += [f"{module_name}.{attr}"] * sum(stats.cache_misses.values())
    return sorted(found)


def report_compiled(logger, where: str) -> None:
    """Say which kernels this process had to compile (a first run with this cache folder is seconds slower)."""
    compiled = compiled_kernels()
    if compiled:
        names = sorted({name.rsplit(".", 1)[-1] for name in compiled})
        logger.info("%s: numba compiled %d kernels not in its cache (%s); cached in %s for later runs "
                    "(`python -m trainer precompile` makes them ahead of time)", where, len(compiled),
                    ", ".join(names), CACHE_DIR or "no folder: set NUMBA_CACHE_DIR")


_CACHE = False
CACHE_DIR: str | None = None
if numba is not None:
    CACHE_DIR = _numba_cache_dir()
    _CACHE = CACHE_DIR is not None  # without a writable folder kernels compile in every process (a few seconds)
    if _DROPPED_LEVEL is not None:
        import logging

        logging.getLogger(__name__).warning(
            "NUMBA_CPU_NAME=%s needs CPU features this machine lacks (%s): compiling kernels for this CPU instead",
            _DROPPED_LEVEL[0], ", ".join(_DROPPED_LEVEL[1]))
    _SEED = os.environ.get("TRAINER_NUMBA_SEED_DIR")
    if _CACHE and _SEED and os.path.isdir(_SEED) and os.path.realpath(_SEED) != os.path.realpath(CACHE_DIR):
        try:
            seed_cache(_SEED, CACHE_DIR)
        except OSError as e:  # a seed is an optimisation: without it kernels compile as before
            import logging

            logging.getLogger(__name__).warning("numba kernel seed %s not copied to %s: %s", _SEED, CACHE_DIR, e)

    # Prefer the OpenMP layer: measured here it runs beside torch's own OpenMP pool without stalls, while numba's
    # default choice (tbb when present, else workqueue) made every torch op in the step 3-10x slower.
    if os.environ.get("NUMBA_THREADING_LAYER") is None:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
