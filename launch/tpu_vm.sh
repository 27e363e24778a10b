#!/usr/bin/env bash
# Cloud TPU VMs for corpo_jax: create, set up, run a config on every worker (detached), watch its
# status and logs, stop it, copy results, delete.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [FLAGS] COMMAND [ARGS...]

Commands:
  create                  create the TPU VM (a queued resource with --queued)
  setup                   copy this checkout (tracked and untracked, not ignored files) to every
                          worker, make a venv there and pip install -e ".[tpu]"; with --bucket,
                          mount the bucket at REMOTE_DIR/bucket (Cloud Storage FUSE)
  run CONFIG [FLAGS...]   start python -m corpo_jax.main --config=CONFIG FLAGS... on every worker
                          of every node, detached (setsid nohup: it outlives the ssh), its output
                          in REMOTE_DIR/logs/RUN.log and its pid in REMOTE_DIR/logs/RUN.pid on
                          each worker (the previous log kept as RUN.prev.log); with --attach in
                          the foreground instead, each worker's output in LOG_DIR/<worker>.log
  status                  the queued resource's state (with --queued), then per worker whether
                          RUN is running, finished or stopped and its log's last lines
  logs [--worker=K] [--tail=N]
                          copy each worker's RUN.log into LOG_DIR (LOG_DIR/NODE with several
                          nodes), or print its last N lines; all workers unless --worker=K
  stop                    SIGTERM to RUN on every worker: it saves a checkpoint at the end of the
                          step and exits (at once before its first step)
  watch CONFIG [FLAGS...] keep a --queued run going: poll the resource's state; once SUSPENDED or
                          FAILED delete and create it, then setup and run the same run again
                          (it resumes from its checkpoint); rerun a job that stopped; give up
                          after --max-restarts. Needs --bucket and --config.workdir=bucket/NAME
  copy REMOTE [LOCAL]     copy REMOTE (a path in the remote checkout, e.g. a workdir) from worker 0
                          (of node 0) into the local directory LOCAL (default .)
  delete                  delete the TPU VM (the queued resource and its node with --queued)

