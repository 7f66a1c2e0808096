"""numba, set up once for every kernel module: its on-disk cache folder and its threading layer.

Kept apart from `kernels` (the optimizer kernels and their torch glue) and free of torch, so the modules that build
the data cache (tokenizing, hashing, encoding) import without torch: the CLI builds the cache in a child process
while the training process imports torch (trainer/data_cache.py).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sys
import tempfile
import uuid

# What a CPU level named in NUMBA_CPU_NAME needs from this CPU (LLVM's feature names): kernels compiled for a
# level the CPU lacks die of an illegal instruction, so such a name is dropped (kernels for this CPU compile
# instead) with a warning.
CPU_LEVEL_FEATURES = {
    "x86-64-v2": ("cx16", "sahf", "popcnt", "sse4.1", "sse4.2", "ssse3"),
    "x86-64-v3": ("cx16", "sahf", "popcnt", "sse4.1", "sse4.2", "ssse3",
                  "avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave"),
}
CPU_LEVEL_FEATURES["x86-64-v4"] = (*CPU_LEVEL_FEATURES["x86-64-v3"], "avx512f", "avx512bw", "avx512cd", "avx512dq",
                                   "avx512vl")


def missing_cpu_features(level: str, have) -> list[str]:
    """The features CPU level `level` needs that `have` (llvmlite's host feature map) lacks; [] for other names."""
    return [f for f in CPU_LEVEL_FEATURES.get(level, ()) if not have.get(f, False)]


def _normalise_cpu_env() -> tuple[str, list[str]] | None:
    """numba reads NUMBA_CPU_NAME / NUMBA_CPU_FEATURES once, at import; settle them first. Returns the CPU level
    dropped because this CPU lacks its features, if any.

    - An empty name means "not set", this machine's CPU: the image's ENV passes its build argument through, and
      `--build-arg NUMBA_CPU_NAME=` asks for that. numba would take it as a CPU named "".
    - A level this CPU cannot run is dropped (above).
    - Empty features (the image sets them so that a named level alone decides them, which is what makes a
      level's kernels portable) are dropped too when no name is left: for this machine's CPU numba must use the
      features cpuid reports, since a VM may mask some of what its CPU model implies.
    """
    if "numba" in sys.modules:
        return None
    dropped = None
    level = os.environ.get("NUMBA_CPU_NAME")
    if level == "":
        del os.environ["NUMBA_CPU_NAME"]
    elif level in CPU_LEVEL_FEATURES:
        try:
            from llvmlite import binding

            missing = missing_cpu_features(level, binding.get_host_cpu_features())
        except Exception:  # noqa: BLE001 - no llvmlite (no numba) or no feature query: leave the name to numba
            missing = []
        if missing:
            del os.environ["NUMBA_CPU_NAME"]
            dropped = level, missing
    if "NUMBA_CPU_NAME" not in os.environ and os.environ.get("NUMBA_CPU_FEATURES") == "":
        del os.environ["NUMBA_CPU_FEATURES"]
    return dropped


_DROPPED_LEVEL = _normalise_cpu_env()

@contextlib.contextmanager
def _scipy_hidden():
    """`import scipy...` raises ImportError inside (as if scipy were not installed), for the part of scipy not yet
    imported; afterwards scipy imports as usual. Used around `import numba`, which imports scipy only to check its
    version (0.12 s of every process start here, the data-cache child's included) and skips the check when scipy
    is missing. numba's BLAS probe has its own block below."""
    name = "scipy" if "scipy" not in sys.modules else "scipy.linalg" if "scipy.linalg" not in sys.modules else None
    if name:
        sys.modules[name] = None
    try:
        yield
    finally:
        if name and name in sys.modules and sys.modules[name] is None:
            del sys.modules[name]


try:  # numba is a dependency; the guard keeps the package importable where it has no wheel (the torch ops remain)
    with _scipy_hidden():
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


def seeded_cache_dir(seed: str, cache_dir: str) -> str:
    """A copy of the seed folder of compiled kernels inside `cache_dir`, made once; numba's cache folder from then on.

    Why: a container image cannot hold the cache itself (numba refuses a cache folder it cannot write, and a pod's
    cache is a fresh emptyDir), so without this every pod compiled every kernel on its first run (about 12 s; an
    18 s demo epoch against 5.5 s). The image holds a seed made at build time by `python -m trainer precompile`
    and names it in TRAINER_NUMBA_SEED_DIR.

    The copy is all or nothing, in a folder of its own named after the seed's contents (`seed-<hash of its files'
    names, sizes and mtimes>`): copied under a unique temporary name, then renamed into place, so ranks starting
    side by side never see part of it, and no file of an older image's seed or of this machine's own compiles is
    ever mixed with it (numba pairs an index file with data files by name only). Kernels the seed lacks, or has
    for another CPU, compile into the copy. numba checks that a cached kernel matches its source file (its path
    and contents) and this CPU's target, and compiles where it does not.
    """
    entries = []
    for root, dirs, files in os.walk(seed):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            st = os.stat(path)
            entries.append(f"{os.path.relpath(path, seed)}\0{st.st_size}\0{st.st_mtime_ns}")
    target = os.path.join(cache_dir, "seed-" + hashlib.sha256("\n".join(entries).encode()).hexdigest()[:16])
    if not os.path.isdir(target):
        tmp = os.path.join(cache_dir, f".{os.path.basename(target)}.{uuid.uuid4().hex}")
        try:
            shutil.copytree(seed, tmp)
            os.rename(tmp, target)
        except OSError:
            if not os.path.isdir(target):  # not a race lost to another process's rename
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def module_kernels(module) -> dict[str, object]:
    """The numba kernels a module defines (not those it imports), by qualified name."""
    return {f"{module.__name__}.{attr}": value for attr, value in vars(module).items()
            if isinstance(value, Dispatcher) and value.py_func.__module__ == module.__name__}


def _loaded_kernels() -> dict[str, object]:
    """The numba kernels of every loaded trainer module, by qualified name."""
    return {name: kernel for module_name, module in list(sys.modules.items())
            if module_name.startswith("trainer.") and module is not None
            for name, kernel in module_kernels(module).items()}


def compiled_kernels() -> list[str]:
    """The trainer kernels this process compiled rather than loaded from the cache (one entry per signature)."""
    found = []
    for name, kernel in _loaded_kernels().items():
        found += [name] * sum(kernel.stats.cache_misses.values())
    return sorted(found)


def kernels_not_cached() -> list[str]:
    """The loaded trainer modules' cached kernels that have no index file in numba's cache folder yet: on a first
    run with this folder (or after an upgrade) those the run uses compile on first use, seconds each. Found by the
    index file numba would read (a private attribute; where it is missing, nothing is reported)."""
    missing = []
    for name, kernel in _loaded_kernels().items():
        try:
            index = kernel._cache._cache_file._index_path
        except AttributeError:
            continue
        if not os.path.exists(index):
            missing.append(name)
    return sorted(missing)


def announce_compiles(logger) -> None:
    """Say before the first step when kernels will compile: a first run was otherwise silent for about 30 s
    between the embedding plan and step 1."""
    if not _CACHE:
        return
    missing = kernels_not_cached()
    if missing:
        logger.info("numba: the cache %s does not hold all of this version's kernels yet; the first steps compile "
                    "those this run uses, once (tens of seconds on a first run; `python -m trainer precompile` does it "
                    "ahead of time)", CACHE_DIR)


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
    if CACHE_DIR and _SEED and os.path.isdir(_SEED) and os.path.realpath(_SEED) != os.path.realpath(CACHE_DIR):
        try:
            CACHE_DIR = numba.config.CACHE_DIR = seeded_cache_dir(_SEED, CACHE_DIR)
        except OSError as e:  # a seed is an optimisation: without it kernels compile as before
            import logging

            logging.getLogger(__name__).warning("numba kernel seed %s not copied to %s: %s", _SEED, CACHE_DIR, e)

    # numba.np.arraymath, which numba imports when a process loads its first kernel, checks once whether scipy's BLAS
    # imports (for np.vdot-style inner products in jitted code, which these kernels do not use); where scipy is
    # installed that imports all of scipy.linalg, 0.19 s of every process start, the data cache's child included.
    # Blocked for that one check: arraymath then takes its own loop for those products, and everything else that
    # wants scipy's BLAS later (numba's np.dot and np.linalg ask again; scipy itself) imports it normally.
    if "numba.np.arraymath" not in sys.modules and "scipy.linalg.cython_blas" not in sys.modules:
        sys.modules["scipy.linalg.cython_blas"] = None  # type: ignore[assignment]  # makes its import fail
        try:
            import numba.np.arraymath  # noqa: F401
        finally:
            del sys.modules["scipy.linalg.cython_blas"]

    # Prefer the OpenMP layer: measured here it runs beside torch's own OpenMP pool without stalls, while numba's
    # default choice (tbb when present, else workqueue) made every torch op in the step 3-10x slower.
    if os.environ.get("NUMBA_THREADING_LAYER") is None:
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
