"""JAX's persistent compilation cache, on by default for the command-line tools.

Every process compiles each step bucket anew (seconds per bucket on a CPU, more for a large
model on a GPU); with the cache on, a later run reads the compiled executables back from disk.
JAX keys an entry by the program, the compile options, the jax/jaxlib version and the device,
so a stale entry is never used, and deleting the directory is always safe: the next run
compiles and writes again.

Where it lives: `$DYNAEXQ_COMPILE_CACHE` when it names a directory; else JAX's own
`$JAX_COMPILATION_CACHE_DIR`; else `$XDG_CACHE_HOME/dynaexq/jax` (`~/.cache/dynaexq/jax`).
Off: `DYNAEXQ_COMPILE_CACHE=0`, or a script's `--no-compile-cache`.
"""

from __future__ import annotations

import os
from pathlib import Path

ENV = "DYNAEXQ_COMPILE_CACHE"
_OFF = ("0", "off", "false", "no")


def default_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dynaexq" / "jax"


def cache_dir() -> Path | None:
    """The directory the cache uses, or None when the environment turns it off."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    return Path(os.environ.get("JAX_COMPILATION_CACHE_DIR") or default_dir())


def enable(on: bool = True) -> Path | None:
    """Turn the cache on (or, with `on=False`, off) for this process; call it before the first
    compile. Returns the directory in use, or None when off."""
    import jax

    path = cache_dir() if on else None
    if path is None:
        # Also overrides a $JAX_COMPILATION_CACHE_DIR that JAX itself would follow.
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # JAX's default keeps only compiles over 1 s; a restart also pays for the many shorter ones.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return path


def active_dir() -> Path | None:
    """The directory this process's compiles go through, or None when the cache is off."""
    import jax

    path = jax.config.jax_compilation_cache_dir
    return Path(path) if path and jax.config.jax_enable_compilation_cache else None
