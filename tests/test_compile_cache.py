"""config.jax_cache_dir: which directory, errors, and that compiled programs land there."""

import os

import jax
import jax.numpy as jnp
import pytest

from corpo_jax import compile_cache


@pytest.fixture
def restore_cache():
  """The session's cache (tests/conftest.py) is process-wide: put it back afterwards."""
  before = os.environ.get(compile_cache.ENV)
  min_time = jax.config.jax_persistent_cache_min_compile_time_secs
  yield
  if before is None:
    os.environ.pop(compile_cache.ENV, None)
  else:
    os.environ[compile_cache.ENV] = before
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_time)
  compile_cache.use(before or "")


def test_resolve(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_cache.ENV, str(tmp_path / "env"))
  assert compile_cache.resolve("auto") == str(tmp_path / "env")
  monkeypatch.delenv(compile_cache.ENV)
  assert compile_cache.resolve("auto") == os.path.expanduser("~/.cache/corpo_jax/xla")
  assert compile_cache.resolve("") is None
  assert compile_cache.resolve(str(tmp_path / "x")) == str(tmp_path / "x")


def test_compiled_programs_are_written_and_reused(tmp_path, restore_cache):
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  assert compile_cache.use(str(tmp_path / "cache")) == str(tmp_path / "cache")
  assert jax.config.jax_compilation_cache_dir == str(tmp_path / "cache")

  def f(x):
    return jnp.tanh(x) * 3.0 + 1.0

  x = jnp.arange(7.0)
  expected = jax.jit(f)(x)
  entries = [n for n in os.listdir(tmp_path / "cache") if n.startswith("jit_f")]
  assert len(entries) == 1, os.listdir(tmp_path / "cache")
  # A new jit object of the same program loads the entry (no new file) and computes the same.
  assert jnp.array_equal(jax.jit(f)(x), expected)
  assert [n for n in os.listdir(tmp_path / "cache") if n.startswith("jit_f")] == entries

  written = sorted(os.listdir(tmp_path / "cache"))
  assert compile_cache.use("") is None  # off: a new program writes nothing
  jax.jit(lambda x: x * 5.0 - 2.0)(x)
  assert sorted(os.listdir(tmp_path / "cache")) == written


def test_unwritable_directory(tmp_path, restore_cache, monkeypatch):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  with pytest.raises(ValueError, match=r"config.jax_cache_dir=.*not a writable directory"):
    compile_cache.use(str(blocker / "cache"))
  monkeypatch.setenv(compile_cache.ENV, str(blocker / "cache"))
  assert compile_cache.use("auto") is None  # auto: run on without a cache
  assert not jax.config.jax_enable_compilation_cache
