"""launch/tpu_vm.sh: the exact gcloud commands of every subcommand (--dry-run), one slice and
several; that a real run executes the same argv; the remote commands of run/status/logs/stop
executed on a fake worker (bash in a temporary home); watch's calls with a fake gcloud that
plays a preemption; the refusals and the error when gcloud is missing. Nothing here reaches the
network or a real gcloud."""

import os
import re
import shlex
import socket
import subprocess
import time

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
  `script` (bash, with "$*" the arguments). A record is appended in one write, so calls made at
  once do not interleave."""
  fake = tmp_path / "fake_gcloud"
  log = tmp_path / "argv.txt"
  fake.write_text(f'#!/bin/bash\nrecord=$(mktemp)\nprintf "%s\\0" "$@" > "$record"\n'
                  f'printf "\\n\\0" >> "$record"\ncat "$record" >> {log}\nrm "$record"\n'
                  f'{script}\n')
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


def remote_command(line):
  """The --command of a printed gcloud ssh line: what the worker's shell runs."""
  [command] = [a for a in shlex.split(line) if a.startswith("--command=")]
  return command.removeprefix("--command=")


RUNNING = ('ps -o args= -p "$(cat logs/run.pid 2>/dev/null)" 2>/dev/null | grep -q '
           'corpo_jax.main')


def test_run_starts_a_detached_job_with_a_log_and_pid_file_per_worker(tmp_path):
  lines = dry_run("run", "configs/corpo.py:smoke", "--config.rl.rewards=((\"ordinal\", 1.0),)",
                  "--config.workdir=w/a", tmp_path=tmp_path)
  assert len(lines) == 1 and lines[0].startswith(f"{TPU} ssh corpo-jax {LOC} --worker=all "
                                                 "--command='set -e; cd corpo_jax;")
  main = (".venv/bin/python -m corpo_jax.main --config=configs/corpo.py:smoke "
          "--config.rl.rewards='((\"ordinal\", 1.0),)' --config.workdir=w/a")
  assert remote_command(lines[0]) == (
      f"set -e; cd corpo_jax; mkdir -p logs; if {RUNNING}; then echo \"$(hostname): run is "
      "running (stop ends it)\" >&2; exit 1; fi; if [ -f logs/run.log ]; then mv logs/run.log "
      "logs/run.prev.log; fi; export PYTHONUNBUFFERED=1; "
      f"setsid nohup {main} >logs/run.log 2>&1 </dev/null & echo $! >logs/run.pid; "
      'echo "$(hostname): run started"')
  # The remote shell splits the job's command back into the argv given here.
  assert shlex.split(main)[-3:] == ["--config=configs/corpo.py:smoke",
                                    "--config.rl.rewards=((\"ordinal\", 1.0),)",
                                    "--config.workdir=w/a"]
  named = remote_command(dry_run("--run-name=mix-1", "run", "c.py", tmp_path=tmp_path)[0])
  assert ">logs/mix-1.log 2>&1 </dev/null & echo $! >logs/mix-1.pid" in named
  assert "mv logs/mix-1.log logs/mix-1.prev.log" in named


def test_run_attached_copy_delete(tmp_path):
  lines = dry_run("--log-dir=logs/a", "--attach", "run", "configs/corpo.py:smoke",
                  "--config.workdir=w/a", tmp_path=tmp_path)
  assert lines == [
      "mkdir -p logs/a",
      f"{TPU} ssh corpo-jax {LOC} --worker=all --command='cd corpo_jax && export "
      "PYTHONUNBUFFERED=1 && .venv/bin/python -m corpo_jax.main --config=configs/corpo.py:smoke "
      "--config.workdir=w/a' --output-directory=logs/a"]
  assert dry_run("copy", "w/a", "results", tmp_path=tmp_path) == [
      "mkdir -p results", f"{TPU} scp --recurse corpo-jax:corpo_jax/w/a results {LOC} --worker=0"]
  assert dry_run("delete", tmp_path=tmp_path) == [f"{TPU} delete corpo-jax {LOC} --quiet"]


def ssh_targets(lines):
  return [line.split(" --command=")[0] for line in lines]


