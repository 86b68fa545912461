#!/usr/bin/env bash
# launch.sh: the one entry point for every stage, on this machine, several machines, or Slurm.
#
#   ./launch.sh train --config configs/tiny-cpu.yaml [--nproc 2] [key=value ...]
#   ./launch.sh train --config X --hostfile hosts.txt                       # deepspeed over ssh
#   ./launch.sh train --config X --hostfile hosts.txt --no-ssh --node-rank 1 --master 10.0.0.1
#   ./launch.sh slurm train --config X --nodes 2 --gpus-per-node 8 [--partition P] [--time 1-00:00] [--dry-run]
#   ./launch.sh slurm merge --name NAME --run runs/NAME        (--name: the run dir for the log)
#   ./launch.sh prep build --source ... --out ...    (python -m data_prep ...)
#   ./launch.sh merge ... | eval ... | demo | sweep [--points 1,2,4 ...]   (sweep: python -m experiments.sweep)
# Add --dry-run to any of them to print the command (or the sbatch script) without running it.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$here"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$here/.venv/bin/python" ]; then PY="$here/.venv/bin/python"; else PY="$(command -v python3)"; fi
fi

usage() { sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch.sh: $*" >&2; exit 2; }
positive() {  # positive NAME VALUE [0]: a count option must be a positive integer (or 0 when allowed)
  [[ "$2" =~ ^[1-9][0-9]*$ || ( "${3:-}" = 0 && "$2" = 0 ) ]] || die "$1 '$2': expected a positive integer"
  echo "$2"
}
quoted() { local out="" a; for a in "$@"; do out+=" $(printf '%q' "$a")"; done; echo "${out# }"; }

module_for() {
  case "$1" in
    prep) echo data_prep ;;
    train) echo pipeline.train ;;
    merge) echo pipeline.merge ;;
    eval) echo pipeline.evaluate ;;
    *) die "unknown stage '$1' (prep, train, merge, eval, demo, sweep, slurm)" ;;
  esac
}

gpu_count() { if command -v nvidia-smi >/dev/null 2>&1; then nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true; else echo 0; fi; }

run_or_print() {
  if [ "$dry_run" = 1 ]; then quoted "$@"; exit 0; fi
  echo "+ $(quoted "$@")" >&2
  exec "$@"
}

local_stage() {
  local stage="$1"; shift
  local nproc="" hostfile="" no_ssh=0 node_rank="" master="127.0.0.1" port="${MASTER_PORT:-29500}"
  local args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --nproc) nproc="$(positive --nproc "${2:-}")" || exit 2; shift 2 ;;
      --hostfile) hostfile="$2"; shift 2 ;;
      --no-ssh) no_ssh=1; shift ;;
      --node-rank) node_rank="$2"; shift 2 ;;
      --master) master="$2"; shift 2 ;;
      --master-port) port="$2"; shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  local module; module="$(module_for "$stage")"
  if [ "$stage" != train ]; then run_or_print "$PY" -m "$module" "${args[@]}"; fi
  export DS_ACCELERATOR="${DS_ACCELERATOR:-$( [ "$(gpu_count)" -gt 0 ] && echo cuda || echo cpu )}"
  if [ -n "$hostfile" ]; then
    [ -f "$hostfile" ] || die "--hostfile $hostfile: no such file"
    local ds=("$PY" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_addr "$master" --master_port "$port")
    if [ "$no_ssh" = 1 ]; then
      [ -n "$node_rank" ] || die "--no-ssh needs --node-rank R (and --master ADDR of node 0)"
      ds+=(--no_ssh --node_rank "$node_rank")
    fi
    run_or_print "${ds[@]}" --module "$module" "${args[@]}"
  fi
  local gpus; gpus="$(gpu_count)"
  if [ "$gpus" -gt 0 ]; then
    run_or_print "$PY" -m deepspeed.launcher.runner --num_gpus "${nproc:-$gpus}" --master_port "$port" \
      --module "$module" "${args[@]}"
  fi
  # CPU ranks: torchrun (sets OMP_NUM_THREADS=1 per rank, leaves no /dev/shm files behind).
  run_or_print "$PY" -m torch.distributed.run --standalone --nproc_per_node "${nproc:-1}" -m "$module" "${args[@]}"
}

config_name() {  # the run name: a name=... override, else the recipe's name:, else the stage
  local arg prev="" name=""
  for arg in "$@"; do
    case "$arg" in name=*) name="${arg#name=}" ;; esac
    if [ "$prev" = "--config" ] && [ -z "$name" ] && [ -f "$arg" ]; then
      name="$(sed -n 's/^name:[[:space:]]*\([^#[:space:]]*\).*/\1/p' "$arg" | head -n 1)"
    fi
    prev="$arg"
  done
  echo "${name:-$1}"
}

runs_dir_of() {
  local arg; for arg in "$@"; do case "$arg" in runs_dir=*) echo "${arg#runs_dir=}"; return ;; esac; done; echo runs
}

