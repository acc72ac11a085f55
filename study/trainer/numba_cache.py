"""Numba's on-disk cache, kept in step with the sources the compiled loops are built from."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["cold_cache", "drop_stale_cache"]

#: Sources whose functions the compiled loops call (or whose constants they freeze); the
#: cached functions of all of them are dropped together when any of them changed.
_SOURCES = ("compiled_a2c.py", "compiled_cnn.py", "compiled_value.py", "compiled.py",
            "kernels.py", "simd.py", "views.py", "rng.py", "updates.py", "envs/cartpole.py",
            "envs/minatar_compiled.py", "envs/minatar_breakout.py",
            "envs/minatar_space_invaders.py", "envs/minatar_freeway.py",
            "envs/minatar_asterix.py", "envs/numpy_mt.py")


def drop_stale_cache() -> None:
    """Numba checks a cached function against its own file only, while the compiled loops,
    passes, kernels and games call functions of (and freeze constants from) other modules:
    when any of :data:`_SOURCES` changed since the cache was written, drop the cached
    functions of all of them so that they recompile, rather than run old code. (Called
    when study.trainer.compiled_a2c, compiled_cnn or envs.minatar_compiled is imported,
    before any of their functions is compiled or loaded, and by :func:`cold_cache`.)"""
    here = Path(__file__).parent
    sources = [here / name for name in _SOURCES]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*sources,
                                                              here.parent / "schema.py"]))
    cache = _cache_dir()
    stamp = cache / "study-compiled.sources"
    try:
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            return
        # (numba keeps each module's cache in its own __pycache__, envs/ too, or in
        # folders of its own under $NUMBA_CACHE_DIR)
        root = cache if os.environ.get("NUMBA_CACHE_DIR") else here
        for name in _SOURCES:
            for path in root.rglob(f"{Path(name).stem}.*.nb[ic]"):
                path.unlink(missing_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        stamp.write_text(digest.hexdigest())
    except OSError:  # a read-only install: numba keeps its cache elsewhere, per file
        pass


def cold_cache() -> bool:
    """Whether the kernels compile on their next use: they have no on-disk cache yet (the
    first run after an install) or it was stale and is dropped now (the first run after
    an upgrade). Compiling takes a while and would otherwise look like a stalled progress
    bar."""
    drop_stale_cache()
    return not any(_cache_dir().rglob("kernels.*.nbi"))


def _cache_dir() -> Path:
    return Path(os.environ.get("NUMBA_CACHE_DIR") or Path(__file__).parent / "__pycache__")