def test_multislice_run_status_logs_stop_address_every_node(tmp_path):
  flags = ("--queued", "--node-count=2")
  each_node = [f"{TPU} ssh corpo-jax-0 {LOC} --worker=all",
               f"{TPU} ssh corpo-jax-1 {LOC} --worker=all"]
  run = dry_run(*flags, "run", "c.py", tmp_path=tmp_path)
  assert ssh_targets(run) == each_node and remote_command(run[0]) == remote_command(run[1])
  attached = dry_run(*flags, "--attach", "run", "c.py", tmp_path=tmp_path)
  assert ssh_targets(attached) == ["mkdir -p logs/corpo-jax/corpo-jax-0", each_node[0],
                                   "mkdir -p logs/corpo-jax/corpo-jax-1", each_node[1]]
  assert attached[1].endswith(" --output-directory=logs/corpo-jax/corpo-jax-0")
  status = dry_run(*flags, "status", tmp_path=tmp_path)
  assert status[0] == (f"gcloud compute tpus queued-resources describe corpo-jax {LOC} "
                       "--format='value(state.state)'")
  assert ssh_targets(status[1:]) == each_node
  assert remote_command(status[1]) == (
      f'cd corpo_jax; {{ echo "run $(if {RUNNING}; then echo running; elif grep -qs '
      "'^corpo_jax: finished' logs/run.log; then echo finished; else echo stopped; fi)\"; "
      'tail -n 3 logs/run.log 2>/dev/null; } | sed "s/^/$(hostname): /"')
  assert dry_run(*flags, "logs", "--worker=3", tmp_path=tmp_path) == [
      "mkdir -p logs/corpo-jax/corpo-jax-0",
      f"{TPU} ssh corpo-jax-0 {LOC} --worker=3 --command='cat corpo_jax/logs/run.log' "
      "--output-directory=logs/corpo-jax/corpo-jax-0",
      "mkdir -p logs/corpo-jax/corpo-jax-1",
      f"{TPU} ssh corpo-jax-1 {LOC} --worker=3 --command='cat corpo_jax/logs/run.log' "
      "--output-directory=logs/corpo-jax/corpo-jax-1"]
  tails = dry_run(*flags, "logs", "--tail=20", tmp_path=tmp_path)
  assert [remote_command(line) for line in tails] == [
      'tail -n 20 corpo_jax/logs/run.log | sed "s/^/$(hostname): /"'] * 2
  stop = dry_run(*flags, "stop", tmp_path=tmp_path)
  assert ssh_targets(stop) == each_node
  assert remote_command(stop[0]) == (
      f'cd corpo_jax; if {RUNNING}; then kill -TERM "$(cat logs/run.pid)"; echo "$(hostname): '
      'SIGTERM sent to run"; else echo "$(hostname): run is not running"; fi')


LIBTPU = "--xla_tpu_megacore_fusion=true --xla_dump_to='/tmp/a b' \"q\" $HOME"


@pytest.mark.parametrize("how", ["environment", "flag"])
def test_libtpu_init_args_reach_the_job_quoted(tmp_path, how):
  args, env = (([f"--libtpu-init-args={LIBTPU}"], {"LIBTPU_INIT_ARGS": "ignored"})
               if how == "flag" else ([], {"LIBTPU_INIT_ARGS": LIBTPU}))
  export = ("export PYTHONUNBUFFERED=1 LIBTPU_INIT_ARGS='--xla_tpu_megacore_fusion=true "
            "--xla_dump_to='\\''/tmp/a b'\\'' \"q\" $HOME'")
  detached = remote_command(dry_run(*args, "run", "c.py", tmp_path=tmp_path, **env)[0])
  assert f"; {export}; setsid nohup .venv/bin/python" in detached
  attached = remote_command(dry_run(*args, "--attach", "run", "c.py", tmp_path=tmp_path,
                                    **env)[1])
  assert attached.startswith(f"cd corpo_jax && {export} && .venv/bin/python")
  # A shell given the export holds the value unchanged ($HOME not expanded).
  echoed = subprocess.run(["bash", "-c", f'{export}; printf %s "$LIBTPU_INIT_ARGS"'],
                          capture_output=True, text=True, check=True).stdout
  assert echoed == LIBTPU


FAKE_MAIN = """#!/bin/bash
echo "args: $*"; echo "LIBTPU_INIT_ARGS=$LIBTPU_INIT_ARGS"
trap 'echo "corpo_jax: preempted; rerun the same command"; exit 0' TERM
for i in $(seq 400); do [ -e finish ] && break; sleep 0.05; done
echo "corpo_jax: finished rl in 1s."
"""


