"""launch/tpu_vm.sh: the exact gcloud commands of every subcommand (--dry-run), that a real run
executes the same argv, and the error when gcloud is missing."""

import os
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "launch", "tpu_vm.sh")
LOC = "--zone=us-central2-b --project=my-proj"
TPU = "gcloud compute tpus tpu-vm"


def tpu_vm(*args, tmp_path, path=None, **env):
  env = {"PATH": path if path is not None else os.environ["PATH"], "TMPDIR": str(tmp_path),
         "TPU_ZONE": "us-central2-b", "TPU_PROJECT": "my-proj", **env}
  return subprocess.run(["/bin/bash", SCRIPT, *args], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=30)


def dry_run(*args, tmp_path, **env):
  result = tpu_vm("--dry-run", *args, tmp_path=tmp_path, **env)
  assert result.returncode == 0, result.stderr
  return result.stdout.splitlines()


def test_create_on_demand_spot_reserved(tmp_path):
  base = f"{TPU} create corpo-jax {LOC} --accelerator-type=v4-8 --version=tpu-ubuntu2204-base"
  assert dry_run("create", tmp_path=tmp_path) == [base]
  assert dry_run("--spot", "create", tmp_path=tmp_path) == [base + " --spot"]
  assert dry_run("create", tmp_path=tmp_path, TPU_PROVISIONING="reserved") == [base + " --reserved"]