Flags (before COMMAND; each has an environment variable, the flag wins):
  --name=NAME             TPU_NAME              TPU VM (and queued resource) name [corpo-jax]
  --project=PROJECT       TPU_PROJECT           Google Cloud project [gcloud's default]
  --zone=ZONE             TPU_ZONE              zone [gcloud's default]
  --accelerator-type=T    TPU_ACCELERATOR_TYPE  e.g. v4-8, v4-32, v5litepod-16 [v4-8]
  --runtime-version=V     TPU_RUNTIME_VERSION   TPU software version [by generation: v4-*
                                                tpu-ubuntu2204-base, v5litepod-*
                                                v2-alpha-tpuv5-lite, v5p-* v2-alpha-tpuv5,
                                                v6e-* v2-alpha-tpuv6e]
  --queued                TPU_QUEUED=1          a queued resource instead of a plain TPU VM
  --node-count=N          TPU_NODE_COUNT        slices of one queued resource, joined by
                                                Multislice (nodes NAME-0 .. NAME-<N-1>) [1];
                                                N > 1 needs --queued
  --spot | --reserved     TPU_PROVISIONING      spot / reserved capacity [on-demand]
  --remote-dir=DIR        TPU_REMOTE_DIR        checkout on the workers, from $HOME [corpo_jax]
  --python=PYTHON         TPU_PYTHON            interpreter for the remote venv [python3.11]
  --log-dir=DIR           TPU_LOG_DIR           local directory for logs [logs/NAME]
  --run-name=RUN          TPU_RUN_NAME          names a run's log and pid files [run]
  --attach                TPU_ATTACH=1          run in the foreground (waits for the job)
  --libtpu-init-args=A    LIBTPU_INIT_ARGS      exported to the job's processes [unset]
  --bucket=gs://BUCKET    TPU_BUCKET            mounted by setup on every worker [none]
  --max-restarts=N        TPU_MAX_RESTARTS      watch's restarts at most [10]
  --poll-interval=S       TPU_POLL_INTERVAL     seconds between watch's polls [60]
  --dry-run                                     print every command instead of running it
  -h, --help                                    this text
GCLOUD (environment) names the gcloud binary [gcloud].

Example:
  launch/tpu_vm.sh --zone=us-central2-b --accelerator-type=v4-8 --queued --spot create
  launch/tpu_vm.sh --zone=us-central2-b setup
  launch/tpu_vm.sh --zone=us-central2-b run configs/corpo.py --config.workdir=workdir/corpo
  launch/tpu_vm.sh --zone=us-central2-b status
  launch/tpu_vm.sh --zone=us-central2-b copy workdir/corpo results/
  launch/tpu_vm.sh --zone=us-central2-b --queued delete
A queued resource is usable (setup, run) once `gcloud compute tpus queued-resources describe NAME`
reports ACTIVE (status shows it). On a multi-host slice only worker 0's workdir holds
metrics.jsonl and eval.jsonl. Multislice, preemption and a worked mixtral_8x7b example:
docs/tpu.md.
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

name=${TPU_NAME:-corpo-jax}
project=${TPU_PROJECT:-}
zone=${TPU_ZONE:-}
accelerator=${TPU_ACCELERATOR_TYPE:-v4-8}
runtime=${TPU_RUNTIME_VERSION:-}
queued=${TPU_QUEUED:-0}
node_count=${TPU_NODE_COUNT:-1}
provisioning=${TPU_PROVISIONING:-}
remote_dir=${TPU_REMOTE_DIR:-corpo_jax}
python=${TPU_PYTHON:-python3.11}
log_dir=${TPU_LOG_DIR:-}
run_name=${TPU_RUN_NAME:-run}
attach=${TPU_ATTACH:-0}
libtpu_init_args=${LIBTPU_INIT_ARGS:-}
bucket=${TPU_BUCKET:-}
max_restarts=${TPU_MAX_RESTARTS:-10}
poll_interval=${TPU_POLL_INTERVAL:-60}
gcloud=${GCLOUD:-gcloud}
dry_run=0
flags=()  # as given, for watch's own calls of this script

while [[ $# -gt 0 && $1 == -* ]]; do
  flags+=("$1")
  case $1 in
    --name=*) name=${1#*=} ;;
    --project=*) project=${1#*=} ;;
    --zone=*) zone=${1#*=} ;;
    --accelerator-type=*) accelerator=${1#*=} ;;
    --runtime-version=*) runtime=${1#*=} ;;
    --queued) queued=1 ;;
    --node-count=*) node_count=${1#*=} ;;
    --spot) provisioning=spot ;;
    --reserved) provisioning=reserved ;;
    --remote-dir=*) remote_dir=${1#*=} ;;
    --python=*) python=${1#*=} ;;
    --log-dir=*) log_dir=${1#*=} ;;
    --run-name=*) run_name=${1#*=} ;;
    --attach) attach=1 ;;
    --libtpu-init-args=*) libtpu_init_args=${1#*=} ;;
    --bucket=*) bucket=${1#*=} ;;
    --max-restarts=*) max_restarts=${1#*=} ;;
    --poll-interval=*) poll_interval=${1#*=} ;;
    --dry-run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown flag '$1' (flags go before the command; see --help)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || { usage >&2; exit 2; }
command=$1
shift
case $provisioning in
  "" | spot | reserved) ;;
  *) die "TPU_PROVISIONING=$provisioning: use spot, reserved or leave it empty" ;;