def fake_worker(tmp_path):
  """A gcloud whose ssh runs --command in bash in a fake worker's home (tmp_path/home), where
  .venv/bin/python stands in for corpo_jax.main: it prints its arguments and LIBTPU_INIT_ARGS,
  then waits for a file `finish` (and prints main.py's last line) or SIGTERM (and says so)."""
  checkout = tmp_path / "home" / "corpo_jax"
  (checkout / ".venv" / "bin").mkdir(parents=True)
  python = checkout / ".venv" / "bin" / "python"
  python.write_text(FAKE_MAIN)
  python.chmod(0o755)
  return fake_gcloud(tmp_path, '[ "$4" = ssh ] || exit 0\n'
                     'for a in "$@"; do case $a in --command=*) cmd=${a#--command=} ;; esac; done\n'
                     f'cd {tmp_path}/home && exec bash -c "$cmd"')


def wait_for(predicate):
  for _ in range(200):
    if predicate():
      return
    time.sleep(0.05)
  raise AssertionError("timed out")


def test_detached_run_status_logs_stop_on_a_fake_worker(tmp_path):
  gcloud = fake_worker(tmp_path)
  checkout = tmp_path / "home" / "corpo_jax"
  log = checkout / "logs" / "run.log"
  host = socket.gethostname()
  started = f"args: -m corpo_jax.main --config=c.py\nLIBTPU_INIT_ARGS={LIBTPU}\n"

  def go(*args):
    return tpu_vm(*args, tmp_path=tmp_path, GCLOUD=gcloud, LIBTPU_INIT_ARGS=LIBTPU)

  try:
    assert go("run", "c.py").stdout == f"{host}: run started\n"
    wait_for(lambda: log.exists() and log.read_text() == started)
    pid = (checkout / "logs" / "run.pid").read_text().strip()
    assert "corpo_jax.main" in subprocess.run(["ps", "-o", "args=", "-p", pid],
                                              capture_output=True, text=True).stdout
    assert go("status").stdout == (f"{host}: run running\n{host}: args: -m corpo_jax.main "
                                   f"--config=c.py\n{host}: LIBTPU_INIT_ARGS={LIBTPU}\n")
    again = go("run", "c.py")
    assert again.returncode == 1 and f"{host}: run is running (stop ends it)" in again.stderr
    assert go("stop").stdout == f"{host}: SIGTERM sent to run\n"
    wait_for(lambda: "preempted" in log.read_text())
    wait_for(lambda: go("status").stdout.startswith(f"{host}: run stopped\n"))
    assert go("stop").stdout == f"{host}: run is not running\n"
    assert go("run", "c.py").returncode == 0
    wait_for(lambda: log.exists() and log.read_text() == started)
    assert (checkout / "logs" / "run.prev.log").read_text() == (
        started + "corpo_jax: preempted; rerun the same command\n")
    (checkout / "finish").touch()
    wait_for(lambda: "finished" in log.read_text())
    wait_for(lambda: go("status").stdout.startswith(f"{host}: run finished\n"))
    assert go("logs", "--tail=1").stdout == f"{host}: corpo_jax: finished rl in 1s.\n"
  finally:
    (checkout / "finish").touch()


MOUNT = ("set -e; command -v gcsfuse >/dev/null || { echo \"deb [signed-by=/usr/share/keyrings/"
         "cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-$(lsb_release -c -s) "
         "main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null && curl -fsSL "
         "https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee "
         "/usr/share/keyrings/cloud.google.asc >/dev/null && sudo apt-get update -q && sudo "
         "apt-get install -y -q gcsfuse; }; mkdir -p corpo_jax/bucket; mountpoint -q "
         "corpo_jax/bucket || gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 "
         "--rename-dir-limit=1000000 my-bucket corpo_jax/bucket")


def test_setup_mounts_the_bucket_on_every_node(tmp_path):
  lines = dry_run("--queued", "--node-count=2", "--bucket=gs://my-bucket", "setup",
                  tmp_path=tmp_path)
  assert [line.split(" --command=")[0] for line in lines[1:]] == [
      f"{TPU} scp {tmp_path}/corpo-jax-checkout.tar.gz corpo-jax-0:corpo_jax.tar.gz {LOC} "
      "--worker=all", f"{TPU} ssh corpo-jax-0 {LOC} --worker=all",
      f"{TPU} ssh corpo-jax-0 {LOC} --worker=all",
      f"{TPU} scp {tmp_path}/corpo-jax-checkout.tar.gz corpo-jax-1:corpo_jax.tar.gz {LOC} "
      "--worker=all", f"{TPU} ssh corpo-jax-1 {LOC} --worker=all",
      f"{TPU} ssh corpo-jax-1 {LOC} --worker=all"]
  assert [remote_command(lines[i]) for i in (2, 3, 5, 6)] == [INSTALL, MOUNT, INSTALL, MOUNT]


WATCH = ("--queued", "--spot", "--accelerator-type=v5p-128", "--bucket=gs://my-bucket",
         "--poll-interval=0")
