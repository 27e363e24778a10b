"""corpo_jax/host_threads.py: the XLA:CPU thread count a mesh of fake devices gets."""

import os

from corpo_jax import host_threads


def test_forced_device_count_reads_the_last_flag():
  assert host_threads.forced_device_count("") == 1
  assert host_threads.forced_device_count("--xla_dump_to=/tmp/x") == 1
  assert host_threads.forced_device_count(
      "--xla_force_host_platform_device_count=8 --xla_force_host_platform_device_count=4") == 4


def test_ensure_gives_four_threads_per_fake_device_unless_told():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  host_threads.ensure(env)
  assert env["PJRT_NPROC"] == str(max(32, os.cpu_count()))
  for preset in ({"PJRT_NPROC": "3"}, {"NPROC": "5"}):  # the user's setting wins
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", **preset}
    host_threads.ensure(env)
    assert env == {"XLA_FLAGS": "--xla_force_host_platform_device_count=8", **preset}
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
  host_threads.ensure(env)
  assert "PJRT_NPROC" not in env


def test_the_test_session_runs_with_the_larger_pool():
  """conftest's 8 fake devices: the pool has 32 threads (the XLAEigen threads of this process)."""
  import jax
  assert jax.device_count() == 8
  names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
  assert names.count("tf_XLAEigen") == max(32, os.cpu_count())
