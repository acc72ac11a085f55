"""Numba's on-disk cache, kept in step with the sources the compiled loops are built from."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["cold_cache", "drop_stale_cache"]

#: Sources whose functions the compiled loops call (or whose constants they freeze).
_SOURCES = ("compiled_a2c.py", "compiled_cnn.py", "compiled_value.py", "compiled.py",
            "kernels.py", "simd.py", "views.py", "rng.py", "updates.py", "envs/cartpole.py",
            "envs/minatar_compiled.py", "envs/minatar_breakout.py",
            "envs/minatar_space_invaders.py")
#: Cached functions that call into other modules.
_PATTERNS = ("compiled.*.nb[ic]", "compiled_a2c.*.nb[ic]", "compiled_cnn.*.nb[ic]",
             "compiled_value.*.nb[ic]", "kernels.*.nb[ic]", "minatar_compiled.*.nb[ic]")


def drop_stale_cache() -> None:
    """Numba checks a cached function against its own file only, while the compiled loops
    and passes call functions of (and freeze constants from) other modules: when any of
    those files changed since the cache was written, drop the cached loops, passes, value
    steps and kernels (which build on study.trainer.simd) so that they recompile, rather
    than run old code. (Called when study.trainer.compiled_a2c or compiled_cnn is
    imported, before any of their functions is compiled or loaded.)"""
    here = Path(__file__).parent
    sources = [here / name for name in _SOURCES]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in [*sources,
                                                              here.parent / "schema.py"]))
    cache = _cache_dir()
    stamp = cache / "study-compiled.sources"
    try:
        if stamp.exists() and stamp.read_text() == digest.hexdigest():
            return
        # (numba keeps each module's cache in its own __pycache__, envs/ too, or mirrors
        # the package's folders under $NUMBA_CACHE_DIR)
        for pattern in _PATTERNS:
            for path in (cache if os.environ.get("NUMBA_CACHE_DIR") else here).rglob(pattern):
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