RUN = ("configs/corpo.py:model=mixtral_8x7b", "--config.workdir=bucket/mix")
GCP_LOC = ["--zone=us-central2-b", "--project=my-proj"]
QR = ["compute", "tpus", "queued-resources"]
DESCRIBE = QR + ["describe", "corpo-jax", *GCP_LOC, "--format=value(state.state)"]
JOB_STATE = (f"cd corpo_jax; if {RUNNING}; then echo running; elif grep -qs '^corpo_jax: "
             "finished' logs/run.log; then echo finished; else echo stopped; fi")


def ssh(node, command):
  return ["compute", "tpus", "tpu-vm", "ssh", node, *GCP_LOC, "--worker=all",
          f"--command={command}"]


def watch(tmp_path, states, jobs, *flags):
  """Runs watch with a gcloud that answers describe with the next line of `states` and the job
  state query with the next line of `jobs` ('|' between workers); the rest it only records."""
  (tmp_path / "states").write_text("".join(s + "\n" for s in states))
  (tmp_path / "jobs").write_text("".join(j + "\n" for j in jobs))
  gcloud = fake_gcloud(tmp_path, f'''case "$*" in
  *"queued-resources describe"*) reply={tmp_path}/states ;;
  *"then echo finished;"*) reply={tmp_path}/jobs ;;
  *) exit 0 ;;
esac
[ -s "$reply" ] || exit 1
head -n 1 "$reply" | tr '|' '\\n'; sed -i 1d "$reply"''')
  result = tpu_vm(*WATCH, *flags, "watch", *RUN, tmp_path=tmp_path, GCLOUD=gcloud)
  notes = [re.sub(r"^tpu_vm\.sh: watch: [-0-9]+ [0-9:]+: ", "", line)
           for line in result.stderr.splitlines()]
  return result.returncode, notes


def test_watch_recreates_a_preempted_resource_and_reruns_the_job(tmp_path):
  states = ["ACTIVE", "ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE", "ACTIVE"]
  status, notes = watch(tmp_path, states, ["running", "finished|stopped|stopped|stopped"])
  assert (status, notes) == (0, ["corpo-jax is SUSPENDED: restart 1 of 10", "run finished"])
  archive = f"{tmp_path}/corpo-jax-checkout.tar.gz"
  rerun = remote_command(dry_run(*WATCH, "run", *RUN, tmp_path=tmp_path)[0])
  assert calls(tmp_path) == [
      DESCRIBE,  # watch refuses a resource it cannot describe
      DESCRIBE, ssh("corpo-jax", JOB_STATE),  # ACTIVE, running
      DESCRIBE,  # SUSPENDED: delete, create
      QR + ["delete", "corpo-jax", *GCP_LOC, "--force", "--quiet"],
      QR + ["create", "corpo-jax", *GCP_LOC, "--node-id=corpo-jax", "--accelerator-type=v5p-128",
            "--runtime-version=v2-alpha-tpuv5", "--spot"],
      DESCRIBE,  # WAITING_FOR_RESOURCES
      DESCRIBE,  # ACTIVE: setup (install, mount the bucket), then the same run
      ["compute", "tpus", "tpu-vm", "scp", archive, "corpo-jax:corpo_jax.tar.gz", *GCP_LOC,
       "--worker=all"],
      ssh("corpo-jax", INSTALL), ssh("corpo-jax", MOUNT), ssh("corpo-jax", rerun),
      DESCRIBE, ssh("corpo-jax", JOB_STATE)]  # ACTIVE, finished on worker 0
  assert "--config.workdir=bucket/mix >logs/run.log" in rerun


def test_watch_reruns_a_stopped_job_on_every_node(tmp_path):
  # The first start is not a restart; a job that stops later is.
  status, notes = watch(tmp_path, ["ACTIVE"] * 5,
                        ["stopped|stopped", "stopped|stopped", "running|stopped", "running",
                         "stopped|stopped", "stopped|stopped", "stopped|finished", "stopped"],
                        "--queued", "--node-count=2")
  assert (status, notes) == (0, ["run stopped: restart 1 of 10", "run finished"])
  ran = [c[4] for c in calls(tmp_path) if c[3] == "ssh" and "setsid nohup" in c[-1]]
  assert ran == ["corpo-jax-0", "corpo-jax-1"] * 2
  asked = [c[4] for c in calls(tmp_path) if c[3] == "ssh" and c[-1] == f"--command={JOB_STATE}"]
  assert asked == ["corpo-jax-0", "corpo-jax-1"] * 4