esac
[[ $queued == 0 || $queued == 1 ]] || die "TPU_QUEUED=$queued: use 0 or 1"
[[ $attach == 0 || $attach == 1 ]] || die "TPU_ATTACH=$attach: use 0 or 1"
[[ $run_name =~ ^[A-Za-z0-9_.-]+$ ]] || die "--run-name=$run_name: use letters, digits, _ . -"
if [[ -n $bucket && ! $bucket =~ ^gs://[a-z0-9][a-z0-9._-]*$ ]]; then
  die "--bucket=$bucket: use gs://BUCKET (a bucket name, no path)"
fi
[[ $max_restarts =~ ^[0-9]+$ ]] || die "--max-restarts=$max_restarts: use a number"
[[ $poll_interval =~ ^[0-9]+$ ]] || die "--poll-interval=$poll_interval: use a number of seconds"
[[ $node_count =~ ^[1-9][0-9]*$ ]] || die "--node-count=$node_count: use a positive integer"
if [[ $node_count -gt 1 && $queued == 0 ]]; then
  die "--node-count=$node_count needs --queued: several slices are made only as one queued" \
      "resource (https://cloud.google.com/tpu/docs/multislice-introduction)"
fi
log_dir=${log_dir:-logs/$name}

# The TPU VM of each slice. A multislice queued resource names its nodes PREFIX-0 .. PREFIX-<N-1>
# (MultisliceParams.nodeIdPrefix, https://cloud.google.com/tpu/docs/reference/rest/v2/
# projects.locations.queuedResources); create passes --node-prefix=NAME.
nodes=("$name")
if [[ $node_count -gt 1 ]]; then
  nodes=()
  for ((i = 0; i < node_count; i++)); do nodes+=("$name-$i"); done
fi

# The TPU software version for --accelerator-type's generation, the table of
# https://cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX"); create needs it (watch checks
# it before it starts).
default_runtime() {
  case $accelerator in
    v4-*) echo tpu-ubuntu2204-base ;;
    v5litepod-*) echo v2-alpha-tpuv5-lite ;;
    v5p-*) echo v2-alpha-tpuv5 ;;
    v6e-*) echo v2-alpha-tpuv6e ;;
    *) die "--accelerator-type=$accelerator: no default TPU software version for this" \
           "generation; pass --runtime-version=V (https://cloud.google.com/tpu/docs/runtimes)" ;;
  esac
}

if [[ $dry_run == 0 ]] && ! command -v "$gcloud" >/dev/null 2>&1; then
  die "'$gcloud' not found on PATH: install the Google Cloud SDK" \
      "(https://cloud.google.com/sdk/docs/install), or pass --dry-run to print the commands"
fi

