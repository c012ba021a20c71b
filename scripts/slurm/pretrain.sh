#!/usr/bin/env bash
# Multi-node GLIP pretraining under Slurm.
#
#   sbatch --nodes=2 scripts/slurm/pretrain.sh recipes/cluster/ddp_multi_node.yaml recipes/pretrain/glip_t_c.yaml
#
# Every argument is a config file (stacked left to right: cluster settings, then the recipe) or a CLI override
# such as --trainer.max_steps=1000. One task per GPU; Lightning reads the Slurm environment for ranks/nodes.
# Preemption: Slurm sends SIGUSR1 (--signal) to the tasks; glip_pl's PreemptionCheckpoint (added by glip-pl fit)
# saves last.ckpt at the next step boundary agreed by all ranks, and rank 0 requeues the job; the requeued job
# resumes from it (same W&B run id, kept in the run directory). Lightning's own Slurm handler is switched off: it
# saves inside the signal handler and can hang DDP jobs (Lightning issue #21406). Override #SBATCH lines on the sbatch command line (--nodes, --gres, --time ...).
#
# CPU-only (a laptop-sized Slurm, CI): sbatch's command-line options override the #SBATCH lines, so drop the GPUs
# and size the tasks there, with a CPU cluster file or recipe (trainer.accelerator: cpu, strategy: ddp -> gloo):
#   sbatch --gres=none --ntasks-per-node=2 --cpus-per-task=1 --mem=0 --time=10 \
#       scripts/slurm/pretrain.sh recipes/local/cpu_smoke.yaml --trainer.strategy=ddp
# (tests/lit/test_slurm.py runs exactly this on a one-node Slurm that scripts/ci/slurm_up.sh brings up.)
# Environment (scripts/slurm/setup_node.sh): GLIP_PL_ROOT (repository, default: the submit directory), GLIP_PL_SETUP
# (a file sourced first: `module load`, conda, a container), GLIP_PL_VENV (default ROOT/.venv). Nothing is installed
# on the compute nodes.
#SBATCH --job-name=glip_pl
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gres=gpu:8
#SBATCH --cpus-per-task=10
#SBATCH --time=48:00:00
#SBATCH --signal=USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

if [ "$#" -lt 1 ]; then
    echo "usage: sbatch scripts/slurm/pretrain.sh CONFIG.yaml [MORE.yaml ...] [--key=value ...]" >&2
    exit 2
fi
# shellcheck disable=SC1091
. "${GLIP_PL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/../.." && pwd)}}/scripts/slurm/setup_node.sh"

ARGS=()
for a in "$@"; do
    if [[ "$a" == *.yaml || "$a" == *.yml ]]; then ARGS+=(--config "$a"); else ARGS+=("$a"); fi
done

# Rendezvous: first node of the allocation (Lightning honours MASTER_ADDR/MASTER_PORT when set).
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((10000 + SLURM_JOB_ID % 20000))}"
# NCCL: fail fast instead of hanging on a dead peer; keep logs quiet unless asked.
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export GLIP_PL_NUM_NODES="$SLURM_JOB_NUM_NODES" GLIP_PL_DEVICES="$SLURM_NTASKS_PER_NODE"

echo "[glip_pl] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST (master $MASTER_ADDR:$MASTER_PORT)"
srun --kill-on-bad-exit=1 python -m glip_pl.cli fit "${ARGS[@]}" \
    --trainer.num_nodes="$SLURM_JOB_NUM_NODES" --trainer.devices="$SLURM_NTASKS_PER_NODE"