slurm_stage() {
  [ $# -gt 0 ] || die "usage: ./launch.sh slurm STAGE [--nodes N] [--gpus-per-node G] ... [stage args]"
  local stage="$1"; shift
  local nodes=1 gpus=0 cpus="" partition="" time="" signal_secs=120 account="" name="" args=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes) nodes="$(positive --nodes "${2:-}")" || exit 2; shift 2 ;;
      --gpus-per-node) gpus="$(positive --gpus-per-node "${2:-}" 0)" || exit 2; shift 2 ;;
      --cpus-per-node) cpus="$(positive --cpus-per-node "${2:-}")" || exit 2; shift 2 ;;
      --partition) partition="$2"; shift 2 ;;
      --account) account="$2"; shift 2 ;;
      --time) time="$2"; shift 2 ;;
      --signal-seconds) signal_secs="$2"; shift 2 ;;
      --name) name="$2"; shift 2 ;;
      --dry-run) dry_run=1; shift ;;
      *) args+=("$1"); shift ;;
    esac
  done
  local module; module="$(module_for "$stage")"
  [ -n "$name" ] || name="$(config_name "$stage" "${args[@]}")"
  local run_dir; run_dir="$(runs_dir_of "${args[@]}")/$name"
  local nproc=$(( gpus > 0 ? gpus : 1 ))
  local script="$run_dir/submit-$stage.sbatch"
  local body
  body="$(render_sbatch | grep -v '^$')"
  if [ "$dry_run" = 1 ]; then echo "$body"; return 0; fi
  mkdir -p "$run_dir"
  printf '%s\n' "$body" > "$script"
  local job; job="$(sbatch --parsable "$script")" || die "sbatch failed for $script"
  job="${job%%;*}"
  echo "submitted job $job: $script"
  echo "log: $run_dir/slurm-$job.out   (squeue -j $job; scancel $job)"
}

render_sbatch() {
  local launcher
  if [ "$stage" = train ]; then
    launcher="$(quoted "$PY" -m torch.distributed.run --nnodes "$nodes" --nproc_per_node "$nproc") \\
    --rdzv_id \"\$SLURM_JOB_ID\" --rdzv_backend c10d --rdzv_endpoint \"\$MASTER_ADDR:\$MASTER_PORT\" \\
    $(quoted -m "$module" "${args[@]}")"
  else
    launcher="$(quoted "$PY" -m "$module" "${args[@]}")"
  fi
  cat <<EOF
#!/bin/bash
#SBATCH --job-name=$(printf '%q' "$name-$stage")
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --output=$(printf '%q' "$run_dir")/slurm-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=USR1@$signal_secs
$( [ "$gpus" -gt 0 ] && echo "#SBATCH --gpus-per-node=$gpus" )
$( [ -n "$cpus" ] && echo "#SBATCH --cpus-per-task=$cpus" )
$( [ -n "$partition" ] && echo "#SBATCH --partition=$(printf '%q' "$partition")" )
$( [ -n "$account" ] && echo "#SBATCH --account=$(printf '%q' "$account")" )
$( [ -n "$time" ] && echo "#SBATCH --time=$(printf '%q' "$time")" )
# Written by launch.sh; one task per node, srun starts one launcher per node.
set -uo pipefail
cd $(printf '%q' "$here")
export DS_ACCELERATOR=$( [ "$gpus" -gt 0 ] && echo cuda || echo cpu )
export MASTER_ADDR="\$(scontrol show hostnames "\$SLURM_JOB_NODELIST" | head -n 1)"
export MASTER_PORT=\$(( 20000 + SLURM_JOB_ID % 20000 ))
# Slurm's USR1 (--signal) reaches each launcher; torchrun forwards it to the ranks, which
# finish the step, checkpoint, drop \$RUN_DIR/REQUEUE and exit.
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1
RUN_DIR=$(printf '%q' "$run_dir")
rm -f "\$RUN_DIR/REQUEUE"
srun --kill-on-bad-exit=1 $launcher
rc=\$?
if [ -f "\$RUN_DIR/REQUEUE" ]; then
  echo "checkpointed on a signal: requeueing job \$SLURM_JOB_ID"
  scontrol requeue "\$SLURM_JOB_ID"
  exit 0
fi
exit \$rc
EOF
}

dry_run=0
[ $# -gt 0 ] || { usage; exit 2; }
case "$1" in
  -h|--help|help) usage ;;
  demo) shift; exec make -C "$here" demo "$@" ;;
  sweep) shift; args=()   # every option is the sweep's own (its --nproc is ranks per run)
     for a in "$@"; do if [ "$a" = --dry-run ]; then dry_run=1; else args+=("$a"); fi; done
     run_or_print "$PY" -m experiments.sweep "${args[@]}" ;;
  slurm) shift; slurm_stage "$@" ;;
  *) stage="$1"; shift
     for a in "$@"; do [ "$a" = --help ] && { "$PY" -m "$(module_for "$stage")" --help; exit 0; }; done
     local_stage "$stage" "$@" ;;
esac
