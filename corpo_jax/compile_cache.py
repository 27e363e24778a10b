"""The persistent XLA compilation cache (MaxText's `jax_cache_dir`).

Compiled programs are written to a directory keyed by their HLO, compile options, backend and
jax version, so a rerun, a resumed run, an evaluation of the workdir or another seed with the
same shapes loads them from disk instead of compiling again; stages whose steps differ only in
run-time hyperparameters (train/optim.py RUNTIME_FIELDS) share one program
(`configs/grpo.py:smoke` on the 2-core CPU: 34 s with an empty cache, 15 s with a warm one, 45 s
with the cache off).
`config.jax_cache_dir` selects it:

  "auto"   $JAX_COMPILATION_CACHE_DIR if set, else DEFAULT_DIR
  ""       off
  a path   that directory (created if missing)

Programs that compile in under a second are not cached (JAX's
jax_persistent_cache_min_compile_time_secs). The cache is never evicted; delete the directory
to reclaim the space.
"""

from __future__ import annotations

import os

import jax
from absl import logging
from jax.experimental.compilation_cache import compilation_cache

DEFAULT_DIR = "~/.cache/corpo_jax/xla"
ENV = "JAX_COMPILATION_CACHE_DIR"


def resolve(setting: str) -> str | None:
  """The directory `setting` names (module doc), or None when the cache is off."""
  if setting == "auto":
    setting = os.environ.get(ENV) or DEFAULT_DIR
  return os.path.abspath(os.path.expanduser(setting)) if setting else None


def _writable(path: str) -> str | None:
  """None if `path` is (or can be made) a writable directory, else why not."""
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_probe_{os.getpid()}")
    with open(probe, "w"):
      pass
    os.remove(probe)
    return None
  except OSError as e:
    return str(e)


def use(setting: str) -> str | None:
  """Points JAX's compilation cache at `setting`'s directory (or turns it off); returns the
  directory in use. Takes effect for later compilations even if some already happened.

  An explicit directory that cannot be written is an error naming config.jax_cache_dir; with
  "auto" the run goes on without the cache and logs why.
  """
  path = resolve(setting)
  if path is not None and (problem := _writable(path)):
    if setting != "auto":
      raise ValueError(f"config.jax_cache_dir={setting!r} is not a writable directory "
                       f"({problem}); choose another, or '' to compile without a cache.")
    logging.warning("Compilation cache %s is not writable (%s); compiling without it.", path,
                    problem)
    path = None
  if path == (jax.config.jax_compilation_cache_dir if jax.config.jax_enable_compilation_cache
              else None):
    return path
  jax.config.update("jax_enable_compilation_cache", path is not None)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
  compilation_cache.reset_cache()  # JAX decides once per process; make it look again
  return path