def test_watch_gives_up_after_max_restarts(tmp_path):
  status, notes = watch(tmp_path, ["ACTIVE", "FAILED", "SUSPENDED"], [], "--max-restarts=1")
  assert (status, notes) == (1, ["corpo-jax is FAILED: restart 1 of 1",
                                 "corpo-jax is SUSPENDED; giving up after --max-restarts=1"])
  assert [c[3] for c in calls(tmp_path)] == ["describe", "describe", "delete", "create",
                                             "describe"]


def test_watch_main_prints_the_line_watch_waits_for():
  # watch and status call a run finished when its log has main.py's closing line.
  with open(os.path.join(ROOT, "corpo_jax", "main.py")) as f:
    assert 'print(f"corpo_jax: finished ' in f.read()


@pytest.mark.parametrize("flags, message", [
    (("--bucket=gs://b",), "watch follows a queued resource's state: add --queued"),
    (("--queued",), "watch needs --bucket=gs://BUCKET: preemption wipes the workers' disks, so "
                    "the run resumes only from a workdir in the bucket"),
    (("--queued", "--bucket=gs://b", "--accelerator-type=v3-8"),
     "--accelerator-type=v3-8: no default TPU software version"),
    (("--queued", "--bucket=gs://b", "--attach"), "watch runs the job detached: drop --attach"),
    (("--queued", "--bucket=gs://b", "--dry-run"), "watch polls the resource, it has no --dry-run"),
])
def test_watch_refusals(tmp_path, flags, message):
  result = tpu_vm(*flags, "watch", "c.py", "--config.workdir=bucket/a", tmp_path=tmp_path,
                  GCLOUD=fake_gcloud(tmp_path))
  assert result.returncode == 2 and message in result.stderr
  assert not (tmp_path / "argv.txt").exists()  # nothing was called


def test_watch_refuses_a_workdir_outside_the_bucket(tmp_path):
  result = tpu_vm("--queued", "--bucket=gs://b", "watch", "c.py", "--config.workdir=w/a",
                  tmp_path=tmp_path, GCLOUD=fake_gcloud(tmp_path))
  assert result.returncode == 2 and result.stderr == (
      "tpu_vm.sh: error: watch: the workdir must be in the bucket, or a rerun starts over: pass "
      "--config.workdir=bucket/NAME (the bucket is mounted at corpo_jax/bucket on every worker)\n")
  result = tpu_vm("--queued", "--bucket=gs://b", "watch", "c.py", tmp_path=tmp_path,
                  GCLOUD=fake_gcloud(tmp_path, "exit 1"))  # workdir in the config argument
  assert result.returncode == 2 and "workdir must be in the bucket" in result.stderr
  result = tpu_vm("--queued", "--bucket=gs://b", "watch", "c.py:workdir=bucket/a",
                  tmp_path=tmp_path, GCLOUD=fake_gcloud(tmp_path, "exit 1"))
  assert result.returncode == 2 and result.stderr == (
      "tpu_vm.sh: error: cannot describe the queued resource corpo-jax: create it first\n")


def test_runs_the_printed_commands(tmp_path):
  gcloud = fake_gcloud(tmp_path)
  for mode in ([], ["--attach"]):
    (tmp_path / "argv.txt").unlink(missing_ok=True)
    args = ("--queued", *mode, "run", "configs/grpo.py", "--config.seed=1")
    printed = [shlex.split(line) for line in dry_run(*args, tmp_path=tmp_path, GCLOUD=gcloud)]
    result = tpu_vm(*args, tmp_path=tmp_path, GCLOUD=gcloud)
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path) == [printed[-1][1:]]  # under --attach printed[0] is the mkdir
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
    (("status", "x"), "status takes no arguments, got 'x'"),
    (("logs", "--worker=a"), "--worker=a: use a worker index or all"),
    (("logs", "--tail=x"), "--tail=x: use a number of lines"),
    (("logs", "x"), "logs takes --worker=K and --tail=N, got 'x'"),
    (("--run-name=a b", "run", "c.py"), "--run-name=a b: use letters, digits, _ . -"),
    (("--bucket=gs://b/dir", "setup"), "--bucket=gs://b/dir: use gs://BUCKET (a bucket name, no "
                                       "path)"),
    (("--max-restarts=-1", "status"), "--max-restarts=-1: use a number"),
    (("--poll-interval=1m", "status"), "--poll-interval=1m: use a number of seconds"),
])
def test_usage_errors(tmp_path, args, message):
  result = tpu_vm("--dry-run", *args, tmp_path=tmp_path)
  assert result.returncode == 2 and message in result.stderr and not result.stdout