# One shell word as it would be typed: bare when safe, else single-quoted (after a --flag=).
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then
    printf '%s' "$1"
  elif [[ $1 =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    squote "${BASH_REMATCH[2]}"
  else
    squote "$1"
  fi
}

squote() {  # single-quoted, each ' as '\''
  printf "'%s'" "${1//\'/\'\\\'\'}"
}

quote_all() {
  local out=() word
  for word in "$@"; do out+=("$(quote "$word")"); done
  echo "${out[*]}"
}

# Runs a command, or prints it under --dry-run.
run() {
  if [[ $dry_run == 1 ]]; then
    quote_all "$@"
  else
    "$@"
  fi
}

location=()
if [[ -n $zone ]]; then location+=("--zone=$zone"); fi
if [[ -n $project ]]; then location+=("--project=$project"); fi
tpu=("$gcloud" compute tpus tpu-vm)

ssh_node() {  # ssh_node NODE WORKER COMMAND [extra gcloud flags]
  local node=$1 worker=$2 remote=$3
  shift 3
  run "${tpu[@]}" ssh "$node" "${location[@]}" "--worker=$worker" "--command=$remote" "$@"
}

# Runs FUNCTION ARGS... NODE for every node, at once when there are several (not under --dry-run,
# whose lines come node by node); fails if any failed.
on_every_node() {
  local node pids=() status=0
  if [[ ${#nodes[@]} -eq 1 || $dry_run == 1 ]]; then
    for node in "${nodes[@]}"; do "$@" "$node"; done
    return
  fi
  for node in "${nodes[@]}"; do "$@" "$node" & pids+=($!); done
  for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
  return "$status"
}

# The local directory of a node's per-worker output files.
node_log_dir() {
  if [[ ${#nodes[@]} -eq 1 ]]; then echo "$log_dir"; else echo "$log_dir/$1"; fi
}

create() {
  local extra=()
  if [[ -z $runtime ]]; then runtime=$(default_runtime); fi
  if [[ -n $provisioning ]]; then extra+=("--$provisioning"); fi
  if [[ $queued == 1 ]]; then
    local node_flags=("--node-id=$name")
    if [[ $node_count -gt 1 ]]; then
      node_flags=("--node-count=$node_count" "--node-prefix=$name")
    fi
    run "$gcloud" compute tpus queued-resources create "$name" "${location[@]}" \
        "${node_flags[@]}" "--accelerator-type=$accelerator" "--runtime-version=$runtime" \
        "${extra[@]}"
  else
    run "${tpu[@]}" create "$name" "${location[@]}" "--accelerator-type=$accelerator" \
        "--version=$runtime" "${extra[@]}"
  fi
}

setup() {
  local root files archive remote
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  files=${TMPDIR:-/tmp}/$name-checkout.files
  archive=${TMPDIR:-/tmp}/$name-checkout.tar.gz
  # The file list is written under --dry-run too (it reads the checkout only).
  git -C "$root" ls-files -z --cached --others --exclude-standard >"$files"
  run tar -czf "$archive" -C "$root" --null "--files-from=$files" --ignore-failed-read
  remote="set -e; command -v $python >/dev/null || { sudo apt-get update -q"
  remote+=" && sudo apt-get install -y -q $python $python-venv; }"
  remote+="; mkdir -p $remote_dir && tar -xzf $remote_dir.tar.gz -C $remote_dir"
  remote+=" && cd $remote_dir && $python -m venv .venv && .venv/bin/pip install -q -e \".[tpu]\""
  on_every_node setup_node "$archive" "$remote"
}

setup_node() {  # setup_node ARCHIVE INSTALL_COMMAND NODE
  run "${tpu[@]}" scp "$1" "$3:$remote_dir.tar.gz" "${location[@]}" --worker=all
  ssh_node "$3" all "$2"
  if [[ -n $bucket ]]; then ssh_node "$3" all "$(mount_bucket)"; fi
}

# --bucket is mounted with Cloud Storage FUSE at REMOTE_DIR/$mount on every worker, so that a
# workdir there (--config.workdir=$mount/RUN) outlives the workers' disks. corpo_jax's workdir code
# uses local file operations (os.makedirs, open, orbax on a local path), so a gs:// workdir would
# not work. Orbax commits a checkpoint by renaming its temporary directory: on a flat bucket
# gcsfuse renames a directory only below --rename-dir-limit descendants (default 0), by copying
# each object; a bucket with hierarchical namespace renames folders atomically. All hosts write
# the one workdir, so metadata is not cached (--metadata-cache-ttl-secs=0): every host sees the
# others' checkpoints at once. https://cloud.google.com/storage/docs/cloud-storage-fuse/overview
mount=bucket
mount_bucket() {
  local key=/usr/share/keyrings/cloud.google.asc dir=$remote_dir/$mount install
  install="echo \"deb [signed-by=$key] https://packages.cloud.google.com/apt"
  install+=" gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list"
  install+=" >/dev/null && curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg"
  install+=" | sudo tee $key >/dev/null && sudo apt-get update -q && sudo apt-get install -y -q"
  install+=" gcsfuse"
  echo "set -e; command -v gcsfuse >/dev/null || { $install; }; mkdir -p $dir; mountpoint -q" \
       "$dir || gcsfuse --implicit-dirs --metadata-cache-ttl-secs=0 --rename-dir-limit=1000000" \
       "${bucket#gs://} $dir"
}

# What the job's processes start with: output unbuffered (the logs are read while it runs) and
# LIBTPU_INIT_ARGS when given. Multislice needs nothing here: on a multislice queued resource the
# TPU metadata (tpu-env) holds MEGASCALE_COORDINATOR_ADDRESS, MEGASCALE_NUM_SLICES and
# MEGASCALE_SLICE_ID, which JAX's jax.distributed.initialize() reads when they are not in the
# environment (jax/_src/clusters/cloud_tpu_cluster.py, get_tpu_env_value).
job_env() {
  local env="export PYTHONUNBUFFERED=1"
  if [[ -n $libtpu_init_args ]]; then env+=" LIBTPU_INIT_ARGS=$(squote "$libtpu_init_args")"; fi
  echo "$env"
}

# Remote shell tests, run in the checkout on a worker. A job is its pid file's process while that
# process is still corpo_jax.main; "finished" is the line corpo_jax/main.py prints at the end of a
# run (process 0 only); anything else (a crash, a preemption's clean exit) is "stopped".
job_log=logs/$run_name.log
job_pid=logs/$run_name.pid
job_running="ps -o args= -p \"\$(cat $job_pid 2>/dev/null)\" 2>/dev/null | grep -q corpo_jax.main"
job_state="if $job_running; then echo running; elif grep -qs '^corpo_jax: finished' $job_log;"
job_state+=" then echo finished; else echo stopped; fi"

run_config() {
  [[ $# -ge 1 && $1 != -* ]] || die "run needs a config: run CONFIG [--config.FIELD=VALUE ...]"
  local main node
  main=".venv/bin/python -m corpo_jax.main $(quote_all "--config=$1" "${@:2}")"
  if [[ $attach == 1 ]]; then
    on_every_node run_attached "cd $remote_dir && $(job_env) && $main"
  else
    for node in "${nodes[@]}"; do ssh_node "$node" all "$(detached "$main")"; done
  fi
}

run_attached() {  # run_attached COMMAND NODE: in the foreground, per-worker output files
  run mkdir -p "$(node_log_dir "$2")"
  ssh_node "$2" all "$1" "--output-directory=$(node_log_dir "$2")"
}

# The remote command that starts MAIN on a worker in its own session (setsid: an ssh that drops
# sends it no SIGHUP; nohup too), output to the job's log (the previous one kept as .prev.log), its
# pid to the pid file. A job of the same name that is still running is left alone.
detached() {
  local cmd="set -e; cd $remote_dir; mkdir -p logs; if $job_running; then"
  cmd+=" echo \"\$(hostname): $run_name is running (stop ends it)\" >&2; exit 1; fi"
  cmd+="; if [ -f $job_log ]; then mv $job_log logs/$run_name.prev.log; fi; $(job_env)"
  cmd+="; setsid nohup $1 >$job_log 2>&1 </dev/null & echo \$! >$job_pid"
  cmd+="; echo \"\$(hostname): $run_name started\""
  echo "$cmd"
}

# Prefixes each line of a remote command's output with the worker's host name (run remotely).
# shellcheck disable=SC2016
by_host='sed "s/^/$(hostname): /"'

status() {
  local node remote
  if [[ $queued == 1 ]]; then
    run "$gcloud" compute tpus queued-resources describe "$name" "${location[@]}" \
        "--format=value(state.state)"
  fi
  remote="cd $remote_dir; { echo \"$run_name \$($job_state)\"; tail -n 3 $job_log 2>/dev/null; }"
  for node in "${nodes[@]}"; do ssh_node "$node" all "$remote | $by_host"; done
}

# logs [--worker=K] [--tail=N]: each worker's job log into LOG_DIR (one file per worker, in
# LOG_DIR/NODE with several nodes), or its last N lines printed.
logs() {
  local worker=all lines="" node
  while [[ $# -gt 0 ]]; do
    case $1 in
      --worker=*) worker=${1#*=} ;;
      --tail=*) lines=${1#*=} ;;
      *) die "logs takes --worker=K and --tail=N, got '$1'" ;;
    esac
    shift
  done
  [[ $worker == all || $worker =~ ^[0-9]+$ ]] || die "--worker=$worker: use a worker index or all"
  [[ -z $lines || $lines =~ ^[0-9]+$ ]] || die "--tail=$lines: use a number of lines"
  for node in "${nodes[@]}"; do
    if [[ -n $lines ]]; then
      ssh_node "$node" "$worker" "tail -n $lines $remote_dir/$job_log | $by_host"
    else
      run mkdir -p "$(node_log_dir "$node")"
      ssh_node "$node" "$worker" "cat $remote_dir/$job_log" \
          "--output-directory=$(node_log_dir "$node")"
    fi
  done
}

# SIGTERM to the job on every worker: corpo_jax saves a checkpoint at the end of the step and exits
# (corpo_jax/train/checkpoint.py), so a later run resumes from it.
stop() {
  local node remote
  remote="cd $remote_dir; if $job_running; then kill -TERM \"\$(cat $job_pid)\";"
  remote+=" echo \"\$(hostname): SIGTERM sent to $run_name\";"
  remote+=" else echo \"\$(hostname): $run_name is not running\"; fi"
  for node in "${nodes[@]}"; do ssh_node "$node" all "$remote"; done
}

# watch CONFIG [FLAGS...]: keeps the run going until it finishes. Every --poll-interval seconds it
# reads the queued resource's state; once SUSPENDED or FAILED (a spot preemption ends in
# SUSPENDED) it deletes and creates the resource again and, when it is ACTIVE, runs setup and the
# same run, which resumes from the checkpoint in the bucket's workdir. A job that stopped on an
# ACTIVE resource (a crash, a lost worker) is run again. Each of these is a restart; watch gives up
# after --max-restarts of them. It calls this script for create, setup, run and delete.
watch() {
  [[ $# -ge 1 && $1 != -* ]] || die "watch needs the run: watch CONFIG [--config.FIELD=VALUE ...]"
  [[ $queued == 1 ]] || die "watch follows a queued resource's state: add --queued"
  [[ -n $bucket ]] || die "watch needs --bucket=gs://BUCKET: preemption wipes the workers'" \
      "disks, so the run resumes only from a workdir in the bucket"
  [[ " $* " == *"workdir=$mount/"* ]] || die "watch: the workdir must be in the bucket, or a" \
      "rerun starts over: pass --config.workdir=$mount/NAME (the bucket is mounted at" \
      "$remote_dir/$mount on every worker)"
  [[ $dry_run == 0 ]] || die "watch polls the resource, it has no --dry-run (its steps create," \
      "setup, run and delete have one)"
  [[ $attach == 0 ]] || die "watch runs the job detached: drop --attach"
  if [[ -z $runtime ]]; then runtime=$(default_runtime); fi
  resource_state >/dev/null || die "cannot describe the queued resource $name: create it first"
  restarts=0
  local launched=0 fresh=0 exists=1 state words
  while true; do
    state=$(resource_state) || state=""
    case $state in
      ACTIVE)
        if [[ $fresh == 1 ]]; then
          if self setup && self run "$@"; then
            fresh=0 launched=1
          else
            restart "setup or run failed"
          fi
        elif words=$(job_states); then
          if grep -qx running <<<"$words"; then
            launched=1
          elif grep -qx finished <<<"$words"; then
            note "$run_name finished"
            return
          else
            if [[ $launched == 1 ]]; then restart "$run_name stopped"; fi
            self run "$@" || note "run failed"
            launched=1
          fi
        fi ;;
      SUSPENDED | FAILED)
        restart "$name is $state"
        self delete || note "delete failed"
        if self create; then fresh=1 exists=1; else exists=0; fi ;;
      "")
        if [[ $exists == 0 ]]; then
          restart "$name is gone"
          if self create; then fresh=1 exists=1; fi
        fi ;;
    esac
    sleep "$poll_interval"
  done
}

self() {  # this script with the flags it was given
  "$BASH" "${BASH_SOURCE[0]}" "${flags[@]}" "$@"
}

note() {
  echo "tpu_vm.sh: watch: $(date -u '+%F %T'): $*" >&2
}

restart() {  # restart REASON: counts one, or ends watch once --max-restarts are spent
  restarts=$((restarts + 1))
  if [[ $restarts -gt $max_restarts ]]; then
    note "$1; giving up after --max-restarts=$max_restarts"
    exit 1
  fi
  note "$1: restart $restarts of $max_restarts"
}

resource_state() {
  "$gcloud" compute tpus queued-resources describe "$name" "${location[@]}" \
      "--format=value(state.state)"
}

job_states() {  # the job's state on every worker of every node, one a line
  local node
  for node in "${nodes[@]}"; do
    ssh_node "$node" all "cd $remote_dir; $job_state" || return
  done
}

copy() {
  [[ $# -ge 1 && $# -le 2 ]] || die "copy needs REMOTE [LOCAL]"
  local local_dir=${2:-.}
  run mkdir -p "$local_dir"
  run "${tpu[@]}" scp --recurse "${nodes[0]}:$remote_dir/$1" "$local_dir" "${location[@]}" \
      --worker=0
}

delete() {
  if [[ $queued == 1 ]]; then
    run "$gcloud" compute tpus queued-resources delete "$name" "${location[@]}" --force --quiet
  else
    run "${tpu[@]}" delete "$name" "${location[@]}" --quiet
  fi
}

no_args() {
  [[ $# -eq 0 ]] || die "$command takes no arguments, got '$*' (flags go before the command)"
}

case $command in
  create) no_args "$@"; create ;;
  setup) no_args "$@"; setup ;;
  run) run_config "$@" ;;
  status) no_args "$@"; status ;;
  logs) logs "$@" ;;
  stop) no_args "$@"; stop ;;
  watch) watch "$@" ;;
  copy) copy "$@" ;;
  delete) no_args "$@"; delete ;;
  *) die "unknown command '$command'; one of create, setup, run, status, logs, stop, watch," \
         "copy, delete (see --help)" ;;
esac
