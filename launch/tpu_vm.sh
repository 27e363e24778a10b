#!/usr/bin/env bash
# Cloud TPU VMs for corpo_jax: create, set up, run a config on every worker, copy results, delete.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh [FLAGS] COMMAND [ARGS...]

Commands:
  create                  create the TPU VM (a queued resource with --queued)
  setup                   copy this checkout (tracked and untracked, not ignored files) to every
                          worker, make a venv there and pip install -e ".[tpu]"
  run CONFIG [FLAGS...]   python -m corpo_jax.main --config=CONFIG FLAGS... on all workers at
                          once (--worker=all); each worker's output goes to LOG_DIR/<worker>.log
  copy REMOTE [LOCAL]     copy REMOTE (a path in the remote checkout, e.g. a workdir) from worker 0
                          into the local directory LOCAL (default .)
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
  --log-dir=DIR           TPU_LOG_DIR           local directory for run logs [logs/NAME]
  --dry-run                                     print every command instead of running it
  -h, --help                                    this text
GCLOUD (environment) names the gcloud binary [gcloud].

Example:
  launch/tpu_vm.sh --zone=us-central2-b --accelerator-type=v4-8 --queued --spot create
  launch/tpu_vm.sh --zone=us-central2-b setup
  launch/tpu_vm.sh --zone=us-central2-b run configs/corpo.py --config.workdir=workdir/corpo
  launch/tpu_vm.sh --zone=us-central2-b copy workdir/corpo results/
  launch/tpu_vm.sh --zone=us-central2-b --queued delete
A queued resource is usable (setup, run) once `gcloud compute tpus queued-resources describe NAME`
reports ACTIVE. On a multi-host slice only worker 0's workdir holds metrics.jsonl and eval.jsonl.
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
gcloud=${GCLOUD:-gcloud}
dry_run=0

while [[ $# -gt 0 && $1 == -* ]]; do
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
# https://cloud.google.com/tpu/docs/runtimes ("PyTorch and JAX"); only create needs it.
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
    printf "%s'%s'" "${BASH_REMATCH[1]}" "${BASH_REMATCH[2]//\'/\'\\\'\'}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
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
}

run_config() {
  [[ $# -ge 1 && $1 != -* ]] || die "run needs a config: run CONFIG [--config.FIELD=VALUE ...]"
  local config=$1
  shift
  on_every_node run_on_node "cd $remote_dir && .venv/bin/python -m corpo_jax.main $(quote_all \
      "--config=$config" "$@")"
}

run_on_node() {  # run_on_node COMMAND NODE
  run mkdir -p "$(node_log_dir "$2")"
  ssh_node "$2" all "$1" "--output-directory=$(node_log_dir "$2")"
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
  copy) copy "$@" ;;
  delete) no_args "$@"; delete ;;
  *) die "unknown command '$command'; one of create, setup, run, copy, delete (see --help)" ;;
esac