@pytest.mark.parametrize("accelerator, runtime", [
    ("v4-32", "tpu-ubuntu2204-base"), ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-128", "v2-alpha-tpuv5"), ("v6e-64", "v2-alpha-tpuv6e")])
def test_runtime_version_by_generation(tmp_path, accelerator, runtime):
  flag = f"--accelerator-type={accelerator}"
  assert dry_run(flag, "create", tmp_path=tmp_path) == [
      f"{TPU} create corpo-jax {LOC} {flag} --version={runtime}"]
  assert dry_run("--queued", flag, "create", tmp_path=tmp_path) == [
      f"gcloud compute tpus queued-resources create corpo-jax {LOC} --node-id=corpo-jax {flag} "
      f"--runtime-version={runtime}"]
  assert dry_run(flag, "create", tmp_path=tmp_path, TPU_RUNTIME_VERSION="my-image") == [
      f"{TPU} create corpo-jax {LOC} {flag} --version=my-image"]


def test_unknown_generation_needs_runtime_version_only_to_create(tmp_path):
  result = tpu_vm("--dry-run", "--accelerator-type=v3-8", "create", tmp_path=tmp_path)
  assert result.returncode == 2 and not result.stdout
  assert result.stderr == ("tpu_vm.sh: error: --accelerator-type=v3-8: no default TPU software "
                           "version for this generation; pass --runtime-version=V "
                           "(https://cloud.google.com/tpu/docs/runtimes)\n")
  assert dry_run("--accelerator-type=v3-8", "--runtime-version=tpu-vm-base", "create",
                 tmp_path=tmp_path) == [
      f"{TPU} create corpo-jax {LOC} --accelerator-type=v3-8 --version=tpu-vm-base"]
  assert dry_run("--accelerator-type=v3-8", "delete", tmp_path=tmp_path) == [
      f"{TPU} delete corpo-jax {LOC} --quiet"]


def test_queued_resource_create_and_delete(tmp_path):
  flags = ("--queued", "--spot", "--name=exp1", "--accelerator-type=v5litepod-16",
           "--runtime-version=v2-alpha-tpuv5-lite")
  assert dry_run(*flags, "create", tmp_path=tmp_path) == [
      f"gcloud compute tpus queued-resources create exp1 {LOC} --node-id=exp1 "
      "--accelerator-type=v5litepod-16 --runtime-version=v2-alpha-tpuv5-lite --spot"]
  assert dry_run("delete", tmp_path=tmp_path, TPU_QUEUED="1", TPU_NAME="exp1") == [
      f"gcloud compute tpus queued-resources delete exp1 {LOC} --force --quiet"]


INSTALL = ("set -e; command -v python3.11 >/dev/null || { sudo apt-get update -q && sudo "
           "apt-get install -y -q python3.11 python3.11-venv; }; mkdir -p corpo_jax && tar -xzf "
           "corpo_jax.tar.gz -C corpo_jax && cd corpo_jax && python3.11 -m venv .venv && "
           '.venv/bin/pip install -q -e ".[tpu]"')


def fake_gcloud(tmp_path, script=""):
  """A gcloud that appends its argv (NUL-separated, one call per record) to argv.txt, then runs
  `script` (bash, with "$*" the arguments)."""
  fake = tmp_path / "fake_gcloud"
  log = tmp_path / "argv.txt"
  fake.write_text(f'#!/bin/bash\nfor a in "$@"; do printf "%s\\0" "$a"; done >> {log}\n'
                  f'printf "\\n\\0" >> {log}\n{script}\n')
  fake.chmod(0o755)
  return str(fake)


def calls(tmp_path):
  return [c.split("\0")[:-1] for c in (tmp_path / "argv.txt").read_text().split("\n\0")[:-1]]


def test_setup(tmp_path):
  archive = f"{tmp_path}/corpo-jax-checkout.tar.gz"
  assert dry_run("setup", tmp_path=tmp_path) == [
      f"tar -czf {archive} -C {ROOT} --null --files-from={tmp_path}/corpo-jax-checkout.files "
      "--ignore-failed-read",
      f"{TPU} scp {archive} corpo-jax:corpo_jax.tar.gz {LOC} --worker=all",
      f"{TPU} ssh corpo-jax {LOC} --worker=all --command='{INSTALL}'"]
  files = (tmp_path / "corpo-jax-checkout.files").read_text().split("\0")
  assert "launch/tpu_vm.sh" in files and "corpo_jax/main.py" in files
  assert not any(f.startswith((".git/", "workdir")) or "__pycache__" in f for f in files)


def test_multislice_create_and_setup_address_every_node(tmp_path):
  flags = ("--queued", "--spot", "--node-count=2", "--accelerator-type=v5p-256")
  assert dry_run(*flags, "create", tmp_path=tmp_path) == [
      f"gcloud compute tpus queued-resources create corpo-jax {LOC} --node-count=2 "
      "--node-prefix=corpo-jax --accelerator-type=v5p-256 --runtime-version=v2-alpha-tpuv5 --spot"]
  archive = f"{tmp_path}/corpo-jax-checkout.tar.gz"
  assert dry_run(*flags, "setup", tmp_path=tmp_path)[1:] == [
      f"{TPU} scp {archive} corpo-jax-0:corpo_jax.tar.gz {LOC} --worker=all",
      f"{TPU} ssh corpo-jax-0 {LOC} --worker=all --command='{INSTALL}'",
      f"{TPU} scp {archive} corpo-jax-1:corpo_jax.tar.gz {LOC} --worker=all",
      f"{TPU} ssh corpo-jax-1 {LOC} --worker=all --command='{INSTALL}'"]
  assert dry_run(*flags, "copy", "w/a", tmp_path=tmp_path)[1] == (
      f"{TPU} scp --recurse corpo-jax-0:corpo_jax/w/a . {LOC} --worker=0")
  assert dry_run(*flags, "delete", tmp_path=tmp_path) == [
      f"gcloud compute tpus queued-resources delete corpo-jax {LOC} --force --quiet"]


def test_multislice_setup_runs_the_nodes_at_once(tmp_path):
  # Node 0's scp waits until node 1's has started: run one after the other, this would hang.
  gcloud = fake_gcloud(tmp_path, f"""case "$*" in
  *" corpo-jax-0:"*) for i in $(seq 100); do [ -e {tmp_path}/node1 ] && exit 0; sleep 0.05; done
                     exit 1 ;;
  *" corpo-jax-1:"*) touch {tmp_path}/node1 ;;
esac""")
  result = tpu_vm("--queued", "--node-count=2", "setup", tmp_path=tmp_path, GCLOUD=gcloud)
  assert result.returncode == 0, result.stderr
  archive = f"{tmp_path}/corpo-jax-checkout.tar.gz"
  assert sorted(c[3:5] for c in calls(tmp_path)) == [
      ["scp", archive], ["scp", archive], ["ssh", "corpo-jax-0"], ["ssh", "corpo-jax-1"]]


def test_run_copy_delete(tmp_path):
  lines = dry_run("--log-dir=logs/a", "run", "configs/corpo.py:smoke",
                  "--config.rl.rewards=((\"ordinal\", 1.0),)", "--config.workdir=w/a",
                  tmp_path=tmp_path)
  assert lines == [
      "mkdir -p logs/a",
      f"{TPU} ssh corpo-jax {LOC} --worker=all --command='cd corpo_jax && .venv/bin/python -m "
      "corpo_jax.main --config=configs/corpo.py:smoke --config.rl.rewards='\\''((\"ordinal\", "
      "1.0),)'\\'' --config.workdir=w/a' --output-directory=logs/a"]
  # The remote command, once the local shell and the remote shell have split it, is the argv.
  remote = shlex.split(lines[1])[9].removeprefix("--command=")
  assert shlex.split(remote)[-3:] == ["--config=configs/corpo.py:smoke",
                                      "--config.rl.rewards=((\"ordinal\", 1.0),)",
                                      "--config.workdir=w/a"]
  assert dry_run("copy", "w/a", "results", tmp_path=tmp_path) == [
      "mkdir -p results", f"{TPU} scp --recurse corpo-jax:corpo_jax/w/a results {LOC} --worker=0"]
  assert dry_run("delete", tmp_path=tmp_path) == [f"{TPU} delete corpo-jax {LOC} --quiet"]


def test_runs_the_printed_commands(tmp_path):
  gcloud = fake_gcloud(tmp_path)
  args = ("--queued", "run", "configs/grpo.py", "--config.seed=1")
  printed = [shlex.split(line) for line in dry_run(*args, tmp_path=tmp_path, GCLOUD=gcloud)]
  result = tpu_vm(*args, tmp_path=tmp_path, GCLOUD=gcloud)
  assert result.returncode == 0, result.stderr
  assert calls(tmp_path) == [printed[1][1:]]  # printed[0] is the mkdir, run locally
  assert (tmp_path / "logs" / "corpo-jax").is_dir()


def test_missing_gcloud(tmp_path):
  empty = tmp_path / "bin"
  empty.mkdir()
  result = tpu_vm("create", tmp_path=tmp_path, path=str(empty))
  assert result.returncode == 2
  assert "'gcloud' not found on PATH" in result.stderr and "--dry-run" in result.stderr
  assert dry_run("create", tmp_path=tmp_path, path=str(empty))[0].startswith(f"{TPU} create")


@pytest.mark.parametrize("args, message", [
    (("frob",), "unknown command 'frob'"),
    (("run",), "run needs a config"),
    (("create", "--spot"), "create takes no arguments, got '--spot' (flags go before"),
    (("--bogus", "create"), "unknown flag '--bogus'"),
    (("--node-count=2", "create"), "--node-count=2 needs --queued: several slices are made only "
                                   "as one queued resource"),
    (("--queued", "--node-count=0", "create"), "--node-count=0: use a positive integer"),
])
def test_usage_errors(tmp_path, args, message):
  result = tpu_vm("--dry-run", *args, tmp_path=tmp_path)
  assert result.returncode == 2 and message in result.stderr and not result.stdout
