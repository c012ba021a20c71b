#!/usr/bin/env bash
# Pseudo-label caption shards on a Slurm cluster: one task per GPU, each rank labels its own shards.
#   sbatch --nodes=4 scripts/slurm/pseudo_label.sh recipes/label/cap24m_glip_l.yaml [extra glip-pl flags]
# Resumable: finished shards are skipped, so resubmitting (or --requeue after preemption) continues the job.
# The log goes to the submit directory (Slurm opens it before the script runs, so it cannot be in a folder the
# script would create). Environment: as scripts/slurm/pretrain.sh (GLIP_PL_ROOT, GLIP_PL_SETUP, GLIP_PL_VENV;
# scripts/slurm/setup_node.sh); nothing is installed on the compute nodes.
#SBATCH --job-name=glip-pseudo-label
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --requeue
#SBATCH --signal=SIGUSR1@120
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail
CONFIG="${1:?usage: sbatch scripts/slurm/pseudo_label.sh RECIPE.yaml [flags]}"
shift
# shellcheck disable=SC1091
. "${GLIP_PL_ROOT:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}}/scripts/slurm/setup_node.sh"
NODES="${SLURM_JOB_NUM_NODES:-1}"
PER_NODE="${SLURM_NTASKS_PER_NODE:-8}"
srun --kill-on-bad-exit=1 python -m glip_pl.cli pseudo-label --config "$CONFIG" --num-nodes "$NODES" \
    --devices "$PER_NODE" "$@"
