#!/bin/bash
# One node's share of a SLURM job, started on every node by launch/slurm.sbatch through srun: find this node's
# rank in the job's hostfile, then start the DeepSpeed launcher, which spawns one training process per GPU here
# and meets the other nodes at MASTER_ADDR:MASTER_PORT. No ssh between nodes is needed (--no_ssh).
#
# Arguments: the Hydra overrides for train/main.py, final (slurm.sbatch adds run_dir and train.resume).
# Environment: HOSTFILE, MASTER_ADDR, MASTER_PORT, REPO_DIR (set by slurm.sbatch); DEEPSPEED (the launcher
# executable, default "deepspeed"); DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

: "${HOSTFILE:?HOSTFILE must name the hostfile of the job (launch/slurm.sbatch writes it)}"
: "${MASTER_ADDR:?MASTER_ADDR must be set (launch/slurm.sbatch sets it)}"
: "${MASTER_PORT:?MASTER_PORT must be set (launch/slurm.sbatch sets it)}"
: "${REPO_DIR:?REPO_DIR must be the indexcache checkout (launch/slurm.sbatch sets it)}"

this_node=${SLURMD_NODENAME:-$(hostname -s)}
mapfile -t hosts < <(awk '$1 !~ /^#/ && NF { print $1 }' "$HOSTFILE")
node_rank=-1
for i in "${!hosts[@]}"; do
    if [[ ${hosts[$i]} == "$this_node" ]]; then
        node_rank=$i
    fi
done
if ((node_rank < 0)); then
    echo "indexcache: node $this_node is not in $HOSTFILE (${hosts[*]})" >&2
    exit 1
fi

cmd=(
    "${DEEPSPEED:-deepspeed}"
    --hostfile="$HOSTFILE"
    --no_ssh
    --node_rank="$node_rank"
    --master_addr="$MASTER_ADDR"
    --master_port="$MASTER_PORT"
    "$REPO_DIR/train/main.py"
    "$@"
)
if [[ ${DRY_RUN:-0} == 1 ]]; then
    printf '%q ' "${cmd[@]}"
    printf '\n'
    exit 0
fi
cd "$REPO_DIR"
exec "${cmd[@]}"
